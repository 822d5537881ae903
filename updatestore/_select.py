"""Top-k of every layer of a step in one compiled call, on the CPU.

Per-layer ``torch.topk`` + ``sort`` cost ≈ 0.15 ms of dispatch per layer (1.25 ms a step on
the 8-layer digits CNN, whose training step takes 3.6 ms), and the torch radix select of
``_pruning`` makes ~10 passes over a large layer. Here the step's Δθ of every layer lies in
one flat float32 buffer; a numba kernel (no GIL) finds each layer's exact k-th largest |Δθ|
— one pass over a layer of 4096 entries or more (a sample, one entry at a jittered offset in
each run of a stride, bounds the threshold; the entries above the bound are copied out and the
exact threshold is found among them), a partition of a copy for small layers, histogram passes
over the bits of |Δθ| when the sample misleads — and writes the kept positions (ascending; ties at the threshold taken in position order,
as ``radix_select`` does) and values in one ordered scan.
"""

from __future__ import annotations

import threading

import numpy as np

from ._pool import map_shared, workers

__all__ = ["Segments", "select_segments"]

#: Layers at least this large use 16/15-bit histograms; smaller ones three passes of 11/11/9 bits.
HISTOGRAM_MIN_NUMEL = 1 << 16
#: Layers at least this large first try the one-pass sampled select (a sample of ~1024 entries, at
#: most every ``SAMPLE_STRIDE``-th); below, its margin would copy out most of the layer. On the
#: 29.5M-parameter GPT of ``benchmarks/speed.py --transformer`` it took the top-k from 105 to 55 ms a
#: step on one thread (three full passes over Δθ become one, branch-free, plus work on the ~k
#: candidates); on a 32k-entry layer 194 → 59 µs, on 4.6k 20 → 14 µs.
SAMPLED_MIN_NUMEL = 1 << 12
SAMPLE_STRIDE = 128
_lock = threading.Lock()
_compiled: list = []


def _kernel():
    with _lock:
        if not _compiled:
            from ._select_jit import select

            _compiled.append(select)
        return _compiled[0]


#: Steps with at least this many entries are split across the worker pool (layers balanced by size):
#: on a 29.5M-parameter GPT one thread took 105 ms a step; below it a thread hand-off costs more than it saves.
PARALLEL_MIN_NUMEL = 1 << 20


def _groups(sizes: np.ndarray, n: int) -> list[np.ndarray]:
    """Segment indices in ``n`` groups of near-equal total size (largest first, into the lightest group)."""
    loads, groups = [0] * n, [[] for _ in range(n)]
    for i in np.argsort(-sizes, kind="stable"):
        j = loads.index(min(loads))
        groups[j].append(i)
        loads[j] += int(sizes[i])
    return [np.sort(np.array(g, dtype=np.int64)) for g in groups if g]


class Segments:
    """A step's layers as segments of one flat buffer, prepared once for a run's every step: calling it
    with a step's buffer gives each segment's top-k as :func:`select_segments` does.

    Everything that depends on the layers only (offsets, totals, whether to split across threads) is
    computed here: on the 8-layer digits CNN each NumPy call of the step's path cost 20–65 µs right after
    a training step (cold caches on this project's VM), where it costs 1–3 µs in a loop of its own.
    ``negate=True`` gives ``0 − x`` for each kept value (the fused recorder holds −Δθ), in the same pass.
    """

    def __init__(self, starts: np.ndarray, sizes: np.ndarray, ks: np.ndarray) -> None:
        self.starts, self.sizes, self.ks = (np.ascontiguousarray(x, dtype=np.int64) for x in (starts, sizes, ks))
        self.offsets = np.cumsum(self.ks) - self.ks  # exclusive
        self.total = int(self.ks.sum())
        split = int(self.sizes.sum()) >= PARALLEL_MIN_NUMEL and len(self.sizes) > 1
        # segment groups for the pool's threads, balanced by size (None: one thread takes every segment)
        self._groups = _groups(self.sizes, workers()) if split and workers() > 1 else None

    def __call__(self, delta: np.ndarray, negate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        pos = np.empty(self.total, np.int64)
        vals = np.empty(self.total, np.float32)
        if not self.total:
            return pos, vals
        kernel = _kernel()
        if self._groups is None:
            kernel(delta, self.starts, self.sizes, self.ks, self.offsets, pos, vals,
                   HISTOGRAM_MIN_NUMEL, SAMPLED_MIN_NUMEL, SAMPLE_STRIDE, negate)
            return pos, vals
        # Segments write disjoint ranges of pos/vals (their offsets): groups run concurrently (nogil).
        run = lambda g: kernel(delta, self.starts[g], self.sizes[g], self.ks[g], self.offsets[g],  # noqa: E731
                               pos, vals, HISTOGRAM_MIN_NUMEL, SAMPLED_MIN_NUMEL, SAMPLE_STRIDE, negate)
        map_shared(run, self._groups)  # the training thread takes a group too
        return pos, vals


def select_segments(delta: np.ndarray, starts: np.ndarray, sizes: np.ndarray, ks: np.ndarray,
                    negate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each segment ``delta[starts[i] : starts[i] + sizes[i]]``, its ``ks[i]`` largest-|x| entries:
    ``(positions, values)`` concatenated segment after segment, positions relative to the segment
    start and ascending within it (every ``ks[i] < sizes[i]``); values negated with ``negate``. On a hot
    path, prepare :class:`Segments` once instead.

    >>> pos, vals = select_segments(np.array([0.1, -3, 0.2, 2, 5, -1], np.float32),
    ...                             np.array([0, 4]), np.array([4, 2]), np.array([2, 1]))
    >>> pos.tolist(), vals.tolist()
    ([1, 3, 0], [-3.0, 2.0, 5.0])
    """
    return Segments(starts, sizes, ks)(delta, negate)
