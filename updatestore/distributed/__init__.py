"""Helpers for recording under torch.distributed (DDP today)."""

from .ddp import gather_ids, require_writer_rank, world

__all__ = ["gather_ids", "require_writer_rank", "world"]
