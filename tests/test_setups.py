"""Setups that must just work: torch.compile'd modules, weight tying, EMA/SWA averaged models."""

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny
from test_lifecycle import run_steps
from updatestore import UpdateStore, canonical_name


def test_store_created_on_a_compiled_module_opens_with_the_plain_one_and_back(tmp_path):
    plain = make_tiny()
    compiled = torch.compile(plain, backend="eager")  # the names torch.compile gives, without a C++ compiler
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", compiled, keep=1.0, value_dtype="float32") as store:
        assert [s.name for s in store.layers] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        with store.recorder(compiled, opt) as rec:
            run_steps(rec, compiled, opt, range(3))
    with UpdateStore.open(tmp_path / "s", "r+") as store:
        # the plain module is the same model (same weights' fingerprint), so no allow_unknown_model
        unlearn.amnesiac(plain, store, np.arange(12), device="cpu")
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=1e-6)
    # and the other way: a store of the plain module records the compiled one
    with UpdateStore.create(tmp_path / "t", plain) as store, store.recorder(compiled, opt) as rec:
        run_steps(rec, compiled, opt, range(2))
        assert rec.steps_recorded == 2


def test_canonical_name():
    assert canonical_name("_orig_mod.a._orig_mod.b.weight") == "a.b.weight"
    assert canonical_name("orig_mod.weight") == "orig_mod.weight"


def test_weight_tying_records_the_shared_parameter_once(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.out = torch.nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight  # tied

        def forward(self, x):
            return self.out(self.emb(x))

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.emb.weight.detach().clone()
    with UpdateStore.create(tmp_path / "s", model, keep=1.0, value_dtype="float32") as store:
        assert [s.name for s in store.layers] == ["emb.weight"]  # named_parameters() yields a shared one once
        with store.recorder(model, opt) as rec:
            for s in range(3):
                with rec.batch([s]):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(torch.tensor([s])), torch.tensor([s + 1])).backward()
                    opt.step()
        unlearn.amnesiac(model, store, [0, 1, 2], device="cpu")
    torch.testing.assert_close(model.emb.weight.detach(), before, rtol=0, atol=1e-6)
    assert model.out.weight is model.emb.weight


def test_averaged_model_is_not_the_recorded_model(tmp_path):
    """EMA/SWA: the recorder records the trained model; the AveragedModel is a different set of
    weights, which unlearning refuses (its lineage is not the store's) unless told otherwise."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from updatestore import ModelMismatchError
    from unlearn import UnknownModelError

    model = make_tiny()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store:
        with store.recorder(model, opt) as rec:
            for s in range(3):
                run_steps(rec, model, opt, [s])
                ema.update_parameters(model)
        with pytest.raises((ModelMismatchError, UnknownModelError)):
            unlearn.amnesiac(ema.module, store, [0], device="cpu")
        report = unlearn.amnesiac(ema.module, store, [0], device="cpu", allow_unknown_model=True, purge=False,
                                  ledger=False)
        assert report.steps_hit.tolist() == [0]


def test_with_ids_carries_keys_through_a_dataloader():
    from torch.utils.data import DataLoader, TensorDataset

    from updatestore import ConfigError, SampleIdError, WithIds

    x, y = torch.randn(6, 3), torch.arange(6)
    keys = [9001, 42, 7, 1234567890123, 5, 66]
    ds = WithIds(TensorDataset(x, y), ids=keys)
    batches = list(DataLoader(ds, batch_size=4))
    assert [b[-1].tolist() for b in batches] == [keys[:4], keys[4:]]
    assert torch.equal(batches[0][0], x[:4])
    dicts = WithIds([{"x": i} for i in range(3)])
    assert next(iter(DataLoader(dicts, batch_size=3)))["sample_id"].tolist() == [0, 1, 2]
    with pytest.raises(SampleIdError, match="repeat"):
        WithIds(TensorDataset(x, y), ids=[1, 1, 2, 3, 4, 5])
    with pytest.raises(SampleIdError, match="one per item"):
        WithIds(TensorDataset(x, y), ids=[1, 2])
    with pytest.raises(SampleIdError):
        WithIds(TensorDataset(x, y), ids=[0.5] * 6)
    with pytest.raises(ConfigError, match="map-style"):
        WithIds(iter(range(3)))
