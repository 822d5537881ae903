"""Gradient ascent: raise the loss on the forget samples (optionally minus the retain loss)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from updatestore import ConfigError

from .._batches import as_loader, device_of, forever, xy
from ..choice import Auto
from ..metrics import accuracy
from ._loop import LoopReport, make_mask, run_partial, sgd_step

__all__ = ["gradient_ascent"]


def gradient_ascent(model: torch.nn.Module, forget: Dataset | DataLoader, *, partial: float | Auto | None = None,
                    retain: Dataset | DataLoader | None = None, retain_weight: float = 1.0,
                    lr: float = 0.01, max_steps: int = 100, target_accuracy: float | None = None,
                    eval_every: int = 5, batch_size: int = 32, select: str = "mmax", layers: Any = None,
                    seed: int = 0, validation: Dataset | None = None, target: float | None = None,
                    candidates: Any = None) -> LoopReport:
    """Raise the loss on ``forget`` (minus ``retain_weight`` × the retain loss).

    Stops when forget accuracy is at or below ``target_accuracy`` (checked every
    ``eval_every`` steps) or after ``max_steps``. ``partial``: as in :func:`label_flip`.

    >>> unlearn.gradient_ascent(model, forget_set, partial=0.01, target_accuracy=0.1)  # doctest: +SKIP
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"max_steps must be ≥ 1, got {max_steps}")

    def run(m: torch.nn.Module, ratio: float | None) -> LoopReport:
        t0 = time.perf_counter()
        dev = device_of(m)
        mask = make_mask(m, ratio, select, layers, seed)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        forget_it = forever(as_loader(forget, batch_size=batch_size, shuffle=True, seed=seed))
        retain_it = None if retain is None else forever(as_loader(retain, batch_size=batch_size, shuffle=True,
                                                                  seed=seed + 1))
        acc = accuracy(m, forget)
        if target_accuracy is not None and acc <= target_accuracy:
            return LoopReport("gradient_ascent", 0, time.perf_counter() - t0, "target", acc, ratio)
        stopped_by, steps = "max_steps", 0
        m.train()
        while steps < max_steps:
            x, y = xy(next(forget_it), dev)
            loss = -F.cross_entropy(m(x), y)
            if retain_it is not None:
                xr, yr = xy(next(retain_it), dev)
                loss = loss + retain_weight * F.cross_entropy(m(xr), yr)
            sgd_step(opt, loss, mask)
            steps += 1
            if target_accuracy is not None and steps % eval_every == 0:
                acc = accuracy(m, forget)
                if acc <= target_accuracy:
                    stopped_by = "target"
                    break
                m.train()
        return LoopReport("gradient_ascent", steps, time.perf_counter() - t0, stopped_by, accuracy(m, forget), ratio)

    return run_partial(model, forget, partial,
                       {"validation": validation, "target": target, "candidates": candidates}, run)
