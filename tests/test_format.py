"""FORMAT.md is a contract: a plain-zarr reader following it gets the stored updates."""

import re
from pathlib import Path

import numpy as np
import torch
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st

from conftest import make_tiny, train, read_rows
from updatestore import UpdateStore

FORMAT = Path(__file__).parents[1] / "updatestore" / "FORMAT.md"


def _reader_block() -> str:
    text = FORMAT.read_text()
    section = text[text.index("## Reading a store with plain `zarr`"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("keep,dtype,positions,codec", [(0.2, "bfloat16", "bitmap", "zstd"),
                                                         (0.2, "bfloat16", "bitmap", "lz4"),
                                                         (0.01, "float16", "gaps", "lz4"), (1.0, "float32", "auto", "zstd")])
def test_plain_zarr_reader_from_format_md(tmp_path, monkeypatch, keep, dtype, positions, codec):
    model = make_tiny(hidden=300)
    with UpdateStore.create(tmp_path / "run.zarr", model, keep=keep, value_dtype=dtype,
                            positions=positions, codec=codec) as store:
        train(store, model, steps=4)
        train(store, model, steps=5, seed=1)  # a second recording: its rows start a new shard (format 2)
        expected = read_rows(store, "fc1.weight", 0, 9)
    root = zarr.open_group(tmp_path / "run.zarr", mode="r")
    assert root["steps/row"][4] == store.meta["block_steps"]
    # the values' Blosc is the store's codec, whatever reads it takes it from zarr.json
    assert root["layers/fc1.weight/values"].metadata.codecs[0].codecs[1].cname.name == codec
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_reader_block(), scope)  # the documented snippet, verbatim
    assert scope["layer"]["name"] == "fc1.weight"
    np.testing.assert_array_equal(scope["values"].astype(np.float32), expected[0].numpy())
    want_pos = expected[1].numpy() if expected[1] is not None else np.broadcast_to(np.arange(12 * 300), (9, 3600))
    np.testing.assert_array_equal(scope["positions"], want_pos)


def test_plain_zarr_reader_from_format_md_reads_a_format1_store(tmp_path, monkeypatch):
    import shutil

    shutil.copytree(FIXTURE / "store", tmp_path / "run.zarr")
    with UpdateStore.open(tmp_path / "run.zarr") as store:
        name, n = store.layers[0].name, store.num_batches
        recorded = store.step_status() == 1
        assert not recorded.all()  # the fixture has a purged step, which the snippet leaves out
        expected = [t.numpy()[recorded] for t in read_rows(store, name, 0, n)]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_reader_block(), scope)
    np.testing.assert_array_equal(scope["values"].astype(np.float32), expected[0])
    np.testing.assert_array_equal(scope["positions"], expected[1])


def test_documented_tree_and_attributes(tmp_path):
    model = make_tiny()
    with UpdateStore.create(tmp_path / "s", model, keep=0.1) as store:
        train(store, model, steps=3)
    root = zarr.open_group(tmp_path / "s", mode="r")
    meta = root.attrs["updatestore"]
    for key in ("format", "format_version", "library_version", "created", "config", "value_dtype",
                "block_steps", "model_fingerprint", "layers"):
        assert key in meta
    assert root["steps"].attrs["num_steps"] == 3 and root["steps"].attrs["num_samples"] == 24
    assert root["steps/status"].dtype == np.uint8 and root["samples/ids"].dtype == np.int64
    for layer in meta["layers"]:
        g = root[f"layers/{layer['name']}"]
        assert g.attrs["updatestore"] == layer
        assert g["values"].shape == (3, layer["k"]) and g["values"].dtype == np.uint16
        codecs = [type(c).__name__ for c in g["values"].metadata.codecs]
        assert codecs == ["ShardingCodec"]
        inner = [type(c).__name__ for c in g["values"].metadata.codecs[0].codecs]
        assert inner == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    assert meta["layers"][0]["positions"] == "bitmap"


def test_files_far_fewer_than_steps_times_layers(tmp_path):
    model = make_tiny()
    with UpdateStore.create(tmp_path / "s", model, keep=0.1) as store:
        train(store, model, steps=200)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    # 4 layers × 2 arrays × 1 shard + steps/samples chunks (steps/row since format 2) + zarr.json files
    assert len(files) < 45 < 200 * 4


FIXTURE = Path(__file__).parent / "fixtures" / "format1"


def test_store_written_by_0_1_0_opens_and_unlearns_identically(tmp_path):
    """A format-1 store written by release 0.1.0 (tests/fixtures/make_format1.py): every query
    answers as 0.1.0 answered, and unlearning gives bit-identical weights."""
    import json
    import shutil

    from safetensors.torch import load_file

    import unlearn

    expected = json.loads((FIXTURE / "expected.json").read_text())
    shutil.copytree(FIXTURE / "store", tmp_path / "store")  # the fixture itself stays untouched
    model = make_tiny(0)
    model.load_state_dict(load_file(str(FIXTURE / "trained.safetensors")))
    with UpdateStore.open(tmp_path / "store") as store:
        assert store.meta["format_version"] == 1 and store.meta["library_version"] == "0.1.0"
        assert (store.num_batches, store.num_samples) == (expected["num_batches"], expected["num_samples"])
        assert store.step_status().tolist() == expected["status"]
        assert store.batches_containing(expected["forget"]).tolist() == expected["batches_of_forget"]
        assert store.samples_of([7003]).tolist() == expected["owner_7003_samples"]
        assert len(store.ledger()) == expected["ledger_entries"]
        assert {s.positions for s in store.layers} == {"bitmap", "gaps", "dense"}
        report = unlearn.amnesiac(model, store, expected["forget"], ledger=False, purge=False, device="cpu")
    assert report.steps_hit.tolist() == expected["steps_hit"]
    want = load_file(str(FIXTURE / "expected_after.safetensors"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name


@given(st.integers(1, 1 << 30), st.sampled_from([1 << 16, 1 << 18, 1 << 19]))
def test_even_blocks_leave_under_16_bytes_a_block(nbytes, target):
    from updatestore._format.tree import even_blocks

    b = even_blocks(nbytes, target)
    n = -(-nbytes // target)
    assert b % 16 == 0 and 16 <= b <= max(16, target)
    if nbytes >= 16 * n:
        assert n * b <= nbytes and nbytes - n * b < 16 * n


def test_large_bfloat16_values_are_bit_shuffled_in_even_blocks(tmp_path):
    from updatestore._format.tree import BITSHUFFLE_MIN, even_blocks

    model = make_tiny(d_in=2000, hidden=512)  # fc1: 1M entries, kept rows of 200 KB
    with UpdateStore.create(tmp_path / "s.zarr", model, keep=0.1) as store:
        train(store, model, steps=3, batch=4)
        specs = {s.name: s for s in store.layers}
    root = zarr.open_group(tmp_path / "s.zarr", mode="r")
    for name, spec in specs.items():
        blosc = root[f"layers/{name}/values"].metadata.codecs[0].codecs[1]
        nbytes = spec.chunk_rows * spec.k * 2
        if nbytes >= BITSHUFFLE_MIN and spec.positions == "bitmap":
            assert (blosc.shuffle.name, blosc.blocksize) == ("bitshuffle", even_blocks(nbytes)), name
        else:
            assert (blosc.shuffle.name, blosc.blocksize) == ("shuffle", 1 << 19), name
    assert any(s.chunk_rows * s.k * 2 >= BITSHUFFLE_MIN and s.positions == "bitmap" for s in specs.values())
    assert any(s.chunk_rows * s.k * 2 < BITSHUFFLE_MIN for s in specs.values())
    # dense rows (keep 1.0) stay byte-shuffled at any size
    with UpdateStore.create(tmp_path / "d.zarr", model, keep=1.0) as dense:
        big = max(dense.layers, key=lambda s: s.k)
    blosc = zarr.open_group(tmp_path / "d.zarr", mode="r")[f"layers/{big.name}/values"].metadata.codecs[0].codecs[1]
    assert big.chunk_rows * big.k * 2 >= BITSHUFFLE_MIN and blosc.shuffle.name == "shuffle"
    # zarr-python and the library's own shard reader read the same rows
    from updatestore._format.shards import ShardLayout, read_rows as read_shards

    arr = root["layers/fc1.weight/values"]
    got, = read_shards(arr.store, [ShardLayout.of(arr)], np.arange(3))
    np.testing.assert_array_equal(got, arr[:])
    assert got.any()
