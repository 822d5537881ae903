"""Keep chosen at deletion time, and the automatic choice (issue: forgetting control)."""

import importlib

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny, train
from updatestore import ConfigError, UpdateStore

am = importlib.import_module("unlearn.amnesiac")


def _ids(s):
    return np.arange(8) + 8 * (s % 5)


def _oracle(model, oracle, all_ids, forget, keep):
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for delta, ids in zip(oracle, all_ids):
        if np.isin(ids, forget).any():
            for name, d in delta.items():
                flat = d.flatten()
                k = max(1, int(np.ceil(round(keep * flat.numel(), 9))))
                kept = torch.zeros_like(flat)
                idx = flat.abs().topk(k).indices
                kept[idx] = flat[idx]
                out[name] -= kept.view_as(d)
    return out


@pytest.mark.parametrize("recorded,keep", [(0.5, 0.1), (1.0, 0.05), (0.3, 0.3)])
def test_deletion_time_keep_equals_pruning_the_dense_oracle(store_path, recorded, keep):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=recorded, value_dtype="float32") as store:
        oracle, all_ids = train(store, model, steps=15, ids_fn=_ids)
        expected = _oracle(model, oracle, all_ids, [4], keep)
        report = unlearn.amnesiac(model, store, [4], keep=keep)
    assert report.kept["fc1.weight"] == int(np.ceil(round(keep * 480, 9)))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=2e-6)


def test_asking_more_than_recorded_is_a_clear_error(store_path):
    model = make_tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with UpdateStore.create(store_path, model, keep=0.1) as store:
        train(store, model, steps=3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(ConfigError, match=r"keep 0.2 for layer 'fc1.weight' asks for 96 entries per step, "
                                              r"but store .* recorded only 48 \(keep 0.1\); choose keep ≤ 0.1"):
            unlearn.amnesiac(model, store, [0], keep=0.2)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_one_pass_multi_ratio_sums_equal_separate_passes(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.5, value_dtype="float32") as store:
        train(store, model, steps=12, ids_fn=_ids)
        pairs = store.check_model(model)
        steps = np.array([0, 2, 3, 7, 11])
        ks = [am._counts_for(store, pairs, r) for r in (0.5, 0.2, 0.05)]
        together = am._accumulate(store, pairs, steps, torch.device("cpu"), 4, ks=ks)
        for k, sums in zip(ks, together):
            (alone,) = am._accumulate(store, pairs, steps, torch.device("cpu"), 4, ks=[k])
            for a, b in zip(sums, alone):
                assert torch.equal(a, b)


def test_auto_keep_picks_a_candidate_that_meets_the_target(store_path):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = make_tiny()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = TensorDataset(x, y, torch.arange(200))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        with store.recorder(model, opt) as rec:
            for epoch in range(15):
                for b in range(0, 200, 20):
                    with rec.batch(torch.arange(b, b + 20)):
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(model(x[b:b + 20]), y[b:b + 20]).backward()
                        opt.step()
        forget = torch.utils.data.Subset(data, list(range(20)))
        validation = TensorDataset(*(t[100:] for t in data.tensors))
        report = unlearn.amnesiac(model, store, list(range(20)), keep="auto", forget=forget,
                                  validation=validation, target=0.5, candidates=(1.0, 0.3, 0.1, 0.01))
    table = report.candidates
    assert [row["keep"] for row in table] == [1.0, 0.3, 0.1, 0.01]
    chosen = [row for row in table if row.get("chosen")]
    assert len(chosen) == 1
    meeting = [row for row in table if row["meets_target"]]
    if meeting:  # the best validation accuracy among those that forget enough
        assert chosen[0]["validation_accuracy"] == max(r["validation_accuracy"] for r in meeting)
    assert unlearn.accuracy(model, forget) == pytest.approx(chosen[0]["forget_accuracy"])
    assert "<- chosen" in str(report)


def test_auto_needs_data(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model) as store:
        train(store, model, steps=2)
        with pytest.raises(ConfigError, match="keep='auto' needs forget="):
            unlearn.amnesiac(model, store, [0], keep="auto")
