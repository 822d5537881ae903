"""Keep chosen at deletion time, and the automatic choice (issue: forgetting control)."""

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny, oracle_after, steps_with, train
from torch.utils.data import TensorDataset

from updatestore import ConfigError, UpdateStore

def _ids(s):
    return np.arange(8) + 8 * (s % 5)

@pytest.mark.parametrize("recorded,keep", [(0.5, 0.1), (1.0, 0.05), (0.3, 0.3)])
def test_deletion_time_keep_equals_pruning_the_dense_oracle(store_path, recorded, keep):
    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=recorded, value_dtype="float32") as store:
        oracle, all_ids = train(store, model, steps=15, ids_fn=_ids)
        expected = oracle_after(model, oracle, steps_with(all_ids, [4]), keep)
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

def test_one_pass_multi_ratio_choice_equals_a_separate_pass(store_path):
    """keep=Auto computes every candidate from one pass over the rows; the model it leaves
    equals a separate keep=<chosen> run, which equals the independent top-k' oracle."""
    import copy

    from torch.utils.data import TensorDataset

    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.5, value_dtype="float32") as store:
        oracle, all_ids = train(store, model, steps=12, ids_fn=_ids)
        forget_ids = [0, 9]
        data = TensorDataset(torch.randn(8, 12), torch.randint(0, 3, (8,)))
        for target in (0.0, 1.0):  # nothing / everything meets it: different branches of the choice
            auto_model, sep_model = copy.deepcopy(model), copy.deepcopy(model)
            rep = unlearn.amnesiac(auto_model, store, forget_ids, ledger=False, purge=False, keep=unlearn.Auto(
                forget=data, validation=data, target=target, candidates=(0.5, 0.2, 0.05)))
            chosen = next(r["keep"] for r in rep.candidates if r.get("chosen"))
            unlearn.amnesiac(sep_model, store, forget_ids, ledger=False, purge=False, keep=chosen)
            want = oracle_after(model, oracle, steps_with(all_ids, forget_ids), chosen)
            for (n, a), (_, b) in zip(auto_model.named_parameters(), sep_model.named_parameters()):
                assert torch.equal(a, b), n
                torch.testing.assert_close(a.detach(), want[n], rtol=0, atol=1e-6)

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
        report = unlearn.amnesiac(model, store, list(range(20)), keep=unlearn.Auto(
            forget=forget, validation=validation, target=0.5, candidates=(1.0, 0.3, 0.1, 0.01)))
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
        with pytest.warns(DeprecationWarning, match="unlearn.Auto"), \
                pytest.raises(ConfigError, match="keep='auto' needs forget="):
            unlearn.amnesiac(model, store, [0], keep="auto")
        with pytest.raises(ConfigError, match="candidates=...\\) is empty"):
            unlearn.Auto(forget=TensorDataset(torch.zeros(1)), validation=TensorDataset(torch.zeros(1)), candidates=[])

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from updatestore import OwnerBatchSampler  # noqa: E402

@given(st.lists(st.integers(0, 30), min_size=1, max_size=300), st.integers(1, 40), st.integers(0, 1000))
@settings(max_examples=120, deadline=None)
def test_owner_sampler_yields_each_sample_once_and_packs_owners(owners, batch_size, seed):
    sampler = OwnerBatchSampler(owners, batch_size, seed=seed)
    owners = np.asarray(owners)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected_len = len(sampler)  # __len__ describes the epoch about to run
        batches = list(sampler)
        assert len(batches) == expected_len
        flat = np.concatenate([np.asarray(b) for b in batches])
        assert sorted(flat.tolist()) == list(range(len(owners)))  # every sample exactly once
        assert all(1 <= len(b) <= batch_size for b in batches)
        for o in np.unique(owners):
            n = int((owners == o).sum())
            hit = sum(1 for b in batches if (owners[np.asarray(b)] == o).any())
            assert hit == -(-n // batch_size)  # as few batches as the owner's size allows

def test_owner_sampler_shuffles_across_epochs():
    owners = np.repeat(np.arange(50), 5)
    s = OwnerBatchSampler(owners, 20, seed=0)
    first, second = list(s), list(s)
    assert first != second

def test_owner_queries_equal_brute_force(store_path):
    model = make_tiny()
    rng = np.random.default_rng(0)
    sample_owner = {i: int(rng.integers(0, 12)) for i in range(40)}
    with UpdateStore.create(store_path, model) as store:
        train(store, model, steps=10, ids_fn=_ids)
        store.index_owners(list(sample_owner), list(sample_owner.values()))
        for owner in range(12):
            mine = [i for i, o in sample_owner.items() if o == owner]
            assert store.samples_of([owner]).tolist() == sorted(mine)
            brute = sorted({s for s in range(10) if np.isin(_ids(s), mine).any()})
            assert store.batches_containing(owners=[owner]).tolist() == brute

def test_amnesiac_by_owner_equals_by_ids(store_path, tmp_path):
    import copy
    import shutil

    model = make_tiny()
    with UpdateStore.create(store_path, model, keep=0.3, value_dtype="float32") as store:
        train(store, model, steps=10, ids_fn=_ids)
        store.index_owners(np.arange(40), np.arange(40) // 4)
    shutil.copytree(store_path, tmp_path / "copy.zarr")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    with UpdateStore.open(store_path, "r+") as store:
        ra = unlearn.amnesiac(a, store, owners=[2])
        assert store.samples_of([2]).size == 0  # purged from the owner table too
    with UpdateStore.open(tmp_path / "copy.zarr", "r+") as store:
        rb = unlearn.amnesiac(b, store, [8, 9, 10, 11])
    assert ra.steps_hit.tolist() == rb.steps_hit.tolist() and ra.found == 4
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
