"""The compiled kernels of ``_select`` (numba; imported on its first use, not with the package).

They live at module level because numba's on-disk cache keys a function by its closure too, and a
closure over another compiled function pickles differently in every process: as closures they were
compiled again by every process (≈ 15 s at the first recorded step); from here they load from the cache.
The tunables come in as arguments for the same reason (module globals are frozen into the cache).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["select", "sampled", "sample_at", "stride_for", "emit", "threshold"]

#: Up to this many entries the threshold comes from a partition of a copy (one introselect) instead of
#: three histogram passes, whose 2048-bin clears and scans dominate a small layer: on the digits CNN's
#: layers of 10–640 entries 2–3× faster (≈ 20 of the step's 180 µs).
PARTITION_MAX = 2048


@numba.njit(nogil=True, cache=True)
def threshold(bits, a, n, k, hist_min):  # pragma: no cover - compiled
    # The k-th largest |x| (as int bits) of bits[a:a+n] and how many entries equal to it
    # to keep: a radix select from the most significant bits, one histogram per level —
    # 16 then 15 bits from hist_min entries on, else 11, 11 and 9 (small histograms to clear).
    if n <= PARTITION_MAX:
        tmp = np.empty(n, np.int32)
        for j in range(n):
            tmp[j] = bits[a + j] & 0x7FFFFFFF
        t = np.partition(tmp, n - k)[n - k]
        above = 0
        for j in range(n):
            above += tmp[j] > t
        return t, k - above
    widths = (16, 15, 0) if n >= hist_min else (11, 11, 9)
    t, above, shift, known = 0, 0, 31, 0
    for width in widths:
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
def emit(bits, delta, a, n, k, o, t, ties, out_pos, out_vals, negate):  # pragma: no cover - compiled
    # One ordered scan of bits[a:a+n]: every entry above the threshold t and the first ``ties``
    # equal to it, positions ascending, into out_pos/out_vals[o:o+k] (negated: 0 - x, as np.subtract
    # gives it, when ``negate``).
    zero = np.float32(0)
    w = o
    for j in range(n):
        v = bits[a + j] & 0x7FFFFFFF
        if v > t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            if w == o + k:  # never write past this segment's k (numba checks no bounds)
                raise ValueError("top-k selection kept too many entries")
            out_pos[w] = j
            out_vals[w] = zero - delta[a + j] if negate else delta[a + j]
            w += 1
    if w != o + k:  # cannot happen for a consistent threshold; never hand on a short row
        raise ValueError("top-k selection kept too few entries")


@numba.njit(nogil=True, cache=True)
def stride_for(n, max_stride):  # pragma: no cover - compiled
    # a sample of ~1024 entries (at least every 8th, at most every ``max_stride``-th): smaller
    # strides on mid-sized layers keep the candidates few (32k entries: 194 -> 59 µs)
    return min(max_stride, max(8, n // 1024))


@numba.njit(nogil=True, cache=True)
def sample_at(m, stride):  # pragma: no cover - compiled
    # The sampled positions: one from each run of ``stride`` entries, at a pseudo-random offset (a
    # fixed LCG: the same every call). A fixed stride aliased with a conv weight's layout (the same
    # kernel position in every row) and misjudged the bound by up to 1.6x on the 11M CNN's real
    # Δθ, overflowing the candidate buffer. Only the speed depends on the sample, never the result.
    at = np.empty(m, np.int64)
    state = np.uint64(0x9E3779B97F4A7C15)
    for i in range(m):
        state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
        at[i] = i * stride + np.int64((state >> np.uint64(33)) % np.uint64(stride))
    return at


@numba.njit(nogil=True, cache=True)
def sampled(bits, delta, a, n, k, o, out_pos, out_vals, hist_min, stride, negate):  # pragma: no cover - compiled
    # One pass instead of three: a sample (``sample_at``) gives a bound t_lo that at least k entries
    # reach (with margin); every entry > t_lo is copied out in position order and the entries
    # equal to t_lo are counted. With >= k candidates the exact threshold is found among them
    # only; with fewer, but >= k entries reaching t_lo, the threshold is t_lo itself and one
    # more pass takes the candidates and the first ties in position order. Real Δθ has heavy
    # ties (θ's float32 spacing quantises it: ~25k distinct values in a 4.2M-entry layer of the
    # 11M CNN), which made ">= t_lo" overflow its buffer and fall back to the three passes
    # (13 ms instead of ~4 on a 2M-entry layer). Otherwise (False) the caller does the passes.
    m = n // stride
    at = sample_at(m, stride)
    sample = np.empty(m, np.int32)
    for i in range(m):
        sample[i] = bits[a + at[i]] & 0x7FFFFFFF
    exp = k * m / n
    r = int(exp + 4.0 * np.sqrt(exp) + 8.0)  # rank from the top, ~4 sigma above the expected
    if r >= m:
        return False
    t_lo = np.partition(sample, m - 1 - r)[m - 1 - r]
    cap = k + 2 * (r - int(exp)) * stride + 1024
    cand_pos = np.empty(cap + 1, np.int64)
    cand_bits = np.empty(cap + 1, np.int32)
    c = 0
    eq = 0
    for j in range(n):
        # branch-free: always write the slot, advance only past a candidate (a taken/not
        # taken branch at ~10 % mispredicts; this loop was 1.4x slower with one). The slot keeps
        # the entry's own bits, sign included: the kept values are then taken from here, not
        # gathered from delta (at ~10 % density that gather read every cache line of the layer again).
        b = bits[a + j]
        v = b & 0x7FFFFFFF
        cand_pos[c] = j
        cand_bits[c] = b
        c += v > t_lo
        eq += v == t_lo
        if c == cap:
            return False
    if c < k:
        if c + eq < k:
            return False
        emit(bits, delta, a, n, k, o, t_lo, k - c, out_pos, out_vals, negate)  # the threshold is t_lo itself
        return True
    t, ties = threshold(cand_bits, 0, c, k, hist_min)  # it compares magnitudes (the bits' sign masked)
    w = o
    out_bits = out_vals.view(np.int32)
    cand_vals = cand_bits.view(np.float32)
    zero = np.float32(0)
    for i in range(c):
        v = cand_bits[i] & 0x7FFFFFFF
        if v > t or (v == t and ties > 0):
            if v == t:
                ties -= 1
            if w == o + k:
                raise ValueError("top-k selection kept too many entries")
            out_pos[w] = cand_pos[i]
            if negate:
                out_vals[w] = zero - cand_vals[i]
            else:
                out_bits[w] = cand_bits[i]
            w += 1
    if w != o + k:
        raise ValueError("top-k selection kept too few entries")
    return True

@numba.njit(nogil=True, cache=True)
def select(delta, starts, sizes, ks, offsets, out_pos, out_vals, hist_min, sampled_min, stride,
           negate):  # pragma: no cover - compiled
    bits = delta.view(np.int32)
    for i in range(starts.size):
        a, n, k, o = starts[i], sizes[i], ks[i], offsets[i]
        s = stride_for(n, stride)
        if n >= sampled_min and sampled(bits, delta, a, n, k, o, out_pos, out_vals, hist_min, s, negate):
            continue
        t, ties = threshold(bits, a, n, k, hist_min)
        emit(bits, delta, a, n, k, o, t, ties, out_pos, out_vals, negate)
