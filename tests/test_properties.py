"""Property tests: codecs round-trip against numpy oracles, the inverse index equals a brute-force scan.

Codecs are reached through their registry (``updatestore._codecs``), the interface a
new encoding plugs into; pruning and the index through the modules that own them.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from updatestore import kept_count
from updatestore._codecs import CorruptRowError, positions_codec, values_codec
from updatestore._index import SampleIndex
from updatestore._pruning import prune_topk, radix_select
from updatestore._reader import read_plan

BITMAP, GAPS = positions_codec("bitmap"), positions_codec("gaps")


def encode_bitmap(rows, numel):
    """Oracle: numpy's own bit packing of a 0/1 row per step."""
    dense = np.zeros((len(rows), numel), dtype=np.uint8)
    np.put_along_axis(dense, np.asarray(rows), 1, axis=1)
    return np.packbits(dense, axis=1)


def encode_gaps(rows, numel):
    """Oracle: first position absolute, then differences."""
    rows = np.asarray(rows, dtype=np.int64)
    return np.concatenate([rows[:, :1], np.diff(rows, axis=1)], axis=1).astype(GAPS.dtype(numel))


def decode_bitmap(rows, numel, k):
    return BITMAP.decode(rows, numel, k)


def decode_gaps(rows, numel):
    return GAPS.decode(rows, numel, rows.shape[1])


def values_to_numpy(t, dtype):
    return values_codec(dtype).from_float32(t.numpy())


def values_from_numpy(a, dtype):
    return values_codec(dtype).to_torch(a)


@st.composite
def position_rows(draw):
    numel = draw(st.integers(1, 70000))
    k = draw(st.integers(1, min(numel, 50)))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    rows = np.stack([np.sort(rng.choice(numel, size=k, replace=False)) for _ in range(n)])
    return rows, numel, k


@given(position_rows())
@settings(max_examples=60, deadline=None)
def test_gaps_round_trip(case):
    rows, numel, _ = case
    np.testing.assert_array_equal(decode_gaps(encode_gaps(rows, numel), numel), rows)
    np.testing.assert_array_equal(np.stack([GAPS.encode(r, numel) for r in rows]),
                                  encode_gaps(rows, numel))


@given(position_rows())
@settings(max_examples=60, deadline=None)
def test_bitmap_round_trip(case):
    rows, numel, k = case
    bm = np.stack([BITMAP.encode(r, numel) for r in rows])
    assert bm.shape == (len(rows), (numel + 7) // 8)
    np.testing.assert_array_equal(decode_bitmap(bm, numel, k), rows)
    np.testing.assert_array_equal(bm, encode_bitmap(rows, numel))  # agrees with numpy's own bit packing


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64),
       st.sampled_from(["bfloat16", "float16", "float32"]))
@settings(max_examples=80, deadline=None)
def test_values_round_trip_matches_torch_cast(vals, dtype):
    t = torch.tensor(vals, dtype=torch.float32)
    back = values_from_numpy(values_to_numpy(t, dtype), dtype)
    want = t.to(getattr(torch, dtype)).float()
    assert torch.equal(back, want)  # the writer's numpy cast rounds exactly as torch does (to nearest even)


@given(st.integers(1, 300), st.integers(1, 50), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_prune_topk_is_topk(numel, k, seed):
    k = min(k, numel)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) > 0.3)
    vals, pos = prune_topk(x, k)
    if pos is None:
        assert k == numel and torch.equal(vals, x)
        return
    assert len(pos) == k and torch.all(pos[1:] > pos[:-1]) and torch.equal(vals, x[pos])
    rest = torch.ones(numel, dtype=torch.bool)
    rest[pos] = False
    if rest.any():
        assert vals.abs().min() >= x[rest].abs().max()


@st.composite
def step_tables(draw):
    n_steps = draw(st.integers(0, 40))
    universe = draw(st.integers(1, 60))
    ids = [draw(st.lists(st.integers(-5, universe), min_size=1, max_size=8)) for _ in range(n_steps)]
    query = draw(st.lists(st.integers(-10, universe + 5), max_size=12))
    return ids, query


@given(step_tables())
@settings(max_examples=150, deadline=None)
def test_index_equals_brute_force(case):
    steps, query = case
    flat = np.array([i for s in steps for i in s], dtype=np.int64)
    ends = np.cumsum([len(s) for s in steps]).astype(np.int64)
    index = SampleIndex(flat, ends)
    brute = sorted({s for s, ids in enumerate(steps) if set(ids) & set(query)})
    assert index.batches_containing(query).tolist() == brute
    assert index.contains(query).tolist() == [any(q in s for s in steps) for q in query]
    for s, ids in enumerate(steps):
        assert index.samples_in(s).tolist() == ids
    chosen = np.array(brute, dtype=np.int64)
    assert index.samples_in_steps(chosen).tolist() == [i for s in brute for i in steps[s]]
    # built incrementally: a sorted prefix (as persisted in the store) plus the tail
    for n0 in {0, len(steps) // 2, len(steps)}:
        prefix = SampleIndex(flat[: int(ends[n0 - 1]) if n0 else 0], ends[:n0])
        grown = SampleIndex(flat, ends, presorted=(prefix.sorted_ids, prefix.sorted_steps, n0))
        assert grown.batches_containing(query).tolist() == brute
        assert np.array_equal(grown.sorted_ids, index.sorted_ids)


def test_bitmap_decode_rejects_unbalanced_rows():
    import pytest

    bm = encode_bitmap(np.array([[1, 5], [2, 9]]), 12)
    bad = bm.copy()
    bad[0, 0] |= 0b00000010  # a third bit in row 0 ...
    bad[1] = encode_bitmap(np.array([[2]]), 12)[0]  # ... one bit in row 1: same total, wrong rows
    with pytest.raises(CorruptRowError):
        decode_bitmap(bad, 12, 2)
    pad = bm.copy()
    pad[0, 1] |= 0b00000001  # a bit in the padding after entry 11
    with pytest.raises(CorruptRowError):
        decode_bitmap(pad, 12, 2)


@given(st.integers(1, 3000), st.floats(0.0001, 1.0), st.integers(0, 2**31), st.sampled_from(["normal", "ties", "zeros"]))
@settings(max_examples=120, deadline=None)
def test_radix_select_is_topk(numel, keep, seed, kind):
    k = kept_count(keep, numel)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    if kind == "ties":  # few distinct magnitudes, both signs: many ties at the threshold
        x = torch.randint(-3, 4, (numel,), generator=g).float() * 0.25
    elif kind == "zeros":
        x = x * (torch.rand(numel, generator=g) > 0.9)
    pos = radix_select(x, k)
    assert len(pos) == k and (len(pos) < 2 or torch.all(pos[1:] > pos[:-1]))
    rest = torch.ones(numel, dtype=torch.bool)
    rest[pos] = False
    if rest.any():
        assert x[pos].abs().min() >= x[rest].abs().max()


@given(position_rows())
@settings(max_examples=60, deadline=None)
def test_encoders_match_numpy_oracles(case):
    rows, numel, _ = case
    for row in rows:
        np.testing.assert_array_equal(BITMAP.encode(row, numel), encode_bitmap(row[None], numel)[0])
        np.testing.assert_array_equal(GAPS.encode(row, numel), encode_gaps(row[None], numel)[0])


@given(st.lists(st.integers(0, 300), min_size=1, max_size=40, unique=True), st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_read_plan_selects_exactly_the_steps(steps, chunk_rows):
    sel = np.array(sorted(steps))
    spans, keep = read_plan(sel, chunk_rows)
    rows = np.concatenate([np.arange(s.start, s.stop) for s in spans])
    got = rows if keep is None else rows[keep]
    np.testing.assert_array_equal(got, sel)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from updatestore import UpdateStore

    model = torch.nn.Linear(64, 64)
    store = UpdateStore.create(tmp_path_factory.mktemp("g") / "s.zarr", model, keep=1.0, buffer_bytes=1 << 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with store.recorder(model, opt) as rec:
        for i in range(40):
            with rec.batch([i]):
                opt.zero_grad()
                model(torch.randn(4, 64)).square().mean().backward()
                opt.step()
    yield store
    store.close()


@given(st.lists(st.integers(0, 39), unique=True, min_size=1), st.integers(1, 12))
@settings(max_examples=120, deadline=None)
def test_read_groups_cut_at_shards(small_shards, steps, max_steps):
    store = small_shards
    block = store._meta["block_steps"]
    assert 1 < block < 40  # several shards, several steps each
    steps = np.sort(np.array(steps))
    groups = store.read_groups(steps, max_steps)
    np.testing.assert_array_equal(np.concatenate(groups), steps)
    assert all(1 <= len(g) <= max_steps for g in groups)
    rows = store._table.rows
    shards = [set((rows[g] // block).tolist()) for g in groups]
    for i in range(len(groups) - 1):  # a shard in two groups only if it alone holds more than max_steps
        for s in shards[i] & shards[i + 1]:
            assert np.sum(rows[steps] // block == s) > max_steps
    from updatestore import ConfigError, StepError

    with pytest.raises(ConfigError, match="max_steps"):
        store.read_groups(steps, 0)
    if len(steps) > 1:
        with pytest.raises(StepError, match="sorted"):
            store.read_groups(steps[::-1], max_steps)


def _one_layer(numel: int, k: int, positions: str, value_dtype: str):
    from types import SimpleNamespace

    from updatestore._blockrows import BlockRows
    from updatestore._format import LayerSpec

    codec = positions_codec(positions)
    spec = LayerSpec("w", (numel,), "float32", numel, k / numel, k, positions, 8)
    arrays = [(SimpleNamespace(dtype=values_codec(value_dtype).storage, shape=(0, k)),
               SimpleNamespace(dtype=codec.dtype(numel), shape=(0, codec.width(numel, k))) if codec.stored else None)]
    return BlockRows([spec], 1, values_codec(value_dtype), arrays)


@given(st.integers(8 * 2**15, 8 * 2**15 + 77), st.floats(0.0, 1.0), st.integers(0, 2**31))
@settings(max_examples=25, deadline=None)
def test_compiled_bitmap_packing_equals_numpy_packbits(numel, keep, seed):
    """The writer packs a step's bitmaps with a compiled kernel: byte-identical to np.packbits of the mask."""
    rng = np.random.default_rng(seed)
    k = max(1, int(keep * numel))
    pos = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    mask = np.zeros(-(-numel // 8) * 8, dtype=bool)
    mask[pos] = True
    buf = _one_layer(numel, k, "bitmap", "float32")
    buf.positions[0][0] = 0xFF  # every byte is rewritten, zeros included
    buf.encode(0, np.ones(k, np.float32), pos)
    assert np.array_equal(buf.positions[0][0], np.packbits(mask))


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64), st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_compiled_bfloat16_rounding_equals_torch(head, seed):
    """Values are rounded to bfloat16 by a compiled kernel (the writer) and by NumPy (``from_float32``): both
    bit-identical to torch's float32 → bfloat16 cast (round to nearest even), with ties, subnormals,
    infinities and overflow drawn among them."""
    rng = np.random.default_rng(seed)
    n = 4096
    a = rng.standard_normal(n).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 38, n)
    a[: len(head)] = head
    a[-4:] = [np.float32(1 + 2**-8), np.float32(1 + 3 * 2**-8), np.float32(3.3895314e38), np.float32(-np.inf)]
    want = torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(values_codec("bfloat16").from_float32(a), want)
    buf = _one_layer(n, n, "dense", "bfloat16")
    assert buf.encode(0, a, np.zeros(0, np.int64)) == (False, True)  # -inf: not finite
    assert np.array_equal(buf.values[0][0], want)
