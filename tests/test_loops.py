"""Partial-update masks, the loop-based methods, the attack, and the data helpers."""

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import unlearn
from unlearn.data import DataFormatError, forget_split, load_digits, load_idx_dir, read_idx, sample_ids
from unlearn.models import DigitsCNN
from unlearn.training import fit
from updatestore import ConfigError


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    fit(model, digits.train, epochs=6)
    return model


@pytest.mark.parametrize("select", ["mmax", "random"])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_partial_mask_updates_exact_count(select, ratio):
    torch.manual_seed(0)
    # tanh, not ReLU: every gradient entry is non-zero, so "changed" == "selected"
    model = torch.nn.Sequential(torch.nn.Linear(30, 200), torch.nn.Tanh(), torch.nn.Linear(200, 7))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = unlearn.PartialUpdate(model, ratio, select=select, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(torch.randn(16, 30)).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    mask.apply()
    opt.step()
    for n, p in model.named_parameters():
        changed = p.detach() != before[n]
        k = max(1, int(np.ceil(round(ratio * p.numel(), 9))))
        assert int(changed.sum()) == k, n
        if select == "mmax":  # the changed entries are the largest |grad|
            g = grads[n].abs().flatten()
            assert g[changed.flatten()].min() >= g[~changed.flatten()].max()


def test_partial_mask_layer_selection():
    model = DigitsCNN()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = unlearn.PartialUpdate(model, 1.0, layers=["fc2.*"])
    assert mask.layer_names == ["fc2.weight", "fc2.bias"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    mask.apply()
    opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) == (not n.startswith("fc2"))
    with pytest.raises(ConfigError, match=r"\['conv9'\] match no parameter"):
        unlearn.PartialUpdate(model, 0.5, layers=["conv9"])
    with pytest.raises(ConfigError, match="select must be"):
        unlearn.PartialUpdate(model, 0.5, select="biggest")


@pytest.mark.parametrize("partial", [None, 0.1])
def test_label_flip_lowers_forget_accuracy(digits, trained, partial):
    import copy

    model = copy.deepcopy(trained)
    forget, _ = forget_split(digits.train, cls=3)
    before = unlearn.accuracy(model, forget)
    report = unlearn.label_flip(model, forget, partial=partial, epochs=3, lr=0.05)
    assert before > 0.9 and report.forget_accuracy < before - 0.3
    assert report.steps == 3 * int(np.ceil(len(forget) / 32))


@pytest.mark.parametrize("partial", [None, 0.05])
def test_gradient_ascent_reaches_target(digits, trained, partial):
    import copy

    model = copy.deepcopy(trained)
    forget, retain = forget_split(digits.train, cls=7)
    report = unlearn.gradient_ascent(model, forget, partial=partial, retain=retain, lr=0.05,
                                     target_accuracy=0.2, max_steps=300)
    assert report.stopped_by == "target" and report.forget_accuracy <= 0.2


def test_finetune_accepts_dataloader(digits):
    model = DigitsCNN()
    loader = torch.utils.data.DataLoader(digits.train, batch_size=128)
    report = unlearn.finetune(model, loader, epochs=1, partial=0.2)
    assert report.steps == len(loader)


def test_attack_near_chance_on_unseen_data(digits):
    torch.manual_seed(0)
    model = DigitsCNN()
    half = len(digits.train) // 2
    seen = Subset(digits.train, range(half))
    fit(model, seen, epochs=5)
    unseen = Subset(digits.train, range(half, len(digits.train)))
    # the target is data the model never saw: AUC against other unseen data ≈ 0.5
    res = unlearn.membership_attack(model, members=seen, nonmembers=digits.test, target=unseen)
    assert abs(res["auc"] - 0.5) < 0.08


def test_evaluate_with_reference(digits, trained):
    forget, retain = forget_split(digits.train, fraction=0.05)
    out = unlearn.evaluate(trained, forget=forget, retain=retain, test=digits.test, reference=trained)
    assert out["test_accuracy"] > 0.9 and out["distance_to_reference"] == 0.0
    assert all(v == 0 for v in out["gap"].values())


def test_digits_ids_are_stable(digits):
    again = load_digits()
    assert torch.equal(again.train.tensors[2], digits.train.tensors[2])
    ids = np.concatenate([digits.train.tensors[2].numpy(), digits.test.tensors[2].numpy()])
    assert sorted(ids.tolist()) == list(range(1797))
    forget, retain = forget_split(digits.train, cls=3)
    assert set(sample_ids(forget)).isdisjoint(sample_ids(retain))


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(data)


def test_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), 0x08)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 20, dtype=np.uint8), 0x08)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), 0x08)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 5, dtype=np.uint8), 0x08)
    split = load_idx_dir(tmp_path)
    assert split.input_shape == (1, 28, 28) and len(split.train) == 20 and len(split.test) == 5
    assert split.test.tensors[2].tolist() == [20, 21, 22, 23, 24]
    assert float(split.train.tensors[0].max()) <= 1.0
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataFormatError, match="bad magic"):
        read_idx(tmp_path / "bad")
    with pytest.raises(DataFormatError, match="has no t10k"):
        (tmp_path / "t10k-images-idx3-ubyte").unlink()
        load_idx_dir(tmp_path)


def test_partial_auto_picks_among_candidates(digits, trained):
    import copy

    model = copy.deepcopy(trained)
    forget, retain = forget_split(digits.train, cls=3)
    auto = unlearn.Auto(forget=forget, validation=digits.test, target=0.3, candidates=(1.0, 0.1, 0.01))
    report = unlearn.label_flip(model, forget, partial=auto, epochs=2, lr=0.05)
    assert [c["keep"] for c in report.candidates] == [1.0, 0.1, 0.01]
    chosen = [c for c in report.candidates if c.get("chosen")]
    assert len(chosen) == 1 and unlearn.accuracy(model, forget) == pytest.approx(chosen[0]["forget_accuracy"])
    meeting = [c for c in report.candidates if c["meets_target"]]
    if meeting:
        assert chosen[0]["validation_accuracy"] == max(c["validation_accuracy"] for c in meeting)
    with pytest.warns(DeprecationWarning, match="unlearn.Auto"), \
            pytest.raises(ConfigError, match="partial='auto' needs forget="):
        unlearn.gradient_ascent(model, forget, partial="auto")
