"""Top-k of every layer of a step in one compiled call, on the CPU.

Per-layer ``torch.topk`` + ``sort`` cost ≈ 0.15 ms of dispatch per layer (1.25 ms a step on
the 8-layer digits CNN, whose training step takes 3.6 ms), and the torch radix select of
``_pruning`` makes ~10 passes over a large layer. Here the step's Δθ of every layer lies in
one flat float32 buffer; a numba kernel (no GIL) finds each layer's exact k-th largest |Δθ|
— one pass over a large layer (a strided sample bounds the threshold, the entries above the
bound are copied out, the exact threshold is found among them), histogram passes over the bits
of |Δθ| elsewhere — and writes the kept positions (ascending; ties at the threshold taken in position order,
as ``radix_select`` does) and values in one ordered scan.
"""

from __future__ import annotations

import threading

import numpy as np

from ._pool import pool, workers

__all__ = ["select_segments"]

#: Layers at least this large use 16/15-bit histograms; smaller ones three passes of 11/11/9 bits.
HISTOGRAM_MIN_NUMEL = 1 << 16
#: Layers at least this large first try the one-pass sampled select (every ``SAMPLE_STRIDE``-th entry
#: sampled); below, its margin would copy out most of the layer. On the 29.5M-parameter GPT of
#: ``benchmarks/speed.py --transformer`` it took the top-k from 105 to 55 ms a step on one thread
#: (three full passes over Δθ become one, branch-free, plus work on the ~k candidates).
SAMPLED_MIN_NUMEL = 1 << 18
SAMPLE_STRIDE = 128
_lock = threading.Lock()
_compiled: list = []


def _kernel():
    with _lock:
        if not _compiled:
            import numba

            @numba.njit(nogil=True, cache=True)
            def _threshold(bits, a, n, k, w1, w2, w3):  # pragma: no cover - compiled
                # The k-th largest |x| (as int bits) of bits[a:a+n] and how many entries equal to it
                # to keep: a radix select from the most significant bits, one histogram per level.
                t, above, shift, known = 0, 0, 31, 0
                for width in (w1, w2, w3):
                    if width == 0:
                        break
                    shift -= width
                    hist = np.zeros(1 << width, np.int64)
                    mask = (1 << width) - 1
                    for j in range(a, a + n):
                        v = bits[j] & 0x7FFFFFFF
                        if (v >> (shift + width)) == known:
                            hist[(v >> shift) & mask] += 1
                    c = mask
                    while above + hist[c] < k:
                        above += hist[c]
                        c -= 1
                    known = (known << width) | c
                t = known << shift
                return t, k - above

            @numba.njit(nogil=True, cache=True)
            def _sampled(bits, delta, a, n, k, o, out_pos, out_vals, hist_min):  # pragma: no cover - compiled
                # One pass instead of three: a strided sample gives a bound t_lo that at least k entries
                # reach (with margin); every entry >= t_lo is copied out in position order, and the exact
                # threshold is found among those candidates only. All of the top k are >= t_lo once the
                # candidates number >= k, so the result is exact; otherwise (False) the caller does the
                # full three passes.
                m = n // SAMPLE_STRIDE
                sample = np.empty(m, np.int32)
                for i in range(m):
                    sample[i] = bits[a + i * SAMPLE_STRIDE] & 0x7FFFFFFF
                exp = k * m / n
                r = int(exp + 4.0 * np.sqrt(exp) + 8.0)  # rank from the top, ~4 sigma above the expected
                if r >= m:
                    return False
                t_lo = np.partition(sample, m - 1 - r)[m - 1 - r]
                cap = k + 2 * (r - int(exp)) * SAMPLE_STRIDE + 1024
                cand_pos = np.empty(cap + 1, np.int64)
                cand_bits = np.empty(cap + 1, np.int32)
                c = 0
                for j in range(n):
                    # branch-free: always write the slot, advance only past a candidate (a taken/not
                    # taken branch at ~10 % mispredicts; this loop was 1.4x slower with one)
                    v = bits[a + j] & 0x7FFFFFFF
                    cand_pos[c] = j
                    cand_bits[c] = v
                    c += v >= t_lo
                    if c == cap:
                        return False
                if c < k:
                    return False
                if c >= hist_min:
                    t, ties = _threshold(cand_bits, 0, c, k, 16, 15, 0)
                else:
                    t, ties = _threshold(cand_bits, 0, c, k, 11, 11, 9)
                w = o
                for i in range(c):
                    v = cand_bits[i]
                    if v > t or (v == t and ties > 0):
                        if v == t:
                            ties -= 1
                        if w == o + k:
                            raise ValueError("top-k selection kept too many entries")
                        out_pos[w] = cand_pos[i]
                        out_vals[w] = delta[a + cand_pos[i]]
                        w += 1
                if w != o + k:
                    raise ValueError("top-k selection kept too few entries")
                return True

            @numba.njit(nogil=True, cache=True)
            def select(delta, starts, sizes, ks, offsets, out_pos, out_vals, hist_min):  # pragma: no cover - compiled
                bits = delta.view(np.int32)
                for i in range(starts.size):
                    a, n, k, o = starts[i], sizes[i], ks[i], offsets[i]
                    if n >= SAMPLED_MIN_NUMEL and _sampled(bits, delta, a, n, k, o, out_pos, out_vals, hist_min):
                        continue
                    if n >= hist_min:  # threshold from the top 16 bits of |x|, then the low 15
                        t, ties = _threshold(bits, a, n, k, 16, 15, 0)
                    else:  # three passes of 11, 11 and 9 bits: small histograms to clear
                        t, ties = _threshold(bits, a, n, k, 11, 11, 9)
                    w = o
                    for j in range(n):
                        v = bits[a + j] & 0x7FFFFFFF
                        if v > t or (v == t and ties > 0):
                            if v == t:
                                ties -= 1
                            if w == o + k:  # never write past this segment's k (numba checks no bounds)
                                raise ValueError("top-k selection kept too many entries")
                            out_pos[w] = j
                            out_vals[w] = delta[a + j]
                            w += 1
                    if w != o + k:  # cannot happen for a consistent threshold; never hand on a short row
                        raise ValueError("top-k selection kept too few entries")

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


def select_segments(delta: np.ndarray, starts: np.ndarray, sizes: np.ndarray, ks: np.ndarray,
                    offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each segment ``delta[starts[i] : starts[i] + sizes[i]]``, its ``ks[i]`` largest-|x| entries:
    ``(positions, values)`` concatenated segment after segment, positions relative to the segment
    start and ascending within it (every ``ks[i] < sizes[i]``). Pass int64 arrays (and ``offsets``, the
    exclusive cumulative sum of ``ks``) to skip the conversions on a hot path.

    >>> pos, vals = select_segments(np.array([0.1, -3, 0.2, 2, 5, -1], np.float32),
    ...                             np.array([0, 4]), np.array([4, 2]), np.array([2, 1]))
    >>> pos.tolist(), vals.tolist()
    ([1, 3, 0], [-3.0, 2.0, 5.0])
    """
    if offsets is None:
        starts, sizes, ks = (np.asarray(x, dtype=np.int64) for x in (starts, sizes, ks))
        offsets = np.concatenate([[0], np.cumsum(ks)[:-1]]).astype(np.int64)
    total = int(offsets[-1] + ks[-1]) if len(ks) else 0
    pos = np.empty(total, np.int64)
    vals = np.empty(total, np.float32)
    if not total:
        return pos, vals
    kernel = _kernel()
    threads = workers() if int(sizes.sum()) >= PARALLEL_MIN_NUMEL and len(sizes) > 1 else 1
    if threads == 1:
        kernel(delta, starts, sizes, ks, offsets, pos, vals, HISTOGRAM_MIN_NUMEL)
        return pos, vals
    # Segments write disjoint ranges of pos/vals (their offsets): groups run concurrently (nogil).
    run = lambda g: kernel(delta, starts[g], sizes[g], ks[g], offsets[g], pos, vals, HISTOGRAM_MIN_NUMEL)  # noqa: E731
    list(pool().map(run, _groups(sizes, threads)))
    return pos, vals
