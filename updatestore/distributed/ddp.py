"""DistributedDataParallel: Δθ is the same on every rank, so rank 0 writes; every rank's IDs are gathered."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["world", "gather_ids"]


def world(process_group: Any = None) -> tuple[int, int]:
    """``(world_size, rank)`` of ``process_group`` (the default group), or ``(1, 0)`` without one."""
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return dist.get_world_size(process_group), dist.get_rank(process_group)
    return 1, 0


def gather_ids(ids: np.ndarray, process_group: Any = None) -> np.ndarray:
    """Every rank's IDs of this step, in rank order (two tensor all-gathers, no pickle)."""
    size = dist.get_world_size(process_group)
    dev = (torch.device("cuda", torch.cuda.current_device())
           if dist.get_backend(process_group) == "nccl" else torch.device("cpu"))
    n = torch.tensor([len(ids)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n, group=process_group)
    width = int(max(int(s) for s in sizes))
    buf = torch.zeros(width, dtype=torch.int64, device=dev)
    buf[: len(ids)] = torch.from_numpy(ids).to(dev)
    parts = [torch.zeros_like(buf) for _ in range(size)]
    dist.all_gather(parts, buf, group=process_group)
    return np.concatenate([p[: int(s)].cpu().numpy() for p, s in zip(parts, sizes)])
