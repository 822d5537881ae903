"""The one worker pool of the read path: decompression and decoding (Blosc and the numba kernels
release the GIL, so on two cores two chunks decode at once)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

__all__ = ["pool", "workers"]

_pool: ThreadPoolExecutor | None = None


def workers() -> int:
    """Threads in the pool: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def pool() -> ThreadPoolExecutor:
    """The shared pool, created on first use."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="updatestore-read")
    return _pool


def _drop() -> None:  # a forked child inherits the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_drop)
