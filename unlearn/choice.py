"""Choosing how much to change: evaluate candidates, keep the gentlest one that forgets enough."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from .loops import accuracy

__all__ = ["evaluate_candidate", "pick"]


def _held_out(forget: Dataset, validation: Dataset) -> Subset | None:
    classes = {int(forget[i][1]) for i in range(len(forget))}
    same = [i for i in range(len(validation)) if int(validation[i][1]) in classes]
    return Subset(validation, same) if same else None


def evaluate_candidate(model: torch.nn.Module, ratio: float, forget: Dataset, validation: Dataset,
                       target: float | None) -> dict[str, Any]:
    """Forget and validation accuracy of one candidate, and whether it meets the target.

    The default target is the candidate's own accuracy on the validation samples
    of the forgotten samples' classes: forgotten samples should look no more
    familiar than unseen ones.
    """
    f_acc = accuracy(model, forget)
    held = _held_out(forget, validation) if target is None else None
    goal = target if target is not None else (accuracy(model, held) if held is not None else 0.0)
    return {"keep": ratio, "forget_accuracy": f_acc, "validation_accuracy": accuracy(model, validation),
            "target": goal, "meets_target": f_acc <= goal}


def pick(table: list[dict[str, Any]]) -> int:
    """Among candidates meeting the target, the best validation accuracy (then the smaller
    change); if none meets it, the lowest forget accuracy. Marks the row ``chosen``."""
    meeting = [i for i, row in enumerate(table) if row["meets_target"]]
    if meeting:
        best = max(meeting, key=lambda i: (table[i]["validation_accuracy"], -table[i]["keep"]))
    else:
        best = min(range(len(table)), key=lambda i: (table[i]["forget_accuracy"], -table[i]["validation_accuracy"]))
    table[best]["chosen"] = True
    return best
