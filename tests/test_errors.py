"""Bad input gets a specific error whose message names the thing and the fix."""

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny, train
from updatestore import (
    ConfigError,
    ModelMismatchError,
    NotAStoreError,
    ReadOnlyStoreError,
    RecorderError,
    SampleIdError,
    StoreExistsError,
    StoreNotFoundError,
    UnsupportedFormatError,
    UpdateStore,
    UpdateStoreError,
)


def test_missing_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist; create one with UpdateStore.create") as e:
        UpdateStore.open(tmp_path / "nope.zarr")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, UpdateStoreError)


def test_not_a_store(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(NotAStoreError, match="no zarr.json"):
        UpdateStore.open(tmp_path / "dir")
    import zarr

    zarr.open_group(tmp_path / "plain", mode="w")
    with pytest.raises(NotAStoreError, match="not an update store"):
        UpdateStore.open(tmp_path / "plain")


def test_create_refuses_existing(store_path, tiny):
    UpdateStore.create(store_path, tiny)
    with pytest.raises(StoreExistsError, match="already exists.*overwrite=True"):
        UpdateStore.create(store_path, tiny)
    UpdateStore.create(store_path, tiny, overwrite=True)


def test_overwrite_replaces_only_an_update_store(tmp_path, tiny):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("years of work")
    with pytest.raises(StoreExistsError, match="not an update store.*replaces only an update store"):
        UpdateStore.create(folder, tiny, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "years of work"
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreExistsError, match="is a file"):
        UpdateStore.create(tmp_path / "f", tiny, overwrite=True)
    other = tmp_path / "zarr-but-not-ours"
    import zarr

    zarr.open_group(other, mode="w").attrs["something"] = 1
    with pytest.raises(StoreExistsError, match="not an update store"):
        UpdateStore.create(other, tiny, overwrite=True)
    assert (other / "zarr.json").exists()


def test_demo_never_deletes_an_existing_directory(tmp_path):
    from unlearn.demo import main

    folder = tmp_path / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="already exists"):
        main(["--store", str(folder), "--epochs", "1", "--quiet"])
    assert (folder / "keep.txt").read_text() == "mine"


def rewrite_meta(path, change):
    """Change a store's metadata the way a crafted (not damaged) store would: checksum recomputed."""
    import hashlib
    import json

    import zarr

    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs["updatestore"])
    change(meta)
    # The checksum as FORMAT.md specifies it: sha256 of the canonical JSON (sorted keys, no spaces).
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    root.attrs.update({"updatestore": meta, "updatestore_sha256": digest})


def test_newer_format_version_refused(store_path, tiny):
    UpdateStore.create(store_path, tiny)
    rewrite_meta(store_path, lambda m: m.update(format_version=99))
    with pytest.raises(UnsupportedFormatError, match="format version 99.*Upgrade updatestore"):
        UpdateStore.open(store_path)


def test_path_traversal_layer_name_refused(store_path, tiny):
    UpdateStore.create(store_path, tiny)
    rewrite_meta(store_path, lambda m: m.update(layers=[dict(m["layers"][0], name="../../etc")] + m["layers"][1:]))
    with pytest.raises(NotAStoreError, match="invalid layer name"):
        UpdateStore.open(store_path)


def test_edited_metadata_refused_by_checksum(store_path, tiny):
    import zarr

    UpdateStore.create(store_path, tiny)
    root = zarr.open_group(store_path, mode="r+")
    meta = dict(root.attrs["updatestore"])
    meta["layers"] = [dict(meta["layers"][0], keep=0.5)] + meta["layers"][1:]
    root.attrs["updatestore"] = meta
    with pytest.raises(NotAStoreError, match="does not match its checksum"):
        UpdateStore.open(store_path)


def test_changed_array_metadata_refused(store_path, tiny):
    import json

    with UpdateStore.create(store_path, tiny, keep=1.0) as store:
        train(store, tiny, steps=3)
    meta_file = store_path / "layers" / "fc1.bias" / "values" / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["fill_value"] = 1
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(NotAStoreError, match="'layers/fc1.bias/values' does not match the metadata"):
        UpdateStore.open(store_path)


def test_edited_commit_record_refused(store_path, tiny):

    with UpdateStore.create(store_path, tiny) as store:
        train(store, tiny, steps=3)
    f = store_path / "steps" / "zarr.json"
    f.write_text(f.read_text().replace('"num_steps": 3', '"num_steps": 2'))
    assert '"num_steps": 2' in f.read_text()
    with pytest.raises(NotAStoreError, match="invalid commit record"):
        UpdateStore.open(store_path)


def test_shape_mismatch_message(store_path, tiny):
    with UpdateStore.create(store_path, tiny) as store:
        other = make_tiny(hidden=41)
        with pytest.raises(ModelMismatchError) as e:
            store.check_model(other)
    assert str(e.value) == (
        f"store {store_path} was recorded for a model with layer 'fc1.weight' of shape (40, 12); "
        "this model has (41, 12)"
    )
    assert isinstance(e.value, ValueError)


def test_name_mismatch(store_path, tiny):
    store = UpdateStore.create(store_path, tiny)
    with pytest.raises(ModelMismatchError, match="no trainable parameter of that name"):
        store.recorder(torch.nn.Sequential(torch.nn.Linear(12, 40)), None)
    bigger = make_tiny()
    bigger.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ModelMismatchError, match=r"\['extra.bias', 'extra.weight'\].*requires_grad=False"):
        store.check_model(bigger)


@pytest.mark.parametrize("keep", [0, 1.5, -0.1, float("nan"), "0.1", True, {"*": 2.0}])
def test_keep_out_of_range(store_path, tiny, keep):
    with pytest.raises(ConfigError, match=r"keep"):
        UpdateStore.create(store_path, tiny, keep=keep)


def test_keep_mapping_errors(store_path, tiny):
    with pytest.raises(ConfigError, match=r"cover no ratio for layer\(s\) \['fc1.bias'.*add a default"):
        UpdateStore.create(store_path, tiny, keep={"fc1.weight": 0.1})
    with pytest.raises(ConfigError, match=r"\['conv\*'\] match no parameter"):
        UpdateStore.create(store_path, tiny, keep={"conv*": 0.1, "*": 0.1})


def test_bad_value_dtype(store_path, tiny):
    with pytest.raises(ConfigError, match="value_dtype must be one of"):
        UpdateStore.create(store_path, tiny, value_dtype="int8")


@pytest.mark.parametrize("codec", ["gzip", "LZ4", None, 1])
def test_bad_codec_creates_nothing(store_path, tiny, codec):
    with pytest.raises(ConfigError, match=r"codec must be one of \('zstd', 'lz4'\)"):
        UpdateStore.create(store_path, tiny, codec=codec)
    assert not store_path.exists()


def test_step_without_ids(store_path, tiny):
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    before = [p.detach().clone() for p in tiny.parameters()]
    with UpdateStore.create(store_path, tiny) as store:
        with store.recorder(tiny, opt) as rec:
            tiny(torch.randn(2, 12)).sum().backward()
            with pytest.raises(RecorderError, match="outside `with rec.batch"):
                opt.step()
            with pytest.raises(RecorderError, match="without sample IDs"):
                with rec.batch([]):
                    opt.step()
        # the refused steps changed nothing and recorded nothing
        assert all(torch.equal(a, b) for a, b in zip(before, tiny.parameters()))
        assert store.num_batches == 0


@pytest.mark.parametrize("ids", [[1.5, 2.0], np.array([1.0, 2.0]), ["a", "b"], [[1, 2], [3, 4]], [True, False]])
def test_non_integer_ids(store_path, tiny, ids):
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    with UpdateStore.create(store_path, tiny) as store:
        with store.recorder(tiny, opt) as rec:
            with pytest.raises(SampleIdError, match="must be"):
                with rec.batch(ids):
                    pass
        with pytest.raises(SampleIdError):
            store.batches_containing(ids)


def test_write_to_read_only(store_path, tiny):
    with UpdateStore.create(store_path, tiny) as store:
        train(store, tiny, steps=2)
    ro = UpdateStore.open(store_path)
    with pytest.raises(ReadOnlyStoreError, match=r"open it with UpdateStore.open\(path, 'r\+'\)"):
        ro.recorder(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1))
    assert isinstance(ReadOnlyStoreError("x"), PermissionError)


def test_double_attach_refused(store_path, tiny, tmp_path):
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, tiny)
    other = UpdateStore.create(tmp_path / "other.zarr", tiny)
    with store.recorder(tiny, opt):
        with pytest.raises(RecorderError, match="already has an update-store recorder"):
            other.recorder(tiny, opt).attach()
        with pytest.raises(RecorderError, match="already has a recorder attached"):
            store.recorder(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1)).attach()
    # hooks are removed on exit: the optimizer steps freely again
    tiny(torch.randn(1, 12)).sum().backward()
    opt.step()


def test_writer_error_reaches_training_thread(store_path, tiny, monkeypatch):
    from updatestore import WriterError
    import zarr

    def boom(self, *args, **kwargs):  # the disk fills up under the writer thread
        raise OSError("disk full")

    monkeypatch.setattr(zarr.Array, "__setitem__", boom)
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, tiny)
    with pytest.raises(WriterError, match="disk full"):
        with store.recorder(tiny, opt) as rec:
            for i in range(50):
                with rec.batch([i]):
                    opt.zero_grad(); tiny(torch.randn(1, 12)).sum().backward(); opt.step()


@pytest.mark.parametrize("call,message", [
    (lambda s, m: s.purge([1.7]), "steps must be integers"),
    (lambda s, m: s.purge(["3"]), "steps must be integers"),
    (lambda s, m: s.purge([True]), "steps must be integers"),
    (lambda s, m: s.purge([99]), "steps out of range"),
    (lambda s, m: s.read([2, 1]), "sorted and unique"),
    (lambda s, m: s.samples_in_steps([0.5]), "steps must be integers"),
    (lambda s, m: unlearn.amnesiac(m, s, [0], block_steps=-1), "block_steps must be an int ≥ 1"),
    (lambda s, m: unlearn.amnesiac(m, s, [0], block_steps=0), "block_steps must be an int ≥ 1"),
    (lambda s, m: unlearn.amnesiac(m, s, [0], device="nonsense"), "is not a torch device"),
    (lambda s, m: unlearn.amnesiac(m, s, [0], purge="yes"), "purge must be True or False"),
    (lambda s, m: unlearn.amnesiac(m, s, [2**64]), "must fit in int64"),
    (lambda s, m: s.recorder(m, commit_seconds=0), "commit_seconds must be a positive number"),
    (lambda s, m: s.recorder(m, resume={"steps": 3}), "resume= takes the dict that rec.state_dict"),
])
def test_entry_points_validate_before_changing_anything(store_path, tiny, call, message):
    """Bad arguments are the package's errors, raised before anything is written (floats, strings
    and bools are never coerced into step numbers)."""
    from conftest import file_bytes, train

    with UpdateStore.create(store_path, tiny, keep=0.5) as store:
        train(store, tiny, steps=4)
        files = file_bytes(store_path)
        weights = {n: p.detach().clone() for n, p in tiny.named_parameters()}
        with pytest.raises(UpdateStoreError, match=message):
            call(store, tiny)
        assert file_bytes(store_path) == files
        assert all(torch.equal(p, weights[n]) for n, p in tiny.named_parameters())
