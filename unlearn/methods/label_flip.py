"""Label flipping: fine-tune on the forget samples with random wrong labels (Graves et al.'s baseline)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .._batches import as_loader, device_of, xy
from ..choice import Auto
from ..metrics import accuracy
from ._loop import LoopReport, make_mask, run_partial, sgd_step

__all__ = ["label_flip"]


def label_flip(model: torch.nn.Module, forget: Dataset | DataLoader, *, partial: float | Auto | None = None,
               epochs: int = 5, lr: float = 0.01, batch_size: int = 32, num_classes: int | None = None,
               select: str = "mmax", layers: Any = None, seed: int = 0, validation: Dataset | None = None,
               target: float | None = None, candidates: Any = None) -> LoopReport:
    """Fine-tune on ``forget`` with random wrong labels, with layer-wise ``partial`` updates if given.

    ``partial=Auto(forget=..., validation=...)`` tries several ratios on copies and keeps
    the automatic choice (``validation``/``target``/``candidates`` here are the deprecated
    spelling that goes with ``partial="auto"``).

    >>> unlearn.label_flip(model, forget_set, partial=0.05, epochs=3)  # doctest: +SKIP
    """

    def run(m: torch.nn.Module, ratio: float | None) -> LoopReport:
        t0 = time.perf_counter()
        dev = device_of(m)
        mask = make_mask(m, ratio, select, layers, seed)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        m.train()
        steps = 0
        for _ in range(epochs):
            for batch in as_loader(forget, batch_size=batch_size, shuffle=True, seed=seed + steps):
                x, y = xy(batch, dev)
                out = m(x)
                c = num_classes or out.shape[1]
                wrong = (y.cpu() + torch.randint(1, c, y.shape, generator=g)) % c  # never the true label
                sgd_step(opt, F.cross_entropy(out, wrong.to(dev)), mask)
                steps += 1
        return LoopReport("label_flip", steps, time.perf_counter() - t0, "epochs", accuracy(m, forget), ratio)

    return run_partial(model, forget, partial,
                       {"validation": validation, "target": target, "candidates": candidates}, run)
