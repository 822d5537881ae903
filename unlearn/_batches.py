"""Batches for the loop-based methods and metrics: Datasets to loaders, ``(x, y[, ids])`` to tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from updatestore import ConfigError

__all__ = ["as_loader", "xy", "device_of", "forever"]


def as_loader(data: Dataset | DataLoader, *, batch_size: int = 64, shuffle: bool = False,
              seed: int = 0) -> DataLoader:
    """A DataLoader over ``data`` (a Dataset, or a DataLoader returned as is)."""
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, Dataset):
        raise ConfigError(f"expected a torch Dataset or DataLoader, got {type(data).__name__}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=g)


def xy(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ConfigError("batches must be (x, y) or (x, y, ids)")
    return batch[0].to(device), batch[1].to(device)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def forever(loader: DataLoader) -> Iterator:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the dataset is empty")
