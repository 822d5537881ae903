"""The one worker pool: decompression, decoding and the read kernels, the writer's compression and the
top-k (Blosc and the numba kernels release the GIL, so on two cores two chunks decode at once).
``map_shared`` is how work goes to it: the calling thread takes items too."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

__all__ = ["pool", "workers", "map_shared"]

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


def map_shared(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, computed by the calling thread and the pool's workers together:
    each takes the next item until none is left. The caller works instead of waiting: with
    ``pool().map`` it sat idle while its tasks queued behind other work in the pool (unlearning
    reads the next block's chunks while it adds this one's), and a core idled between the two.
    Helpers that have not started when the caller runs out of items are cancelled, not awaited.

    >>> map_shared(lambda x: x * x, [1, 2, 3])
    [1, 4, 9]
    """
    n = len(items)
    if n <= 1 or workers() == 1:
        return [fn(x) for x in items]
    out: list[Any] = [None] * n
    claim = itertools.count()  # next() on it is atomic under the GIL: each index goes to one thread

    def work() -> None:
        while (i := next(claim)) < n:
            out[i] = fn(items[i])

    # workers() - 1 helpers: with the caller, as many threads as cores (two callers at once,
    # the reader's thread and the one adding, may bring up to twice that: the OS shares them out)
    helpers = [pool().submit(work) for _ in range(min(workers() - 1, n - 1))]
    try:
        work()
    finally:
        started = [h for h in helpers if not h.cancel()]
        wait(started)  # a helper mid-item is finishing it
    for h in started:
        h.result()  # a helper's exception
    return out


def _drop() -> None:  # a forked child inherits the pool object but none of its threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_drop)
