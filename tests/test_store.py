import math

import numpy as np
import pytest
import torch

from conftest import make_tiny, train, read_rows
from updatestore import UpdateStore


def test_keep_one_float32_reconstructs_initial_weights(store_path):
    model = make_tiny()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        train(store, model, steps=25)
        for spec in store.layers:
            assert spec.positions == "dense"
            values, pos = read_rows(store, spec.name, 0, store.num_batches)
            assert torch.equal(pos, torch.arange(spec.numel).expand(store.num_batches, spec.numel))
            param = dict(model.named_parameters())[spec.name].detach()
            back = param - values.sum(0).view(spec.shape)
            torch.testing.assert_close(back, init[spec.name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep,positions", [(0.1, "bitmap"), (0.1, "gaps"), (0.01, "auto"), (0.5, "auto")])
def test_stored_entries_are_topk_of_true_update(store_path, keep, positions):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=keep, value_dtype="float32", positions=positions) as store:
        oracle, _ = train(store, model, steps=12, momentum=0.9)
        for spec in store.layers:
            assert spec.k == max(1, math.ceil(round(keep * spec.numel, 9)))
            values, pos = read_rows(store, spec.name, 0, 12)
            assert values.shape == (12, spec.k) and pos.shape == (12, spec.k)
            for step in range(12):
                true = oracle[step][spec.name].flatten()
                p = pos[step]
                assert torch.all(p[1:] > p[:-1])  # sorted, unique
                torch.testing.assert_close(values[step], true[p], rtol=0, atol=0)
                rest = torch.ones_like(true, dtype=torch.bool)
                rest[p] = False
                if rest.any():  # top-k up to ties: every kept |Δ| ≥ every dropped |Δ|
                    assert values[step].abs().min() >= true[rest].abs().max()


@pytest.mark.parametrize("dtype,rel", [("bfloat16", 2**-8), ("float16", 2**-11)])
def test_half_precision_values_within_rounding(store_path, dtype, rel):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype=dtype) as store:
        oracle, _ = train(store, model, steps=6)
        for spec in store.layers:
            values, _ = read_rows(store, spec.name, 0, 6)
            true = torch.stack([o[spec.name].flatten() for o in oracle])
            err = (values - true).abs()
            # round-to-nearest: relative error ≤ 2^-(mantissa bits + 1); float16 also has subnormals
            tol = rel * true.abs() + (0 if dtype == "bfloat16" else 2**-24)
            assert torch.all(err <= tol)


def test_bfloat16_keeps_tiny_updates_that_float16_flushes(tmp_path):
    # SGD steps this small are common late in training
    tiny_step = torch.tensor([1e-9, -2e-8, 2e-10])
    got = {}
    for dtype in ("bfloat16", "float16"):
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)  # so that float32 holds θ + Δθ exactly
        with UpdateStore.create(tmp_path / dtype, model, keep=1.0, value_dtype=dtype) as store:
            with store.recorder(model) as rec:
                with torch.no_grad():
                    model.weight += tiny_step
                rec.step([0])
            got[dtype] = store.read([0])["weight"].values[0]
    assert torch.all(got["bfloat16"] != 0)
    assert torch.all(got["float16"] == 0)


def test_reopen_reads_identical_data(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.2) as store:
        train(store, model, steps=10)
        before = {s.name: read_rows(store, s.name, 0, 10) for s in store.layers}
        ids_before = [store.samples_in(i) for i in range(10)]
    with UpdateStore.open(store_path) as again:
        assert again.num_batches == 10 and again.num_samples == 80
        for s in again.layers:
            v, p = read_rows(again, s.name, 0, 10)
            assert torch.equal(v, before[s.name][0]) and torch.equal(p, before[s.name][1])
        for i in range(10):
            np.testing.assert_array_equal(again.samples_in(i), ids_before[i])


def test_append_after_reopen_continues_numbering(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.3, value_dtype="float32") as store:
        first, _ = train(store, model, steps=7)
    with UpdateStore.open(store_path, "r+") as store:
        second, _ = train(store, model, steps=5, seed=1, ids_fn=lambda s: [1000 + s])
        assert store.num_batches == 12
        assert store.batches_containing([1003]).tolist() == [10]
        oracle = first + second
        v, p = read_rows(store, "fc2.weight", 0, 12)
        for step in range(12):
            torch.testing.assert_close(v[step], oracle[step]["fc2.weight"].flatten()[p[step]], rtol=0, atol=0)


def test_many_blocks_and_partial_flush(store_path):
    model = make_tiny()
    # A tiny buffer forces several blocks (shards) and a partial last block.
    with UpdateStore.create(store_path, model, keep=0.5, value_dtype="float32", buffer_bytes=2**16) as store:
        block = store.meta["block_steps"]
        steps = 2 * block + 3
        oracle, _ = train(store, model, steps=steps)
        v, p = read_rows(store, "fc1.weight", 0, steps)
        for step in (0, block - 1, block, steps - 1):
            torch.testing.assert_close(v[step], oracle[step]["fc1.weight"].flatten()[p[step]], rtol=0, atol=0)


def test_gradient_accumulation_merges_ids_into_one_step(store_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(store_path, model) as store:
        with store.recorder(model, opt) as rec:
            opt.zero_grad()
            for micro, ids in enumerate(([1, 2], [3, 4], [5, 6])):
                with rec.batch(ids, accumulate=micro < 2):
                    model(torch.randn(2, 12)).sum().backward()
                    if micro == 2:
                        opt.step()
        assert store.num_batches == 1
        assert sorted(store.samples_in(0).tolist()) == [1, 2, 3, 4, 5, 6]


def test_skipped_steps_are_recorded_as_skipped(store_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(store_path, model) as store:
        with store.recorder(model, opt) as rec:
            with rec.batch([1]):  # like GradScaler skipping optimizer.step() on inf
                model(torch.randn(1, 12)).sum().backward()
            with rec.batch([2]):  # a step that changes nothing
                opt.zero_grad()
                opt.step()
            with rec.batch([3]):
                opt.zero_grad(); model(torch.randn(1, 12)).sum().backward(); opt.step()
        assert store.step_status().tolist() == [0, 0, 1]
        assert store.batches_containing([1, 2]).tolist() == [0, 1]
        assert store.footprint().stored_steps == 1


def test_watch_stores_only_steps_with_watched_samples(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, value_dtype="float32") as store:
        oracle, _ = train(store, model, steps=10, watch=[17, 50])  # ids 8s..8s+7: steps 2 and 6
        assert store.step_status().tolist() == [2, 2, 1, 2, 2, 2, 1, 2, 2, 2]
        assert store.num_samples == 80  # every step is still indexed
        v, p = read_rows(store, "fc2.bias", 6, 7)
        torch.testing.assert_close(v[0], oracle[6]["fc2.bias"].flatten()[p[0]], rtol=0, atol=0)


def test_manual_step_path(store_path):
    model = make_tiny()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        with store.recorder(model) as rec:
            for s in range(3):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01 * (s + 1))
                rec.step([s])
        v, _ = read_rows(store, "fc1.bias", 0, 3)
        torch.testing.assert_close(v.sum(0), model.fc1.bias.detach() - init["fc1.bias"])
        assert store.batches_containing([2]).tolist() == [2]


def test_per_layer_keep_mapping(store_path):
    model = make_tiny()
    store = UpdateStore.create(store_path, model, keep={"fc1.weight": 0.05, "*.bias": 1.0, "*": 0.5})
    ks = {s.name: (s.keep, s.k) for s in store.layers}
    assert ks == {"fc1.weight": (0.05, 24), "fc1.bias": (1.0, 40), "fc2.weight": (0.5, 60), "fc2.bias": (1.0, 3)}
    meta = store.meta
    assert meta["format_version"] == 2 and meta["value_dtype"] == "bfloat16"
    assert [layer["name"] for layer in meta["layers"]] == list(ks)


def test_footprint_against_full_log(store_path):
    model = make_tiny(hidden=400)
    with UpdateStore.create(store_path, model, keep=0.1) as store:
        train(store, model, steps=40)
        fp = store.footprint()
    n = sum(p.numel() for p in model.parameters())
    assert fp.full_log_bytes == 40 * n * 4 and fp.stored_steps == 40
    assert fp.total_bytes >= sum(fp.layer_bytes.values()) + fp.index_bytes
    assert 0 < fp.ratio < 0.2
    assert "full amnesiac log" in str(fp) and "fc1.weight" in str(fp)


def test_sorted_index_is_persisted_and_extended(persist_small, store_path):
    import zarr

    model = make_tiny()
    with UpdateStore.create(store_path, model) as store:
        train(store, model, steps=10, ids_fn=lambda s: [s, 1000 + s])
    record = dict(zarr.open_group(store_path, mode="r")["index"].attrs)
    assert record["steps"] == 10 and record["samples"] == 20
    with UpdateStore.open(store_path, "r+") as store:  # a small tail is merged, not persisted again
        train(store, model, steps=2, seed=3, ids_fn=lambda s: [50 + s])
        assert store.batches_containing([51, 3]).tolist() == [3, 11]
    assert dict(zarr.open_group(store_path, mode="r")["index"].attrs)["steps"] == 10
    with UpdateStore.open(store_path) as again:
        assert again.batches_containing([51, 1003, 7]).tolist() == [3, 7, 11]


def test_the_sorted_index_is_written_only_past_the_threshold(store_path, monkeypatch):
    """A close writes the sorted index once an open would have to sort PERSIST_MIN_SAMPLES IDs; below,
    the open sorts them (queries equal a brute-force scan either way)."""
    import zarr

    import updatestore._index
    from conftest import steps_with

    monkeypatch.setattr(updatestore._index, "PERSIST_MIN_SAMPLES", 50)
    model = make_tiny()
    with UpdateStore.create(store_path, model) as store:
        _, ids = train(store, model, steps=6, ids_fn=lambda s: np.arange(8) + 5 * s)  # 48 IDs
    assert dict(zarr.open_group(store_path, mode="r")["index"].attrs)["samples"] == 0  # covers nothing
    with UpdateStore.open(store_path, "r+") as store:
        _, more = train(store, model, steps=2, seed=1, ids_fn=lambda s: np.arange(8) + 100 + s)  # 64 IDs
        ids += more
    assert dict(zarr.open_group(store_path, mode="r")["index"].attrs)["samples"] == 64
    with UpdateStore.open(store_path) as again:
        for q in ([0], [7, 12], [100, 108, 999]):
            assert again.batches_containing(q).tolist() == steps_with(ids, q)
