"""Judging an unlearned model: accuracies, a membership-inference attack, gaps to a reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ._batches import as_loader, device_of, xy
from .metrics import accuracy

__all__ = ["evaluate", "sample_features", "membership_attack", "param_distance"]


@torch.no_grad()
def sample_features(model: torch.nn.Module, data: Dataset | DataLoader) -> np.ndarray:
    """Per-sample attack features: loss, top-1 confidence, prediction entropy."""
    was = model.training
    model.eval()
    dev = device_of(model)
    rows = []
    for batch in as_loader(data, batch_size=512):
        x, y = xy(batch, dev)
        logits = model(x).float()
        logp = F.log_softmax(logits, 1)
        loss = F.nll_loss(logp, y, reduction="none")
        conf = logp.exp().max(1).values
        ent = -(logp.exp() * logp).sum(1)
        rows.append(torch.stack([loss, conf, ent], 1).cpu())
    model.train(was)
    return torch.cat(rows).numpy() if rows else np.zeros((0, 3), np.float32)


def membership_attack(model: torch.nn.Module, *, members: Dataset, nonmembers: Dataset, target: Dataset,
                      seed: int = 0) -> dict[str, float]:
    """Train a logistic-regression attack (members vs non-members), then score ``target``.

    Half of ``nonmembers`` trains the attack with an equal number of
    ``members``; the other half is the negative class against which ``target``
    is ranked. Returns ``auc`` (0.5 = indistinguishable from unseen data) and
    ``member_rate`` (share of ``target`` predicted "member").
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    fm, fn, ft = (sample_features(model, d) for d in (members, nonmembers, target))
    perm = rng.permutation(len(fn))
    train_n, held_n = fn[perm[: len(fn) // 2]], fn[perm[len(fn) // 2 :]]
    fm = fm[rng.permutation(len(fm))[: len(train_n)]]
    x = np.concatenate([fm, train_n])
    y = np.concatenate([np.ones(len(fm)), np.zeros(len(train_n))])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    scores_t = clf.predict_proba(ft)[:, 1]
    scores_h = clf.predict_proba(held_n)[:, 1]
    auc = roc_auc_score(np.r_[np.ones(len(ft)), np.zeros(len(held_n))], np.r_[scores_t, scores_h])
    return {"auc": float(auc), "member_rate": float((scores_t > 0.5).mean())}


@torch.no_grad()
def param_distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """‖θ_a − θ_b‖ / ‖θ_b‖ over all parameters."""
    num = den = 0.0
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        num += float((pa.float() - pb.float().to(pa.device)).pow(2).sum())
        den += float(pb.float().pow(2).sum())
    return (num / den) ** 0.5 if den else float("nan")


def evaluate(model: torch.nn.Module, *, forget: Dataset, retain: Dataset, test: Dataset,
             reference: torch.nn.Module | None = None, seed: int = 0) -> dict[str, Any]:
    """Accuracies on each set, the attack on the forget set, and gaps to ``reference``.

    >>> unlearn.evaluate(model, forget=f, retain=r, test=t)["mia_auc"]  # doctest: +SKIP
    0.52
    """
    def _one(m: torch.nn.Module) -> dict[str, float]:
        mia = membership_attack(m, members=retain, nonmembers=test, target=forget, seed=seed)
        return {
            "test_accuracy": accuracy(m, test),
            "retain_accuracy": accuracy(m, retain),
            "forget_accuracy": accuracy(m, forget),
            "mia_auc": mia["auc"],
            "mia_member_rate": mia["member_rate"],
        }

    out: dict[str, Any] = _one(model)
    if reference is not None:
        ref = _one(reference)
        out["reference"] = ref
        out["gap"] = {k: out[k] - ref[k] for k in ref}
        out["distance_to_reference"] = param_distance(model, reference)
    return out
