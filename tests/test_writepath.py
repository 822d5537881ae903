"""The recording hot path: the fused CPU top-k (``_select``) against a sort oracle, and shard files
written directly (``write_shards``) against zarr-python reading them."""

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from updatestore import UpdateStore
from updatestore._format.shards import ShardLayout, read_rows, write_shards
from updatestore._pruning import radix_select
import updatestore._select as _select
from updatestore._select import HISTOGRAM_MIN_NUMEL, SAMPLE_STRIDE, SAMPLED_MIN_NUMEL, select_segments

from conftest import make_tiny, train


def oracle(seg: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest |x| (ties: lower position first), ascending."""
    mag = (seg.view(np.int32) & 0x7FFFFFFF).astype(np.int64)
    return np.sort(np.lexsort((np.arange(len(seg)), -mag))[:k])


def assert_exact_topk(delta: np.ndarray, sizes: np.ndarray, ks: np.ndarray) -> None:
    """``select_segments`` gives every segment's oracle top-k, positions and values; with ``negate`` the same
    positions and ``0 − value`` bit for bit, as NumPy computes it (zeros +0.0, NaN kept NaN)."""
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pos, vals = select_segments(delta, starts, sizes, ks)
    npos, nvals = select_segments(delta, starts, sizes, ks, negate=True)
    np.testing.assert_array_equal(npos, pos)
    np.testing.assert_array_equal(nvals.view(np.int32), np.subtract(np.float32(0), vals).view(np.int32))
    o = 0
    for s, n, k in zip(starts, sizes, ks):
        want = oracle(delta[s:s + n], k)
        np.testing.assert_array_equal(pos[o:o + k], want)
        np.testing.assert_array_equal(vals[o:o + k], delta[s:s + n][want])
        o += k


@given(st.lists(st.integers(2, 3000), min_size=1, max_size=4), st.integers(0, 2**31), st.sampled_from(
    ["normal", "ties", "zeros", "special"]))
@settings(max_examples=150, deadline=None)
def test_fused_topk_equals_a_sort_oracle(sizes, seed, kind):
    rng = np.random.default_rng(seed)
    sizes = np.array(sizes)
    ks = np.array([rng.integers(1, s) for s in sizes])
    delta = rng.standard_normal(int(sizes.sum())).astype(np.float32)
    if kind == "ties":
        delta = np.round(delta, 1).astype(np.float32)
    elif kind == "zeros":
        delta[rng.random(delta.size) < 0.7] = 0
    elif kind == "special":
        delta[rng.integers(0, delta.size, 5)] = [np.inf, -np.inf, -0.0, np.nan, -np.nan]
    assert_exact_topk(delta, sizes, ks)


def test_fused_topk_on_large_layers_equals_radix_select():
    rng = np.random.default_rng(0)
    for n in (HISTOGRAM_MIN_NUMEL, 300_001):
        delta = rng.standard_normal(n).astype(np.float32)
        delta[::7] = np.round(delta[::7], 2)  # ties at the threshold too
        for k in (1, n // 10, n - 1):
            pos, vals = select_segments(delta, np.array([0]), np.array([n]), np.array([k]))
            np.testing.assert_array_equal(pos, radix_select(torch.from_numpy(delta), k).numpy())
            np.testing.assert_array_equal(vals, delta[pos])


def _sampled(n: int) -> np.ndarray:
    """The positions the sampled select looks at in an ``n``-entry layer."""
    from updatestore._select_jit import sample_at, stride_for

    s = stride_for(n, SAMPLE_STRIDE)
    return sample_at(n // s, s)


def _large(kind: str, n: int, rng) -> np.ndarray:
    x = rng.standard_normal(n).astype(np.float32)
    if kind == "ties":
        x = np.round(x, 1).astype(np.float32)
    elif kind == "zeros":  # most entries unchanged: the threshold can be 0
        x[rng.random(n) < 0.95] = 0
    elif kind == "sample_too_low":  # every sampled entry tiny: the bound lets nearly everything in (overflow)
        x[_sampled(n)] = 1e-30
    elif kind == "sample_too_high":  # every sampled entry huge: fewer than k entries reach the bound
        x[_sampled(n)] = 1e30
    elif kind == "ties_at_bound":  # the bound is the threshold: fewer than k above it, the rest tied at it
        x = np.where(rng.random(n) < 0.5, 2.0, 1.0).astype(np.float32)
    elif kind == "sorted":
        x = np.sort(np.abs(x))
    return x


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "sample_too_low", "sample_too_high", "sorted",
                                  "ties_at_bound"])
@pytest.mark.parametrize("keep", [1e-5, 0.1, 0.5, 0.97])
def test_sampled_one_pass_select_is_exact(kind, keep):
    """Large layers take the sampled one-pass select, and fall back to the full passes when the
    sample misleads it (both directions forced here): either way the exact top-k, ties in position order."""
    rng = np.random.default_rng(7)
    sizes = np.array([SAMPLED_MIN_NUMEL, SAMPLED_MIN_NUMEL + 12345, 1000])
    delta = np.concatenate([_large(kind, int(n), rng) for n in sizes])
    ks = np.maximum(1, np.minimum(sizes - 1, np.ceil(sizes * keep).astype(np.int64)))
    assert_exact_topk(delta, sizes, ks)


def test_sampled_select_takes_its_one_pass_on_structured_tied_updates():
    """Real Δθ is quantised by θ's float32 spacing (heavy ties) and structured by the layout (entries
    at fixed offsets in every row scale together): the sample must neither alias with the rows (a fixed
    stride would see only the damped entries here and overflow) nor overflow on ties,
    or every step pays the three-pass fallback (measured: 13 vs 4 ms on a 2M-entry layer)."""
    from updatestore._select_jit import sampled, stride_for

    rng = np.random.default_rng(5)
    rows, width = 512, 2304  # (out, in × 3 × 3) of a 256-channel 3×3 conv
    scale = np.where(np.arange(width) % 128 < 4, 0.01, 1.0)  # damped where a fixed stride of 128 would look
    theta = (rng.standard_normal((rows, width)) * 0.05).astype(np.float32)
    step = (rng.standard_normal((rows, width)) * 1e-4 * scale).astype(np.float32)
    delta = ((theta + step) - theta).reshape(-1)  # quantised as θ_new − θ_old is
    delta[rng.random(delta.size) < 0.5] = 0  # dead units: unchanged entries
    n, k = delta.size, delta.size // 10
    assert len(np.unique(np.abs(delta))) < n // 5  # heavily tied
    pos, vals = np.empty(k, np.int64), np.empty(k, np.float32)
    assert sampled(delta.view(np.int32), delta, 0, n, k, 0, pos, vals, HISTOGRAM_MIN_NUMEL, stride_for(n, SAMPLE_STRIDE),
                   False)
    np.testing.assert_array_equal(pos, oracle(delta, k))


def test_parallel_select_equals_one_thread(monkeypatch):
    rng = np.random.default_rng(3)
    sizes = np.array([700_000, 300_000, 80_000, 5_000, 17])
    delta = rng.standard_normal(int(sizes.sum())).astype(np.float32)
    ks = np.ceil(sizes * 0.1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    assert sizes.sum() >= _select.PARALLEL_MIN_NUMEL
    both = select_segments(delta, starts, sizes, ks)
    monkeypatch.setattr(_select, "workers", lambda: 1)
    one = select_segments(delta, starts, sizes, ks)
    for a, b in zip(both, one):
        np.testing.assert_array_equal(a, b)
    assert [len(g) for g in _select._groups(sizes, 2)] == [1, 4]  # the largest alone, the rest together


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_shards_written_directly_read_back_through_zarr(tmp_path, rows):
    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    from zarr.codecs import BloscCodec, Crc32cCodec

    arr = root.create_array("a", shape=(0, 37), dtype="uint16", chunks=(4, 37), shards=(16, 37),
                            compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec()],
                            fill_value=0)
    data = np.random.default_rng(rows).integers(0, 2**16, (16 + rows, 37)).astype(np.uint16)
    data[2] = 0  # an all-zero row is still written (its chunk exists)
    arr.resize((16 + rows, 37))
    lay = ShardLayout.of(arr)
    write_shards(root.store, [(lay, 0, data[:16]), (lay, 16, data[16:])])
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "z.zarr"), mode="r")["a"][:], data)
    assert len([f for f in (tmp_path / "z.zarr" / "a" / "c").rglob("*") if f.is_file()]) == 2  # a file a shard
    got = read_rows(root.store, [ShardLayout.of(arr)], np.arange(16 + rows))[0]
    np.testing.assert_array_equal(got, data)
    with pytest.raises(ValueError, match="start of a shard"):
        write_shards(root.store, [(lay, 3, data[:2])])


def test_recording_is_the_same_with_the_fused_path_and_per_layer_pruning(store_path, monkeypatch):
    """The CPU recorder (flat buffer, compiled top-k, shards written directly) stores what the
    per-layer torch path stores (the path a GPU takes), row for row."""
    import updatestore._deltas as deltas

    stores = []
    for fused in (True, False):
        monkeypatch.setattr(deltas, "fusable", lambda tensors: fused)  # False: the GPU's per-layer path
        model = make_tiny()
        store = UpdateStore.create(store_path.parent / f"s{fused}.zarr", model, keep=0.3, value_dtype="float32")
        train(store, model, steps=12)
        stores.append(store)
    a, b = stores
    steps = np.arange(a.num_batches)
    for spec in a.layers:
        ra, rb = a.read(steps, [spec.name])[spec.name], b.read(steps, [spec.name])[spec.name]
        np.testing.assert_array_equal(ra.values.numpy(), rb.values.numpy())
        # tie order may differ (torch.topk); these updates have no ties at the threshold
        np.testing.assert_array_equal(ra.positions.numpy(), rb.positions.numpy())


def test_select_kernels_can_load_from_numbas_cache():
    """numba keys its on-disk cache by a function's closure, and a closure over another compiled
    function pickles differently in every process: such kernels were compiled anew (≈ 15 s) by every
    process. The select kernels are module-level functions with no closure."""
    from updatestore import _select_jit

    for kernel in (_select_jit.select, _select_jit.sampled, _select_jit.threshold, _select_jit.emit,
                   _select_jit.sample_at, _select_jit.stride_for):
        assert kernel.py_func.__closure__ is None
        assert kernel._cache.__class__.__name__ == "FunctionCache"  # cache=True


@pytest.mark.parametrize("dense", [True, False])
def test_fused_deltas_are_after_minus_before_bit_for_bit(dense):
    """The fused CPU path computes −Δθ in place and negates the kept values (in the select kernel when
    every layer is sparse, with NumPy when a dense layer is there): every kept value must be ``after −
    before`` bit for bit (an unchanged entry +0.0, never −0.0), a strided parameter flattened in its
    logical order, a dense layer whole."""
    from types import SimpleNamespace

    from updatestore._deltas import Deltas

    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    params = [base.t(), torch.randn(7, generator=g), torch.randn(5000, generator=g)]  # base.t(): strided
    specs = [SimpleNamespace(k=k) for k in (120, 7 if dense else 6, 500)]  # k == numel: a dense layer
    d = Deltas(list(zip(specs, params)))
    d.snapshot()
    before = [p.clone() for p in params]
    with torch.no_grad():
        params[0].add_(torch.randn(30, 40, generator=g) * (torch.rand(30, 40, generator=g) < 0.05))
        params[1][3] += 1.5  # the other six entries unchanged: their Δ is +0.0
        params[2].mul_(1.001)
    rows = d.pruned()
    for (vals, pos), b, a in zip(rows, before, params):
        want = (a - b).reshape(-1)
        got_pos = torch.arange(want.numel()) if pos is None else pos
        assert torch.equal(vals.view(torch.int32), want[got_pos].view(torch.int32))
    assert (rows[1][1] is None) == dense
    assert (rows[1][0].view(torch.int32) == 0).sum() == 6 - (not dense)  # +0.0, not −0.0
    assert torch.equal(rows[0][1], torch.sort((params[0] - before[0]).reshape(-1).abs(), descending=True,
                                              stable=True).indices[:120].sort().values)


@pytest.mark.parametrize("fused", [True, False])
def test_deltas_follow_a_parameter_whose_tensor_was_replaced(monkeypatch, fused):
    """The recorder keeps the Parameter objects, not their tensors of the moment: code that swaps a
    parameter's tensor (``p.data = ...``, as dtype or device moves and some pruning libraries do) between
    the snapshot and the step still gets that step's Δθ, never a stale zero."""
    from types import SimpleNamespace

    import updatestore._deltas as deltas

    monkeypatch.setattr(deltas, "fusable", lambda tensors: fused)
    g = torch.Generator().manual_seed(5)
    p = torch.nn.Parameter(torch.randn(300, generator=g))
    d = deltas.Deltas([(SimpleNamespace(k=30), p)])
    d.snapshot()
    before = p.detach().clone()
    with torch.no_grad():
        p.data = p.data.clone()  # a new tensor under the same Parameter
        p.add_(torch.randn(300, generator=g))
    vals, pos = d.pruned()[0]
    want = (p.detach() - before)
    assert torch.equal(pos, torch.sort(want.abs(), descending=True, stable=True).indices[:30].sort().values)
    assert torch.equal(vals, want[pos])
