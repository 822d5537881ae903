"""A plain training loop with an optional update store attached (used by the demo and benchmarks)."""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from updatestore import UpdateStore

__all__ = ["fit"]


def fit(model: torch.nn.Module, train: Dataset, *, store: UpdateStore | None = None, epochs: int = 10,
        lr: float = 0.05, momentum: float = 0.9, batch_size: int = 32, seed: int = 0,
        progress: bool = False) -> float:
    """Train ``model`` on ``(x, y, id)`` samples with SGD; record into ``store`` if given.

    Returns the wall time in seconds. The batch order depends only on ``seed``.

    >>> fit(model, data.train, store=store, epochs=3)  # doctest: +SKIP
    """
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, generator=g)
    dev = next(model.parameters()).device
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * len(loader), desc="training", unit="step", leave=False)
    model.train()
    t0 = time.perf_counter()
    rec = store.recorder(model, opt).attach() if store is not None else None
    try:
        for _ in range(epochs):
            for x, y, ids in loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                if rec is not None:
                    with rec.batch(ids):
                        opt.zero_grad(set_to_none=True)
                        F.cross_entropy(model(x), y).backward()
                        opt.step()
                else:
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                if bar is not None:
                    bar.update()
    finally:
        if rec is not None:
            rec.detach()
        if bar is not None:
            bar.close()
    return time.perf_counter() - t0
