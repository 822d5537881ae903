"""Accuracy of a classifier on a dataset (used by the methods, the automatic choice and evaluate)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ._batches import as_loader, device_of, xy

__all__ = ["accuracy"]


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Dataset | DataLoader, *, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, restored after).

    >>> from torch.utils.data import TensorDataset
    >>> accuracy(torch.nn.Linear(2, 2), TensorDataset(torch.zeros(0, 2), torch.zeros(0)))
    nan
    """
    was = model.training
    model.eval()
    dev = device_of(model)
    correct = total = 0
    for batch in as_loader(data, batch_size=batch_size):
        x, y = xy(batch, dev)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was)
    return correct / total if total else float("nan")
