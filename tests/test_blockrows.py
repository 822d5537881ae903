"""The writer's step encoder (``_blockrows``): a whole step's flat values and positions, encoded in two
calls, against each layer encoded on its own by its codec (the per-layer encoders are the oracle)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from updatestore import UpdateStore, WriterError
from updatestore._blockrows import BlockRows, flatten
from updatestore._codecs import CorruptRowError, choose_positions, positions_codec, values_codec
from updatestore._deltas import Deltas
from updatestore._format import STATUS_RECORDED, LayerSpec
from updatestore._writer import StepRecord

from conftest import make_tiny


def _layers(sizes, keeps, encodings):
    specs, arrays = [], []
    for i, (n, keep, enc) in enumerate(zip(sizes, keeps, encodings)):
        k = max(1, min(n, int(np.ceil(keep * n))))
        positions = choose_positions(enc, keep, k, n)
        specs.append(LayerSpec(f"layer{i}", (n,), "float32", n, keep, k, positions, 8))
        codec = positions_codec(positions)
        parr = SimpleNamespace(dtype=codec.dtype(n), shape=(0, codec.width(n, k))) if codec.stored else None
        arrays.append((SimpleNamespace(dtype=None, shape=(0, k)), parr))
    return specs, arrays


@given(st.lists(st.tuples(st.integers(1, 70_000), st.sampled_from([0.01, 0.1, 0.5, 1.0]),
                          st.sampled_from(["bitmap", "gaps"])), min_size=1, max_size=5),
       st.sampled_from(["bfloat16", "float16", "float32"]), st.sampled_from(["normal", "zeros", "nonfinite"]),
       st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_a_step_encodes_as_its_layers_do_one_by_one(layers, value_dtype, kind, seed):
    rng = np.random.default_rng(seed)
    sizes, keeps, encodings = zip(*layers)
    specs, arrays = _layers(sizes, keeps, encodings)
    codec = values_codec(value_dtype)
    for _, (varr, _) in zip(specs, arrays):
        varr.dtype = codec.storage
    buf = BlockRows(specs, 4, codec, arrays)
    vals = [rng.standard_normal(s.k).astype(np.float32) * 1e-3 for s in specs]
    if kind == "zeros":
        vals = [np.where(rng.random(s.k) < 0.5, np.float32(0), np.float32(-0.0)) for s in specs]
    elif kind == "nonfinite":
        vals[-1][rng.integers(0, specs[-1].k)] = rng.choice([np.inf, -np.inf, np.nan])
    pos = [np.sort(rng.choice(s.numel, s.k, replace=False)).astype(np.int64) for s in specs]
    buf.values[0][2] = 7  # the row is rewritten whole, whatever it held
    finite, nonzero = buf.encode(2, np.concatenate(vals), np.concatenate(
        [p for p, s in zip(pos, specs) if s.positions != "dense"] or [np.zeros(0, np.int64)]))
    allv = np.concatenate(vals)
    assert finite == bool(np.isfinite(allv).all()) and nonzero == bool(allv.any())
    for i, s in enumerate(specs):
        np.testing.assert_array_equal(buf.values[i][2], codec.from_float32(vals[i]))
        pc = positions_codec(s.positions)
        if pc.stored:
            np.testing.assert_array_equal(buf.positions[i][2], pc.encode(pos[i], s.numel))
            assert buf.positions[i].dtype == pc.dtype(s.numel)
        assert not buf.values[i][[0, 1, 3]].any()  # other rows untouched
    buf.clear(2)
    assert not any(v.any() for v in buf.values) and not any(p.any() for p in buf.positions if p is not None)


@pytest.mark.parametrize("bad", ["beyond", "negative", "repeated", "descending", "count"])
def test_positions_that_are_not_a_valid_row_are_refused(bad):
    specs, arrays = _layers([100, 70_000, 300], [0.1, 0.1, 0.1], ["bitmap", "gaps", "gaps"])
    for _, (varr, _) in zip(specs, arrays):
        varr.dtype = np.dtype("uint16")
    buf = BlockRows(specs, 2, values_codec("bfloat16"), arrays)
    pos = [np.arange(s.k, dtype=np.int64) * 3 for s in specs]
    layer = {"beyond": 0, "negative": 1, "repeated": 2, "descending": 1, "count": None}[bad]
    if bad == "beyond":
        pos[0][-1] = 100
    elif bad == "negative":
        pos[1][0] = -1
    elif bad == "repeated":
        pos[2][5] = pos[2][4]
    elif bad == "descending":
        pos[1][[3, 4]] = pos[1][[4, 3]]
    else:
        pos[2] = pos[2][:-1]
    vals = np.ones(sum(s.k for s in specs), np.float32)
    match = "layers keep" if layer is None else f"layer{layer}"
    with pytest.raises(CorruptRowError, match=match):
        buf.encode(0, vals, np.concatenate(pos))


def test_a_bad_step_handed_to_the_writer_is_a_writer_error_and_commits_nothing(store_path):
    model = make_tiny()
    store = UpdateStore.create(store_path, model, keep=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = store.recorder(model, opt).attach()
    k = sum(s.k for s in store.layers)
    rec._emit(StepRecord(STATUS_RECORDED, np.arange(2, dtype=np.int64),
                         flat=(np.ones(k, np.float32), np.full(k, 10**9, dtype=np.int64))))
    with pytest.raises(WriterError, match="out of range"):
        rec.detach()
    assert UpdateStore.open(store_path).num_batches == 0


def test_fused_flat_rows_are_the_per_layer_rows_side_by_side():
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(40, 30, generator=g), torch.randn(7, generator=g), torch.randn(5000, generator=g)]
    specs = [SimpleNamespace(k=k) for k in (120, 7, 500)]  # the 7-entry layer is dense (k == numel)
    a, b = Deltas(list(zip(specs, params))), Deltas(list(zip(specs, [p.clone() for p in params])))
    for d in (a, b):
        d.snapshot()
    with torch.no_grad():
        for p, q in zip(params, b._params):
            step = torch.randn(p.shape, generator=g)
            p.add_(step), q[1].add_(step)
    vals, pos = a.pruned_flat()
    want_vals, want_pos = flatten(b.pruned())
    assert a.fused and vals.dtype == np.float32 and pos.dtype == np.int64
    np.testing.assert_array_equal(vals.view(np.int32), want_vals.view(np.int32))
    np.testing.assert_array_equal(pos, want_pos)


def test_step_encoders_can_load_from_numbas_cache():
    """Module-level, no closure, cache=True: loaded from numba's on-disk cache, not compiled per process."""
    from updatestore._codecs import _jit

    for kernel in (_jit.encode_positions, _jit.encode_bfloat16):
        assert kernel.py_func.__closure__ is None
        assert kernel._cache.__class__.__name__ == "FunctionCache"
