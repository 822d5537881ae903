"""Audit ledger, idempotent unlearning, and purging forgotten updates from disk."""

import copy

import numpy as np
import pytest
import torch
import zarr

import unlearn
from conftest import make_tiny, oracle_after, train, read_rows
from updatestore import STATUS_PURGED, ReadOnlyStoreError, UpdateStore
from updatestore.ledger import hash_ids, weights_fingerprint


def _ids(s):  # IDs recur every 4 steps; ID 100 + s is unique to step s
    return np.r_[np.arange(6) + 6 * (s % 4), 100 + s]


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


@pytest.fixture
def trained(store_path):
    model = make_tiny(d_in=300, hidden=400)  # fc1.weight rows are one inner chunk each
    store = UpdateStore.create(store_path, model, keep=0.5, value_dtype="float32")
    oracle, all_ids = train(store, model, steps=16, ids_fn=_ids)
    return store, model, oracle, all_ids


def test_ledger_entry_records_the_request(trained):
    store, model, _, _ = trained
    before = weights_fingerprint(model)
    report = unlearn.amnesiac(model, store, [2, 103])
    (entry,) = store.ledger()
    assert report.ledger_entry == 0 and report.purged
    assert entry["method"] == "partial amnesiac" and entry["purged"] is True
    assert entry["steps"] == [0, 3, 4, 8, 12] == report.steps_hit.tolist()
    assert entry["model_before"] == before and entry["model_after"] == weights_fingerprint(model)
    assert entry["sample_id_hmac"] == hash_ids([2, 103], store.meta["ledger_key"]) and "time" in entry
    assert "sample_id_sha256" not in entry


def test_ledger_digests_are_keyed_so_small_id_spaces_cannot_be_enumerated(trained, store_path):
    """Anyone holding the ledger alone could hash every small integer and read off who was forgotten
    if the digests were plain SHA-256; under the store's secret they match no plain digest."""
    store, model, _, _ = trained
    unlearn.amnesiac(model, store, [2, 103])
    ledger_json = (store_path / "ledger" / "zarr.json").read_text()
    assert not any(h in ledger_json for h in hash_ids(range(1000)))  # the enumeration finds nothing
    assert store.meta["ledger_key"] not in ledger_json
    from updatestore import ids_in_ledger

    found = ids_in_ledger(store.ledger(), np.array([2, 103, 5]), store.meta["ledger_key"])
    assert found.tolist() == [True, True, False]  # with the key, an auditor can check given IDs


def test_overlapping_requests_never_subtract_a_step_twice(trained):
    store, model, oracle, _ = trained
    expected = oracle_after(model, oracle, sorted({0, 4, 8, 12} | {0, 1, 4, 5, 8, 9, 12, 13}), 0.5)
    unlearn.amnesiac(model, store, [0])  # steps 0, 4, 8, 12
    second = unlearn.amnesiac(model, store, [7, 2])  # steps 1,5,9,13 and 0,4,8,12, which were done
    assert second.steps_hit.tolist() == [1, 5, 9, 13] and second.steps_already_subtracted == 4
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=2e-6)


@pytest.mark.parametrize("purge", [True, False])
def test_forgetting_again_changes_nothing_and_says_so(trained, purge):
    store, model, _, _ = trained
    unlearn.amnesiac(model, store, [1, 2], purge=purge)
    after = _params(model)
    again = unlearn.amnesiac(model, store, [1, 2], purge=purge)
    assert not again.applied and len(again.steps_hit) == 0
    if purge:  # the IDs are gone from the index, the ledger remembers them
        assert again.already_forgotten.tolist() == [1, 2] and "already forgotten" in str(again)
    else:
        assert again.steps_already_subtracted == 4 and "not subtracted again" in str(again)
    assert len(store.ledger()) == 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), after[n])


def test_fresh_copy_after_purge_is_warned(trained):
    store, model, _, _ = trained
    original = copy.deepcopy(model)
    unlearn.amnesiac(model, store, [104])  # step 4 only
    with pytest.warns(UserWarning, match="purged after unlearning another copy"):
        report = unlearn.amnesiac(original, store, [3])  # steps 0, 4, 8, 12; step 4 is gone
    assert report.steps_unavailable == 1 and report.steps_hit.tolist() == [0, 8, 12]


def _inner_chunks(store_path, name, block):
    """Raw bytes of every inner chunk in a layer's values shards (sharding index at the end)."""
    blobs = {}
    for f in sorted((store_path / "layers" / name / "values" / "c").rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        index = np.frombuffer(data[-(16 * block + 4):-4], dtype="<u8").reshape(block, 2)
        shard = int(f.parent.name) if f.parent.name.isdigit() else int(f.name)
        for r, (off, nbytes) in enumerate(index):
            if off != np.iinfo(np.uint64).max:
                blobs[shard * block + r] = data[int(off):int(off + nbytes)]
    return blobs


def test_purge_erases_chunk_bytes_and_ids_and_keeps_the_rest(trained, store_path):
    store, model, _, _ = trained
    block = store.meta["block_steps"]
    spec = next(s for s in store.layers if s.name == "fc1.weight")
    assert spec.chunk_rows == 1
    before_blobs = _inner_chunks(store_path, "fc1.weight", block)
    before_rows = {s.name: read_rows(store, s.name, 0, 16) for s in store.layers}
    before_bytes = store.footprint().total_bytes
    report = unlearn.amnesiac(model, store, [2, 103])
    purged = set(report.steps_hit.tolist())
    # the purged rows' compressed bytes are in no file of the store any more
    everything = b"".join(p.read_bytes() for p in store_path.rglob("*") if p.is_file())
    for step, blob in before_blobs.items():
        assert (blob in everything) == (step not in purged), step
    # every other step's data is bit-identical; purged rows read as zeros
    for s in store.layers:
        v, p = read_rows(store, s.name, 0, 16)
        for step in range(16):
            if step in purged:
                assert not v[step].any()
            else:
                assert torch.equal(v[step], before_rows[s.name][0][step])
                assert torch.equal(p[step], before_rows[s.name][1][step])
    assert store.footprint().total_bytes < before_bytes
    assert (store.step_status()[sorted(purged)] == STATUS_PURGED).all()
    root = zarr.open_group(store_path, mode="r")
    for path in ("samples/ids", "index/sorted_ids"):  # the IDs and the persisted sorted index
        ids_on_disk = root[path][:]
        assert not np.isin(ids_on_disk, [2, 103]).any() and np.isin([0, 1, 100], ids_on_disk).all(), path


def test_read_only_store_refuses_to_unlearn_without_opt_out(trained, store_path):
    store, model, _, _ = trained
    store.close()
    ro = UpdateStore.open(store_path)
    with pytest.raises(ReadOnlyStoreError, match="pass ledger=False, purge=False"):
        unlearn.amnesiac(model, ro, [1])
    report = unlearn.amnesiac(model, ro, [1], ledger=False, purge=False)
    assert report.applied and not report.purged and ro.ledger() == []


def _values_anywhere(path, needles):
    """Every value of every array under the store, decoded (compressed bytes hide raw values)."""
    root = zarr.open_group(path, mode="r")
    found = set()
    for group in [root] + [g for _, g in root.groups()] + [g for _, p in root.groups() for _, g in p.groups()]:
        for _, arr in group.arrays():
            data = arr[...] if arr.size else np.zeros(0)
            found |= {int(x) for x in np.asarray(data).ravel() if int(x) in needles} if data.dtype.kind in "iu" else set()
    return found


def test_purge_leaves_none_of_the_forgotten_anywhere(tmp_path):
    """After a purge, no array of the store holds the forgotten IDs or owner key — including what a
    killed writer left beyond the commit — and a killed chunk rewrite's temporary file is gone."""
    import shutil

    model = make_tiny()
    forget_id, forget_owner = 777_777_001, 888_888_001
    ids = lambda s: [forget_id, 10 + s] if s == 1 else [10 + s, 20 + s]  # noqa: E731
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store:
        train(store, model, steps=6, ids_fn=ids)
        store.index_owners([forget_id, 11], [forget_owner, 5])
    root = zarr.open_group(tmp_path / "s", mode="r+")
    root["samples/ids"].resize((14,))  # what an interrupted writer leaves beyond the committed counts
    root["samples/ids"][12:14] = [forget_id, forget_id]
    chunk = tmp_path / "s" / "layers" / "fc1.weight" / "values" / "c" / "0" / "0"
    shutil.copy(chunk, chunk.with_suffix(".0123abcd.partial"))  # a killed rewrite's temporary file
    assert _values_anywhere(tmp_path / "s", {forget_id, forget_owner}) == {forget_id, forget_owner}
    with UpdateStore.open(tmp_path / "s", "r+") as store:
        report = unlearn.amnesiac(model, store, owners=[forget_owner])
        assert report.purged and store.num_samples == 12
    assert _values_anywhere(tmp_path / "s", {forget_id, forget_owner}) == set()
    assert not list((tmp_path / "s").rglob("*.partial"))


@pytest.mark.parametrize("damage", ["delete", "older copy"])
def test_a_deleted_or_rolled_back_ledger_is_corruption_not_empty(trained, store_path, damage):
    """Read as empty, a deleted ledger would let unpurged steps be subtracted from the model again."""
    import shutil

    from updatestore import CorruptStoreError

    store, model, _, _ = trained
    unlearn.amnesiac(model, store, [1], purge=False)
    older = (store_path / "ledger" / "zarr.json").read_bytes()
    unlearn.amnesiac(model, store, [7], purge=False)  # steps 1, 5, 9, 13: a second entry
    store.close()
    if damage == "delete":
        shutil.rmtree(store_path / "ledger")
    else:
        (store_path / "ledger" / "zarr.json").write_bytes(older)  # a valid, checksummed, older ledger
    before = _params(model)
    with UpdateStore.open(store_path, "r+") as again:
        with pytest.raises(CorruptStoreError, match=r"holds [01] entries but 2 were written"):
            again.ledger()
        with pytest.raises(CorruptStoreError):
            unlearn.amnesiac(model, again, [7], purge=False)
    assert all(torch.equal(p, before[n]) for n, p in _params(model).items())


def test_weights_fingerprint_is_the_documented_sha256():
    """Ledgers written by earlier releases compare fingerprints with today's: the bytes hashed are
    fixed (name|dtype|shape| then the raw little-endian weights, in parameter order), 0-d and
    bfloat16 parameters included."""
    import hashlib

    model = torch.nn.Linear(3, 2)
    model.register_parameter("scale", torch.nn.Parameter(torch.tensor(1.5)))
    model.to(torch.bfloat16)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}|".encode())
        h.update(bytes(p.detach().reshape(-1).view(torch.int16).numpy().tobytes()))
    assert weights_fingerprint(model) == h.hexdigest()
