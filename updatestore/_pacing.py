"""How the background writer paces itself beside training: how many steps may wait for it, its
thread's priority, how far ahead its arrays grow."""

from __future__ import annotations

import os
import sys
import threading

from ._format import LayerSpec

__all__ = ["GROW_SHARDS", "QUEUE_BYTES", "WRITER_NICE", "ahead", "lower_priority", "queue_steps"]

#: Arrays grow this many shards (1-D arrays: a chunk) at a time: each resize rewrites a zarr.json, and
#: resizing every array at each commit took half of a commit's 0.25 s for the 11M CNN (FORMAT.md lets
#: arrays be longer than their committed rows; a writer that reopens the store shrinks them first).
GROW_SHARDS = 16
#: How many bytes of handed-over steps (float32 values, int64 positions) may wait for the writer. While
#: it writes a block (≈ 45 ms on the digits CNN, whose steps take 3 ms) training goes on; a queue of 8
#: steps made training wait for most of every block write (cProfile: 0.13 ms a step in ``Queue.put``).
QUEUE_BYTES = 64 * 2**20


def queue_steps(specs: list[LayerSpec], block: int) -> int:
    """Steps the writer's queue holds: ``QUEUE_BYTES`` of pruned rows, at least 8, at most a block."""
    per_step = sum(s.k * (4 + (8 if s.k < s.numel else 0)) for s in specs) or 1
    return max(8, min(block, QUEUE_BYTES // per_step))


#: The writer thread's nice value (Linux, where a thread has its own). Training keeps every core busy
#: with its own threads (OpenMP); at the default priority the writer — and the pool threads its
#: compression ran on — preempted them in the middle of parallel regions, where every other thread then
#: waits. Now, while training runs, it compresses on its own thread at this priority; when training
#: waits (a full queue, a flush, a close) it has the cores whatever its priority, and a flush or close
#: compresses on the pool. (An A/B on the 2-core machine could not separate the two settings beyond
#: its ±10 % run-to-run noise: ``benchmarks/recording.py``; the choice rests on the mechanism.)
WRITER_NICE = 19


def lower_priority() -> None:
    """Give the calling thread ``WRITER_NICE`` (Linux only; a no-op where not allowed)."""
    if sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS with a thread's id names a process
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except OSError:  # not allowed here: the writer runs at the default priority
            pass


def ahead(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit``."""
    return -(-n // unit) * unit
