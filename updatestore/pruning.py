"""Layer-wise pruning of an update to its largest-magnitude entries, on the tensor's device."""

from __future__ import annotations

import math

import torch

__all__ = ["kept_count", "prune_topk"]


def kept_count(keep: float, numel: int) -> int:
    """k = ceil(keep × numel), at least 1 and at most numel.

    >>> kept_count(0.1, 1000), kept_count(0.001, 10), kept_count(1.0, 7)
    (100, 1, 7)
    """
    # round() first so that 0.1 * 1000 = 100.00000000000001 does not become 101.
    return max(1, min(numel, math.ceil(round(keep * numel, 9))))


def prune_topk(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``k`` largest-|Δ| entries of ``delta`` (flattened), sorted by position.

    Runs on ``delta``'s device. Returns ``(values, positions)``; when ``k`` covers
    the whole tensor, ``positions`` is ``None`` and ``values`` is the flat tensor.

    >>> v, p = prune_topk(torch.tensor([0.1, -3.0, 0.2, 2.0]), 2)
    >>> v.tolist(), p.tolist()
    ([-3.0, 2.0], [1, 3])
    """
    flat = delta.reshape(-1)
    if k >= flat.numel():
        return flat, None
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    idx = torch.sort(idx).values
    return flat[idx], idx
