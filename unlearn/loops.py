"""Loop-based unlearning: label flipping, gradient ascent, and the brief fine-tuning repair.

Each takes ``partial=`` to update only a fraction of each layer's entries per
step (see :class:`unlearn.partial.PartialUpdate`). They use plain SGD, so
entries outside the mask stay exactly as they were.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from updatestore.errors import ConfigError

from .partial import PartialUpdate

__all__ = ["LoopReport", "label_flip", "gradient_ascent", "finetune", "as_loader", "accuracy"]


@dataclass
class LoopReport:
    """What a loop-based unlearning call did (``candidates``: the ``partial="auto"`` table)."""

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


def as_loader(data: Dataset | DataLoader, *, batch_size: int = 64, shuffle: bool = False,
              seed: int = 0) -> DataLoader:
    """A DataLoader over ``data`` (a Dataset, or a DataLoader returned as is)."""
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise ConfigError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g)


def _xy(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ConfigError("batches must be (x, y) or (x, y, ids)")
    return batch[0].to(device), batch[1].to(device)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forever(loader: DataLoader) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the dataset is empty")


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset | DataLoader, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    dev = _device(model)
    correct = total = 0
    for batch in as_loader(data, batch_size=batch_size):
        x, y = _xy(batch, dev)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / total if total else float("nan")


def _mask(model: torch.nn.Module, partial: float | None, select: str, layers: Any,
          seed: int) -> PartialUpdate | None:
    return None if partial is None else PartialUpdate(model, partial, select=select, layers=layers, seed=seed)


def _step(model, opt, loss, mask) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if mask is not None:
        mask.apply()
    opt.step()


#: Partial-update ratios ``partial="auto"`` tries.
AUTO_PARTIAL = (1.0, 0.2, 0.1, 0.05, 0.01)


def _auto(run, model: torch.nn.Module, candidates, forget, validation, target) -> LoopReport:
    """Run ``run(copy, ratio)`` per candidate ratio; keep the pick (see unlearn.choice)."""
    import copy

    from .choice import evaluate_candidate, pick

    if forget is None or validation is None:
        raise ConfigError("partial='auto' needs validation= (a Dataset) besides the forget set")
    t0 = time.perf_counter()
    runs, table = [], []
    for ratio in candidates:
        m = copy.deepcopy(model)
        rep = run(m, None if ratio >= 1.0 else ratio)
        runs.append((m, rep))
        table.append(evaluate_candidate(m, ratio, forget, validation, target))
    best = pick(table)
    m, rep = runs[best]
    model.load_state_dict(m.state_dict())
    rep.candidates, rep.seconds = table, time.perf_counter() - t0
    return rep


def label_flip(model: torch.nn.Module, forget: Dataset | DataLoader, *, partial: float | str | None = None,
               epochs: int = 5, lr: float = 0.01, batch_size: int = 32, num_classes: int | None = None,
               select: str = "mmax", layers: Any = None, seed: int = 0, validation: Dataset | None = None,
               target: float | None = None, candidates=AUTO_PARTIAL) -> LoopReport:
    """Fine-tune on the forget samples with random wrong labels (Graves et al.'s baseline).

    ``partial="auto"`` tries each ratio in ``candidates`` on a copy and keeps the one
    that brings forget accuracy to ``target`` (default: the held-out accuracy of the
    same classes in ``validation``) with the best ``validation`` accuracy.

    >>> unlearn.label_flip(model, forget_set, partial=0.05, epochs=3)  # doctest: +SKIP
    """
    if partial == "auto":
        return _auto(lambda m, r: label_flip(m, forget, partial=r, epochs=epochs, lr=lr, batch_size=batch_size,
                                             num_classes=num_classes, select=select, layers=layers, seed=seed),
                     model, candidates, forget, validation, target)
    t0 = time.perf_counter()
    dev = _device(model)
    mask = _mask(model, partial, select, layers, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in as_loader(forget, batch_size=batch_size, shuffle=True, seed=seed + steps):
            x, y = _xy(batch, dev)
            out = model(x)
            c = num_classes or out.shape[1]
            wrong = (y.cpu() + torch.randint(1, c, y.shape, generator=g)) % c  # never the true label
            _step(model, opt, F.cross_entropy(out, wrong.to(dev)), mask)
            steps += 1
    return LoopReport("label_flip", steps, time.perf_counter() - t0, "epochs",
                      accuracy(model, forget), partial)


def gradient_ascent(model: torch.nn.Module, forget: Dataset | DataLoader, *, partial: float | str | None = None,
                    retain: Dataset | DataLoader | None = None, retain_weight: float = 1.0,
                    lr: float = 0.01, max_steps: int = 100, target_accuracy: float | None = None,
                    eval_every: int = 5, batch_size: int = 32, select: str = "mmax", layers: Any = None,
                    seed: int = 0, validation: Dataset | None = None, target: float | None = None,
                    candidates=AUTO_PARTIAL) -> LoopReport:
    """Raise the loss on the forget samples (minus ``retain_weight`` × the retain loss).

    Stops when forget-set accuracy is at or below ``target_accuracy`` (checked
    every ``eval_every`` steps) or after ``max_steps``. ``partial="auto"``: as
    in :func:`label_flip`.
    """
    if partial == "auto":
        return _auto(lambda m, r: gradient_ascent(
            m, forget, partial=r, retain=retain, retain_weight=retain_weight, lr=lr, max_steps=max_steps,
            target_accuracy=target_accuracy, eval_every=eval_every, batch_size=batch_size, select=select,
            layers=layers, seed=seed), model, candidates, forget, validation, target)
    if max_steps < 1:
        raise ConfigError(f"max_steps must be ≥ 1, got {max_steps}")
    t0 = time.perf_counter()
    dev = _device(model)
    mask = _mask(model, partial, select, layers, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    forget_it = _forever(as_loader(forget, batch_size=batch_size, shuffle=True, seed=seed))
    retain_it = None if retain is None else _forever(as_loader(retain, batch_size=batch_size, shuffle=True,
                                                               seed=seed + 1))
    acc = accuracy(model, forget)
    if target_accuracy is not None and acc <= target_accuracy:
        return LoopReport("gradient_ascent", 0, time.perf_counter() - t0, "target", acc, partial)
    stopped_by = "max_steps"
    steps = 0
    model.train()
    while steps < max_steps:
        x, y = _xy(next(forget_it), dev)
        loss = -F.cross_entropy(model(x), y)
        if retain_it is not None:
            xr, yr = _xy(next(retain_it), dev)
            loss = loss + retain_weight * F.cross_entropy(model(xr), yr)
        _step(model, opt, loss, mask)
        steps += 1
        if target_accuracy is not None and steps % eval_every == 0:
            acc = accuracy(model, forget)
            if acc <= target_accuracy:
                stopped_by = "target"
                break
            model.train()
    return LoopReport("gradient_ascent", steps, time.perf_counter() - t0, stopped_by,
                      accuracy(model, forget), partial)


def finetune(model: torch.nn.Module, retain: Dataset | DataLoader, *, epochs: int = 1, lr: float = 0.01,
             partial: float | None = None, batch_size: int = 64, select: str = "mmax", layers: Any = None,
             seed: int = 0) -> LoopReport:
    """Brief fine-tuning on the retained data: the repair step after unlearning."""
    t0 = time.perf_counter()
    dev = _device(model)
    mask = _mask(model, partial, select, layers, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    steps = 0
    for _ in range(epochs):
        for batch in as_loader(retain, batch_size=batch_size, shuffle=True, seed=seed + steps):
            x, y = _xy(batch, dev)
            _step(model, opt, F.cross_entropy(model(x), y), mask)
            steps += 1
    return LoopReport("finetune", steps, time.perf_counter() - t0, "epochs", None, partial)
