"""Helpers for recording under torch.distributed (DDP today)."""

from .ddp import gather_ids, world

__all__ = ["gather_ids", "world"]
