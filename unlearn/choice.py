"""The one automatic selection: evaluate candidate ratios, keep the gentlest that forgets enough.

Shared by ``amnesiac(keep=Auto(...))`` and the loop methods' ``partial=Auto(...)``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from updatestore import ConfigError, check_ratio

from .metrics import accuracy

__all__ = ["Auto", "evaluate_candidate", "pick", "choose", "legacy_auto"]


@dataclass(frozen=True)
class Auto:
    """Choose a ratio automatically: try each of ``candidates`` and keep the one that brings
    accuracy on ``forget`` to at most ``target`` with the best ``validation`` accuracy.

    ``target`` defaults to each candidate's own accuracy on the ``validation`` samples of
    the forgotten samples' classes (forgotten samples should look no more familiar than
    unseen ones). ``candidates=None`` uses the method's default ratios.

    >>> unlearn.amnesiac(model, store, ids, keep=Auto(forget=forget_set, validation=val_set))  # doctest: +SKIP
    """

    forget: Dataset
    validation: Dataset
    target: float | None = None
    candidates: Sequence[float] | None = None

    def __post_init__(self) -> None:
        for name in ("forget", "validation"):
            if not isinstance(getattr(self, name), Dataset):
                raise ConfigError(f"Auto({name}=...) must be a torch Dataset, got {type(getattr(self, name)).__name__}")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, (int, float))):
            raise ConfigError(f"Auto(target=...) must be an accuracy in [0, 1] or None, got {self.target!r}")
        if self.candidates is not None:
            if len(self.candidates) == 0:
                raise ConfigError("Auto(candidates=...) is empty; give at least one ratio in (0, 1]")
            for r in self.candidates:
                check_ratio(r, "Auto candidate ratio")

    def ratios(self, default: Sequence[float]) -> list[float]:
        """The candidate ratios to try, largest first, without repeats."""
        return sorted({float(r) for r in (self.candidates if self.candidates is not None else default)}, reverse=True)


def legacy_auto(what: str, forget: Any, validation: Any, target: Any, candidates: Any) -> Auto:
    """``what="auto"`` with loose keyword arguments (0.1 API), as an :class:`Auto`, with a DeprecationWarning."""
    warnings.warn(f'{what}="auto" with forget=/validation=/target=/candidates= is deprecated; pass '
                  f"{what}=unlearn.Auto(forget=..., validation=..., target=..., candidates=...)",
                  DeprecationWarning, stacklevel=3)
    if forget is None or validation is None:
        raise ConfigError(f"{what}='auto' needs forget= (the forgotten samples' Dataset) and validation= (a Dataset)")
    return Auto(forget, validation, target, candidates)


def _held_out(forget: Dataset, validation: Dataset) -> Subset | None:
    classes = {int(forget[i][1]) for i in range(len(forget))}
    same = [i for i in range(len(validation)) if int(validation[i][1]) in classes]
    return Subset(validation, same) if same else None


def evaluate_candidate(model: torch.nn.Module, ratio: float, auto: Auto) -> dict[str, Any]:
    """Forget and validation accuracy of one candidate, and whether it meets the target."""
    f_acc = accuracy(model, auto.forget)
    held = _held_out(auto.forget, auto.validation) if auto.target is None else None
    goal = auto.target if auto.target is not None else (accuracy(model, held) if held is not None else 0.0)
    return {"keep": ratio, "forget_accuracy": f_acc, "validation_accuracy": accuracy(model, auto.validation),
            "target": goal, "meets_target": f_acc <= goal}


def pick(table: list[dict[str, Any]]) -> int:
    """Among candidates meeting the target, the best validation accuracy (then the smaller
    change); if none meets it, the lowest forget accuracy (then the best validation
    accuracy). Marks the row ``chosen``.

    >>> pick([{"keep": 1.0, "forget_accuracy": 0.5, "validation_accuracy": 0.6, "meets_target": False},
    ...       {"keep": 0.1, "forget_accuracy": 0.7, "validation_accuracy": 0.9, "meets_target": False}])
    0
    """
    meeting = [i for i, row in enumerate(table) if row["meets_target"]]
    if meeting:
        best = max(meeting, key=lambda i: (table[i]["validation_accuracy"], -table[i]["keep"]))
    else:
        best = min(range(len(table)), key=lambda i: (table[i]["forget_accuracy"], -table[i]["validation_accuracy"]))
    table[best]["chosen"] = True
    return best


def choose(model: torch.nn.Module, auto: Auto, ratios: list[float],
           build: Callable[[torch.nn.Module, float], Any]) -> tuple[int, list[dict[str, Any]], list[Any]]:
    """For each ratio, ``build(scratch, ratio)`` changes a scratch copy of ``model``; each copy
    is evaluated, and the pick, the table and every ``build`` result are returned.
    ``model`` itself is not changed."""
    table, built = [], []
    for ratio in ratios:
        scratch = copy.deepcopy(model)
        built.append(build(scratch, ratio))
        table.append(evaluate_candidate(scratch, ratio, auto))
    return pick(table), table, built
