"""Top-k of every layer of a step in one compiled call, on the CPU.

Per-layer ``torch.topk`` + ``sort`` cost ≈ 0.15 ms of dispatch per layer (1.25 ms a step on
the 8-layer digits CNN, whose training step takes 3.6 ms), and the torch radix select of
``_pruning`` makes ~10 passes over a large layer. Here the step's Δθ of every layer lies in
one flat float32 buffer; a numba kernel (no GIL) finds each layer's exact k-th largest |Δθ|
— ``np.partition`` on small layers, two histogram passes over the bits of |Δθ| on large ones
— and writes the kept positions (ascending; ties at the threshold taken in position order,
as ``radix_select`` does) and values in one ordered scan.
"""

from __future__ import annotations

import threading

import numpy as np

__all__ = ["select_segments"]

#: Layers at least this large use the histogram select; smaller ones ``np.partition``.
HISTOGRAM_MIN_NUMEL = 1 << 16
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
            def select(delta, starts, sizes, ks, offsets, out_pos, out_vals, hist_min):  # pragma: no cover - compiled
                bits = delta.view(np.int32)
                for i in range(starts.size):
                    a, n, k, o = starts[i], sizes[i], ks[i], offsets[i]
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
    if total:
        _kernel()(delta, starts, sizes, ks, offsets, pos, vals, HISTOGRAM_MIN_NUMEL)
    return pos, vals
