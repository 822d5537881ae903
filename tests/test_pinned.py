"""``store.pinned()``: a read-only handle's calls see one commit state, and a purge or rollback by
another handle while it reads is refused, never read as zeros (a silent non-subtraction)."""

import copy

import numpy as np
import pytest
import torch

import unlearn
import updatestore._purge
import updatestore._queries
import updatestore.store
from conftest import make_tiny, tiny_step, train
from updatestore import StoreChangedError, UpdateStore

STORES = [dict(keep=1.0, value_dtype="float32"), dict(keep=0.3)]  # dense rows (a zero row decodes), bitmap rows


def _made(tmp_path, steps=4, **kw):
    model = make_tiny()
    with UpdateStore.create(tmp_path / "s", model, **kw) as store:
        oracle, ids = train(store, model, steps=steps)
    return model, oracle, ids


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pinned_reader_sees_commits_after_the_block(tmp_path):
    model = make_tiny()
    store = UpdateStore.create(tmp_path / "s", model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with store.recorder(model, opt) as rec:
        for i in range(3):
            tiny_step(rec, model, opt, [i])
        store.flush()
        reader = UpdateStore.open(tmp_path / "s")
        with reader.pinned():
            assert reader.num_batches == 3
            tiny_step(rec, model, opt, [3])
            store.flush()
            with reader.pinned():  # nested: the same state
                assert reader.num_batches == 3 and reader.batches_containing([3]).size == 0
            assert len(reader.step_status()) == 3
        assert reader.num_batches == 4 and reader.batches_containing([3]).tolist() == [3]  # appends are no conflict
    store.close()


def test_an_amnesiac_call_reads_the_commit_record_twice(tmp_path, monkeypatch):
    """Once when its block begins, once to check nothing changed in place; it used to re-read it on every query."""
    model, _, _ = _made(tmp_path)
    reader = UpdateStore.open(tmp_path / "s")
    calls = []
    for module in (updatestore.store, updatestore._queries):
        real = module.read_state
        monkeypatch.setattr(module, "read_state", lambda *a, real=real: calls.append(1) or real(*a))
    report = unlearn.amnesiac(copy.deepcopy(model), reader, [0, 9, 17], ledger=False, purge=False)
    assert report.applied and report.steps_hit.tolist() == [0, 1, 2]
    assert len(calls) == 2


@pytest.mark.parametrize("kw", STORES, ids=["dense", "bitmap"])
def test_a_purge_while_a_reader_unlearns_is_refused_and_changes_nothing(tmp_path, kw):
    """Another handle purges step 0 after the reader resolved the request and before it read the rows.
    Before ``pinned()`` the reader re-read the statuses, took step 0 for one without an update and
    summed zeros for it: the model silently kept step 0's update, and the report said subtracted."""
    model, _, _ = _made(tmp_path, **kw)
    reader = UpdateStore.open(tmp_path / "s")
    read = reader.read

    def purge_first(*a, **k):
        if not purged:
            with UpdateStore.open(tmp_path / "s", "r+") as writer:
                unlearn.amnesiac(copy.deepcopy(model), writer, [0])
            purged.append(1)
        return read(*a, **k)

    purged = []
    reader.read = purge_first
    stale = copy.deepcopy(model)
    with pytest.raises(StoreChangedError, match="purge or a rollback"):  # bitmap rows: not "corrupt" either
        unlearn.amnesiac(stale, reader, [0, 9], ledger=False, purge=False)
    assert purged and _same(stale, model)
    reader.read = read
    report = unlearn.amnesiac(stale, reader, [0, 9], ledger=False, purge=False)  # run again: the new state
    assert report.steps_hit.tolist() == [1] and report.already_forgotten.tolist() == [0]


@pytest.mark.parametrize("stop", ["rows zeroed", "ids erased"])
def test_a_purge_interrupted_before_its_generation_bump_is_still_seen(tmp_path, monkeypatch, stop):
    """A purge bumps the generation last; a reader checking while it runs sees its statuses."""
    model, _, _ = _made(tmp_path, keep=1.0, value_dtype="float32")
    reader = UpdateStore.open(tmp_path / "s")

    def killed(root):
        raise KeyboardInterrupt("killed before the bump")

    monkeypatch.setattr(updatestore._purge, "bump_generation", killed)
    with pytest.raises(StoreChangedError, match="purge or a rollback"):
        with reader.pinned():
            rows = reader.read(np.arange(4))
            with UpdateStore.open(tmp_path / "s", "r+") as writer, pytest.raises(KeyboardInterrupt):
                writer.purge([0], samples=None if stop == "rows zeroed" else np.arange(8))
            assert rows["fc1.weight"].values.abs().sum() > 0  # read before the purge: a consistent state


def test_a_rollback_while_a_reader_reads_is_refused(tmp_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", model) as store, store.recorder(model, opt) as rec:
        for i in range(6):
            tiny_step(rec, model, opt, [i])
            if i == 2:
                state, weights = rec.state_dict(), copy.deepcopy(model.state_dict())
    reader = UpdateStore.open(tmp_path / "s")
    with pytest.raises(StoreChangedError):
        with reader.pinned():
            reader.read(np.arange(6))
            model.load_state_dict(weights)
            with UpdateStore.open(tmp_path / "s", "r+") as writer:
                writer.recorder(model, opt, resume=state).detach()  # rolls steps 3..5 back
    assert reader.num_batches == 3


def test_a_pinned_block_that_raises_is_not_checked(tmp_path):
    _made(tmp_path)
    reader = UpdateStore.open(tmp_path / "s")
    with pytest.raises(ZeroDivisionError):
        with reader.pinned():
            1 / 0
    assert reader.num_batches == 4 and reader._pins == 0


def test_a_reader_checks_shards_again_after_another_handle_rolled_back(tmp_path):
    """Its record of which shards exist is dropped with the generation: a rollback elsewhere erases
    shard 1 and the resumed run writes it again; deleted after that, it is corruption to this
    reader too, not zeros it had checked before the rollback."""
    import os

    from updatestore import CorruptStoreError

    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "s"
    with UpdateStore.create(path, model, keep=1.0, value_dtype="float32", buffer_bytes=1 << 16) as store, \
            store.recorder(model, opt) as rec:
        for i in range(3):
            tiny_step(rec, model, opt, [i])
        store.flush()  # steps 0..2 in shard 0, closed
        state, weights = rec.state_dict(), copy.deepcopy(model.state_dict())
        for i in range(3, 6):
            tiny_step(rec, model, opt, [i])  # shard 1
    reader = UpdateStore.open(path)
    reader.read(np.arange(6))  # checks that shards 0 and 1 exist
    model.load_state_dict(weights)
    with UpdateStore.open(path, "r+") as writer, writer.recorder(model, opt, resume=state) as rec:
        for i in range(3, 6):
            tiny_step(rec, model, opt, [10 + i])  # shard 1 again
    os.remove(path / "layers" / "fc1.weight" / "values" / "c" / "1" / "0")
    with pytest.raises(CorruptStoreError, match="missing"):
        reader.read(np.arange(6))
