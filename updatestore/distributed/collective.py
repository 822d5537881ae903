"""Small collectives that keep ranks in step: agreeing on success, sharing rank 0's counts.

Every rank calls these at the same points (create, open, attach, checkpoint, close), and on
every path — success or failure — the same number of times, so that one rank's failure becomes
an error on every rank instead of a hang in an unmatched collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import OtherRankError

__all__ = ["all_ok", "share", "run_agreed", "step_status"]

T = TypeVar("T")


def _device(group: Any) -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl" else torch.device("cpu"))


def all_ok(ok: bool, group: Any) -> bool:
    """Whether every rank's ``ok`` is true (one ``MIN`` all-reduce)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return int(flag) == 1


def share(values: list[int] | None, n: int, group: Any) -> list[int]:
    """Rank 0's ``n`` integers on every rank (``values`` is ignored elsewhere)."""
    buf = torch.tensor(values if values is not None else [0] * n, dtype=torch.int64, device=_device(group))
    dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return [int(v) for v in buf.tolist()]


def run_agreed(fn: Callable[[], T], group: Any, what: str, undo: Callable[[T], None] | None = None) -> T:
    """Run ``fn`` on this rank, then agree: this rank's error is re-raised; if another rank failed,
    ``undo`` (given ``fn``'s result) runs here and :class:`OtherRankError` is raised."""
    try:
        out = fn()
    except BaseException:
        all_ok(False, group)
        raise
    if not all_ok(True, group):
        if undo is not None:
            undo(out)
        raise OtherRankError(f"{what} failed on another rank (see its error); nothing more was done on this one")
    return out


def step_status(values: list[torch.Tensor], group: Any) -> int:
    """A sharded step's status from every rank's kept values: non-finite anywhere, else recorded if any
    rank's update is non-zero, else skipped (the optimizer changed nothing). One small all-reduce."""
    from .._format import STATUS_NONFINITE, STATUS_RECORDED, STATUS_SKIPPED

    dev = _device(group)
    flags = torch.zeros(2, dtype=torch.float32, device=dev)
    for v in values:
        if v.numel():
            flags[0] = torch.maximum(flags[0], v.ne(0).any().to(dev, torch.float32))
            flags[1] = torch.maximum(flags[1], (~torch.isfinite(v)).any().to(dev, torch.float32))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    nonfinite, changed = bool(flags[1]), bool(flags[0])
    return STATUS_NONFINITE if nonfinite else STATUS_RECORDED if changed else STATUS_SKIPPED
