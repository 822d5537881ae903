"""What the loop-based methods share: their report, the partial-update mask, one SGD step, ``partial`` parsing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..choice import Auto, choose, legacy_auto
from ..partial import PartialUpdate

__all__ = ["LoopReport", "AUTO_PARTIAL", "make_mask", "sgd_step", "run_partial"]

#: Partial-update ratios ``partial=Auto(...)`` tries by default.
AUTO_PARTIAL = (1.0, 0.2, 0.1, 0.05, 0.01)


@dataclass
class LoopReport:
    """What a loop-based unlearning call did (``candidates``: the ``partial=Auto(...)`` table)."""

    method: str
    steps: int
    seconds: float
    stopped_by: str
    forget_accuracy: float | None = None
    partial: float | None = None
    candidates: list = field(default_factory=list)

    def __str__(self) -> str:
        acc = "" if self.forget_accuracy is None else f", forget accuracy {self.forget_accuracy:.3f}"
        part = "full updates" if self.partial is None else f"layer-wise partial updates ({self.partial:.1%})"
        return f"{self.method}: {self.steps} steps with {part} in {self.seconds:.2f} s, stopped by {self.stopped_by}{acc}"


def make_mask(model: torch.nn.Module, partial: float | None, select: str, layers: Any,
              seed: int) -> PartialUpdate | None:
    return None if partial is None else PartialUpdate(model, partial, select=select, layers=layers, seed=seed)


def sgd_step(opt: torch.optim.Optimizer, loss: torch.Tensor, mask: PartialUpdate | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mask is not None:
        mask.apply()
    opt.step()


def run_partial(model: torch.nn.Module, forget: Any, partial: Any, legacy: dict[str, Any],
                run: Callable[[torch.nn.Module, float | None], LoopReport]) -> LoopReport:
    """Run ``run(model, partial)`` — or, for ``partial=Auto(...)``, run it on a copy per candidate
    ratio and keep the automatic choice (``unlearn.choice``)."""
    if partial == "auto":
        partial = legacy_auto("partial", forget, legacy.get("validation"), legacy.get("target"),
                              legacy.get("candidates"))
    elif any(v is not None for v in legacy.values()):
        raise TypeError(f"{sorted(k for k, v in legacy.items() if v is not None)} only go with partial='auto'; "
                        "pass partial=unlearn.Auto(forget=..., validation=...) instead")
    if not isinstance(partial, Auto):
        return run(model, partial)
    t0 = time.perf_counter()
    best, table, runs = choose(model, partial, partial.ratios(AUTO_PARTIAL),
                               lambda m, ratio: (m, run(m, None if ratio >= 1.0 else ratio)))
    chosen, report = runs[best]
    model.load_state_dict(chosen.state_dict())
    report.candidates, report.seconds = table, time.perf_counter() - t0
    return report
