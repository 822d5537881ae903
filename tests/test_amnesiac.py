"""amnesiac unlearning against the in-memory oracle θ_T − Σ Δθ_b."""


import numpy as np
import pytest
import torch

import unlearn
from conftest import file_bytes, make_tiny, oracle_after, steps_with, train
from unlearn import NonFiniteUpdateError
from updatestore import UpdateStore


def _ids(s):  # 8 samples per step, IDs recur every 5 steps (epochs)
    return np.arange(8) + 8 * (s % 5)


@pytest.mark.parametrize("keep", [1.0, 0.3, 0.05])
def test_amnesiac_equals_oracle(store_path, keep):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=keep, value_dtype="float32") as store:
        oracle, all_ids = train(store, model, steps=20, ids_fn=_ids)
        forget = [3, 17]
        expected = oracle_after(model, oracle, steps_with(all_ids, forget), keep)
        report = unlearn.amnesiac(model, store, forget, block_steps=3)
    assert report.applied and report.found == 2 and report.unknown.size == 0
    assert report.steps_hit.tolist() == [s for s in range(20) if s % 5 in (0, 2)]
    assert report.steps_total == 20 and report.share == pytest.approx(0.4)
    assert report.collateral == 14  # the other samples of the two batches
    assert report.bytes_read > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=2e-6)


def test_full_amnesiac_of_everything_restores_init(store_path):
    model = make_tiny()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        train(store, model, steps=15)
        report = unlearn.amnesiac(model, store, np.arange(15 * 8))
    assert len(report.steps_hit) == 15 and report.method == "amnesiac"
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), init[name], rtol=0, atol=2e-6)


def test_dry_run_leaves_model_and_store_bit_identical(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.2) as store:
        train(store, model, steps=10, ids_fn=_ids)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        files = file_bytes(store_path)
        # ledger and purge default to True and the store is writable: a dry run must still write nothing
        report = unlearn.amnesiac(model, store, [1, 2], dry_run=True)
        assert file_bytes(store_path) == files
    assert report.dry_run and not report.applied and len(report.steps_hit) == 2
    assert "would subtract 2 of 10 steps" in str(report)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_unknown_ids_are_reported(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model) as store:
        train(store, model, steps=4)
        with pytest.warns(UserWarning, match="2 of 3 sample IDs were never recorded"):
            report = unlearn.amnesiac(model, store, [5, 10_000, 20_000])
    assert report.found == 1 and report.unknown.tolist() == [10_000, 20_000]
    assert "unknown sample IDs (never recorded): 10000, 20000" in str(report)


def test_failure_mid_apply_leaves_model_unchanged(store_path, monkeypatch):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.5) as store:
        train(store, model, steps=6)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        calls = {"n": 0}
        real = torch.Tensor.copy_

        def flaky(self, src, *args, **kwargs):  # the third parameter write fails
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("device lost")
            return real(self, src, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "copy_", flaky)
        with pytest.raises(RuntimeError, match="device lost"):
            unlearn.amnesiac(model, store, [0, 9])
        monkeypatch.undo()
        assert calls["n"] >= 3
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_apply_restores_every_parameter_after_a_failure_at_any_copy(monkeypatch, error):
    """Parameters and new values are swapped a chunk at a time through one scratch buffer: a failure
    at any of the copies (an interrupt between two of them included) leaves every parameter as it
    was, bit for bit; without one, every parameter holds its new values."""
    import importlib

    method = importlib.import_module("unlearn.methods.amnesiac")  # the module (the package exports the function)
    monkeypatch.setattr(method, "SWAP_CHUNK", 5)  # several chunks a layer, and a short last one
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(6, 4).t()),  # strided: applied through a copy instead
              torch.nn.Parameter(torch.randn(2))]
    olds = [p.detach().clone() for p in params]
    news = [torch.randn(p.shape) for p in params]
    real, calls = torch.Tensor.copy_, {"n": 0, "fail": 0}

    def counting(self, src, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail"]:
            raise error("injected")
        return real(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", counting)
    method._safe_apply([(None, p) for p in params], [n.clone() for n in news])
    total = calls["n"]
    assert total > 3 * len(params) and all(torch.equal(p.detach(), n) for p, n in zip(params, news))
    for fail in range(1, total + 1):
        with torch.no_grad():
            for p, o in zip(params, olds):
                real(p, o)
        calls.update(n=0, fail=fail)
        with pytest.raises(error, match="injected"):
            method._safe_apply([(None, p) for p in params], [n.clone() for n in news])
        assert all(torch.equal(p.detach(), o) for p, o in zip(params, olds)), f"failure at copy {fail}"


def test_non_finite_delta_refused(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        train(store, model, steps=3)
        with torch.no_grad():
            model.fc2.bias.fill_(3e38)  # subtracting the update overflows to inf
        model.fc2.bias.data[0] = float("inf")
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(NonFiniteUpdateError, match="layer 'fc2.bias'.*nothing was applied"):
            unlearn.amnesiac(model, store, [0], allow_unknown_model=True)  # weights changed on purpose
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_applied_in_parameter_dtype(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32") as store:
        train(store, model, steps=5)
        model.to(torch.float64)  # a different fingerprint than the float32 weights recorded
        unlearn.amnesiac(model, store, [0], allow_unknown_model=True)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_mismatched_model_refused(store_path):
    from updatestore import ModelMismatchError

    model = make_tiny()
    with UpdateStore.create(store_path, model) as store:
        train(store, model, steps=2)
        with pytest.raises(ModelMismatchError):
            unlearn.amnesiac(make_tiny(hidden=7), store, [0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amnesiac_on_cuda_matches_cpu(store_path):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.3, value_dtype="float32") as store:
        train(store, model, steps=10, ids_fn=_ids)
        cpu_model = make_tiny()
        cpu_model.load_state_dict(model.state_dict())
        unlearn.amnesiac(cpu_model, store, [1], device="cpu")
        model.cuda()
        report = unlearn.amnesiac(model, store, [1])
    assert report.device.startswith("cuda")
    for (n, a), (_, b) in zip(model.named_parameters(), cpu_model.named_parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=0, atol=1e-6)
