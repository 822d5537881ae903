"""Brief fine-tuning on the retained data: the repair step after unlearning."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .._batches import as_loader, device_of, xy
from ._loop import LoopReport, make_mask, sgd_step

__all__ = ["finetune"]


def finetune(model: torch.nn.Module, retain: Dataset | DataLoader, *, epochs: int = 1, lr: float = 0.01,
             partial: float | None = None, batch_size: int = 64, select: str = "mmax", layers: Any = None,
             seed: int = 0) -> LoopReport:
    """Fine-tune on ``retain`` with plain SGD (layer-wise ``partial`` updates if given).

    >>> unlearn.finetune(model, retain_set, epochs=1)  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    dev = device_of(model)
    mask = make_mask(model, partial, select, layers, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in as_loader(retain, batch_size=batch_size, shuffle=True, seed=seed + steps):
            x, y = xy(batch, dev)
            sgd_step(opt, F.cross_entropy(model(x), y), mask)
            steps += 1
    return LoopReport("finetune", steps, time.perf_counter() - t0, "epochs", None, partial)
