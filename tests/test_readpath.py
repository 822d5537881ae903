"""The fast read path against independent oracles: the compiled kernels and the device (torch)
sum equal a NumPy scatter of the decoded positions; the direct shard reader equals zarr-python
on the same arrays, and refuses damaged shards (CRC, forged Blosc header, truncation)."""

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import unlearn
from updatestore import CorruptStoreError, UpdateStore
from updatestore._codecs import positions_codec
from updatestore._format.shards import ShardLayout, read_rows
from updatestore._kernels import _add_numba, _add_torch, add_packed, as_tensor

from conftest import make_tiny, oracle_after, steps_with, train


def _rows(numel, k, n, seed, codec):
    rng = np.random.default_rng(seed)
    pos = np.stack([np.sort(rng.choice(numel, size=k, replace=False)) for _ in range(n)])
    vals = rng.standard_normal((n, k)).astype(np.float32)
    packed = positions_codec(codec).encode(pos[0], numel)[None].repeat(n, 0)
    for i in range(n):
        packed[i] = positions_codec(codec).encode(pos[i], numel)
    oracle = np.zeros(numel, np.float64)
    for i in range(n):
        np.add.at(oracle, pos[i], vals[i])
    return packed, torch.from_numpy(vals), oracle


@given(st.integers(1, 5000), st.floats(0.001, 1.0), st.integers(1, 5), st.integers(0, 2**31),
       st.sampled_from(["bitmap", "gaps"]))
@settings(max_examples=80, deadline=None)
def test_kernels_equal_a_numpy_scatter(numel, keep, n, seed, codec):
    k = max(1, min(numel, int(keep * numel)))
    packed, vals, oracle = _rows(numel, k, n, seed, codec)
    for add in (lambda out: _add_numba(out, packed, vals, codec),
                lambda out: _add_torch(out, torch.from_numpy(packed if codec == "bitmap" else packed.astype(np.int64)),
                                       vals, codec, numel)):
        out = torch.zeros(numel)
        add(out)
        np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-5, atol=1e-5)


@given(st.integers(1, 3000), st.floats(0.01, 1.0), st.integers(1, 4), st.integers(0, 2**31),
       st.sampled_from(["bitmap", "gaps"]), st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=60, deadline=None)
def test_kernels_add_stored_values_exactly_as_their_float32_widening(numel, keep, n, seed, codec, dtype):
    """Values are summed as stored (bfloat16 bits widened inside the kernel, float16 by torch): the
    result is bit-identical to summing their float32 widening."""
    k = max(1, min(numel, int(keep * numel)))
    packed, vals, _ = _rows(numel, k, n, seed, codec)
    stored = (vals * 1e-3).to(dtype)
    stored[0, 0] = -stored[0, 0]  # a sign bit set, whatever the draw
    for add in (lambda out, v: _add_numba(out, packed, v, codec),
                lambda out, v: add_packed(out, torch.from_numpy(packed) if codec == "bitmap" else as_tensor(packed), v, codec)):
        want, got = torch.zeros(numel), torch.zeros(numel)
        add(want, stored.float())
        add(got, stored)
        assert torch.equal(got, want)


def test_large_rows_split_across_threads_add_in_row_order(monkeypatch):
    """Rows ≥ 2**20 entries are split by position across the pool: every entry is still added
    in row order, so the result is bit-identical to one thread's."""
    monkeypatch.setattr("updatestore._kernels.workers", lambda: 3)  # three ranges, whatever this machine has
    numel, k, n = (1 << 20) + 13, 50_000, 3
    for codec in ("bitmap", "gaps"):
        packed, vals, oracle = _rows(numel, k, n, 7, codec)
        out = torch.zeros(numel)
        _add_numba(out, packed, vals, codec)
        one = torch.zeros(numel)
        for i in range(n):  # one row at a time: the reference order
            one.index_add_(0, torch.from_numpy(positions_codec(codec).decode(packed[i:i + 1], numel, k)[0]), vals[i])
        assert torch.equal(out, one), codec
        np.testing.assert_allclose(out.numpy(), oracle, rtol=1e-5, atol=1e-6)


def test_map_shared_keeps_order_and_raises_what_a_worker_raised(monkeypatch):
    from updatestore import _pool

    monkeypatch.setattr(_pool, "workers", lambda: 3)
    assert _pool.map_shared(lambda x: x * x, list(range(50))) == [x * x for x in range(50)]

    def boom(x):
        if x == 37:
            raise ValueError("item 37")
        return x

    with pytest.raises(ValueError, match="item 37"):
        _pool.map_shared(boom, list(range(50)))


def test_map_shared_does_not_wait_for_a_busy_pool(monkeypatch):
    """With every pool worker busy, the caller does all the items itself and returns: its helpers,
    still queued, are cancelled rather than awaited."""
    import threading

    from updatestore import _pool

    monkeypatch.setattr(_pool, "workers", lambda: 2)
    release = threading.Event()
    blockers = [_pool.pool().submit(release.wait) for _ in range(8)]  # more than the pool has threads
    try:
        done = threading.Event()
        result = []
        t = threading.Thread(target=lambda: (result.append(_pool.map_shared(lambda x: x + 1, [1, 2, 3])), done.set()))
        t.start()
        assert done.wait(10), "map_shared waited for a busy pool"
        assert result == [[2, 3, 4]]
    finally:
        release.set()
        for b in blockers:
            b.result()


def test_kernels_refuse_rows_they_cannot_place():
    numel = 100
    packed, vals, _ = _rows(numel, 10, 1, 0, "gaps")
    bad = packed.copy()
    bad[0, 0] = 95  # the running sum passes numel
    with pytest.raises(ValueError):
        _add_numba(torch.zeros(numel), bad, vals, "gaps")
    bits, vals, _ = _rows(numel, 10, 1, 0, "bitmap")
    with pytest.raises(ValueError):  # 10 values but more set bits
        _add_numba(torch.zeros(numel), np.full_like(bits, 255), vals, "bitmap")


def test_bitmap_kernel_refuses_a_row_whose_excess_lies_in_a_later_tile():
    """The kernel adds tile by tile (every row's first TILE_WORDS words, then the next): a row whose
    extra positions come only in its last tile is still refused."""
    from updatestore._kernels_jit import TILE_WORDS

    numel, k, n = 3 * 64 * TILE_WORDS + 40, 1000, 3
    bits, vals, _ = _rows(numel, k, n, 1, "bitmap")
    bad = bits.copy()
    free = np.flatnonzero(bad[1, -10:-2] != 255)[-1] + len(bad[1]) - 10  # a byte with a clear bit near the end
    bad[1, free] = 255
    with pytest.raises(ValueError):
        _add_numba(torch.zeros(numel), bad, vals, "bitmap")


@pytest.mark.parametrize("keep", [0.3, 0.01])
def test_amnesiac_on_a_large_layer_equals_oracle(store_path, keep):
    """A layer above the kernels' threshold (65 536 entries), bitmap (0.3) and gaps (0.01)."""
    model = make_tiny(d_in=300, hidden=256)
    assert model.fc1.weight.numel() >= 1 << 16
    ids = lambda s: np.arange(4) + 4 * (s % 3)  # noqa: E731
    with UpdateStore.create(store_path, model, keep=keep, value_dtype="float32") as store:
        oracle, all_ids = train(store, model, steps=9, batch=4, ids_fn=ids)
        assert store.layers[0].positions == ("bitmap" if keep > 0.02 else "gaps")
        expected = oracle_after(model, oracle, steps_with(all_ids, [1]), keep)
        unlearn.amnesiac(model, store, [1], block_steps=2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=2e-6)


def _layer_arrays(path):
    root = zarr.open_group(path, mode="r")
    return [root[f"layers/fc1.weight/{a}"] for a in ("values", "positions")]


@pytest.fixture(params=["pread", "zarr"])
def fetch_engine(request, monkeypatch):
    """Both ways shards are fetched: pread in the pool (local stores) and zarr's async store API (others).
    Returns what to pass ``read_rows`` as ``root`` for a store at a path."""
    if request.param == "zarr":
        monkeypatch.setattr("updatestore._reader.local_root", lambda store: None)
        return lambda path: None
    return lambda path: path


def test_shard_reader_equals_zarr(store_path, fetch_engine):
    model = make_tiny(d_in=300, hidden=256)
    with UpdateStore.create(store_path, model, keep=0.2, buffer_bytes=1 << 18) as store:
        train(store, model, steps=11, batch=4)
    arrays = _layer_arrays(store_path)
    assert ShardLayout.of(arrays[0]).shard_rows < 11  # several shards
    for rows in (np.arange(11), np.array([0, 5, 6, 10]), np.array([3])):
        got = read_rows(arrays[0].store, [ShardLayout.of(a) for a in arrays], rows, fetch_engine(store_path))
        for a, g in zip(arrays, got):
            np.testing.assert_array_equal(g, a[rows])


def test_both_fetch_engines_read_and_count_the_same_bytes(store_path, monkeypatch):
    """A local store is read with pread, others through zarr's store API: same rows, same bytes counted
    (whole shards and ranges of inner chunks alike)."""
    model = make_tiny(d_in=300, hidden=256)
    with UpdateStore.create(store_path, model, keep=0.2, buffer_bytes=1 << 18) as store:
        train(store, model, steps=11, batch=4)
    got = {}
    for engine in ("pread", "zarr"):
        if engine == "zarr":
            monkeypatch.setattr("updatestore._reader.local_root", lambda store: None)
        store = UpdateStore.open(store_path)
        for steps in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 5, 10], [3]):
            before = store.bytes_read
            rows = store.read(steps)
            got.setdefault(engine, []).append((store.bytes_read - before,
                                                {n: (r.stored.clone(), None if r.packed is None else r.packed.copy())
                                                 for n, r in rows.items()}))
    for (n_p, rows_p), (n_z, rows_z) in zip(got["pread"], got["zarr"]):
        assert n_p == n_z > 0
        for name in rows_p:
            assert torch.equal(rows_p[name][0], rows_z[name][0])
            if rows_p[name][1] is not None:
                np.testing.assert_array_equal(rows_p[name][1], rows_z[name][1])


def _corrupt(path, how):
    f = next(p for p in sorted((path / "layers/fc1.weight/positions/c").rglob("*")) if p.is_file())
    raw = bytearray(f.read_bytes())
    if how == "index":
        raw[-10] ^= 0xFF
    elif how == "truncate":
        raw = raw[: len(raw) // 2]
    elif how == "empty":
        raw = bytearray()
    elif how == "forged_header":
        # a Blosc header claiming 1 GiB, with the inner chunk's CRC32C recomputed to match
        import google_crc32c
        n = ShardLayout.of(_layer_arrays(path)[1]).chunks_per_shard
        idx = np.frombuffer(bytes(raw[-4 - 16 * n:-4]), "<u8").reshape(n, 2)
        off, nb = int(idx[0, 0]), int(idx[0, 1])
        raw[off + 4: off + 8] = (1 << 30).to_bytes(4, "little")
        raw[off + nb - 4: off + nb] = google_crc32c.value(bytes(raw[off: off + nb - 4])).to_bytes(4, "little")
    f.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["index", "truncate", "empty", "forged_header"])
def test_damaged_shards_are_a_clean_error_and_nothing_changes(store_path, how, fetch_engine):
    model = make_tiny(d_in=300, hidden=256)
    with UpdateStore.create(store_path, model, keep=0.2, buffer_bytes=1 << 18) as store:
        train(store, model, steps=4, batch=4)
    _corrupt(store_path, how)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with UpdateStore.open(store_path, "r+") as store:
        with pytest.raises(CorruptStoreError, match="fc1.weight"):
            unlearn.amnesiac(model, store, [0])
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_rows_in_absent_shards_read_as_zeros_not_leftover_memory(store_path, monkeypatch, fetch_engine):
    # read_rows fills its outputs chunk by chunk; rows no chunk covers must come back as Zarr's fill value
    model = make_tiny(d_in=300, hidden=256)
    with UpdateStore.create(store_path, model, keep=0.2, buffer_bytes=1 << 18) as store:
        train(store, model, steps=11, batch=4)
    arrays = _layer_arrays(store_path)
    lay = ShardLayout.of(arrays[0])
    (store_path / f"{lay.key(1)}").unlink()  # the second shard of values: its rows are now absent
    real_empty = np.empty
    monkeypatch.setattr(np, "empty", lambda shape, dtype=float, **kw: np.full(shape, 0xAB, dtype))
    rows = np.arange(11)
    got = read_rows(arrays[0].store, [ShardLayout.of(a) for a in arrays], rows, fetch_engine(store_path))
    monkeypatch.setattr(np, "empty", real_empty)
    hit = (rows // lay.shard_rows) == 1
    assert hit.any() and not hit.all()
    assert not got[0][hit].any()
    for a, g in zip(arrays, got):
        np.testing.assert_array_equal(g, a[rows])


def test_read_kernels_load_from_numbas_cache(tmp_path):
    """Module-level, no closure, cache=True, and a second process finds them in numba's on-disk cache."""
    import subprocess
    import sys

    from updatestore import _kernels_jit

    for kernel in (_kernels_jit.bitmap_add, _kernels_jit.gaps_add):
        assert kernel.py_func.__closure__ is None
        assert kernel._cache.__class__.__name__ == "FunctionCache"
    code = ("import numpy as np, torch\n"
            "from updatestore._kernels import _add_numba\n"
            "from updatestore import _kernels_jit as j\n"
            "out = torch.zeros(1 << 17)\n"
            "_add_numba(out, np.full((1, 1 << 14), 1, np.uint8), torch.ones(1, 1 << 14), 'bitmap')\n"
            "assert out[7::8].eq(1).all() and out.sum() == 1 << 14\n"
            "print(sum(j.bitmap_add.stats.cache_hits.values()))\n")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True) for _ in range(2)]
    assert sum(int(r.stdout.split()[-1]) for r in runs) >= 1, [r.stdout for r in runs]
