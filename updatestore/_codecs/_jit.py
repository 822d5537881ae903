"""Compiled encoders of the writer thread (numba; imported on their first use, not with the package).

One call each encodes a whole step: every layer's values rounded to bfloat16 (with the checks that
decide the step's status), every sparse layer's positions packed into its bitmap or gap row. Per
layer, a large row was a bool mask of ``numel`` bytes and ``np.packbits`` (8 ms a step for the 11M
CNN), a small one a handful of NumPy calls (0.23 ms a step of writer CPU on the 8-layer digits CNN).
The codecs' own ``encode`` methods are the per-row reference the tests hold these to. Module level,
so that numba's on-disk cache serves every process (see ``_select_jit``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["encode_positions", "encode_bfloat16"]


@numba.njit(nogil=True, cache=True)
def _gaps(pos, a, k, n, out, o):  # pragma: no cover - compiled
    # pos[a:a+k] as gaps into out[o:o+k] (the first one absolute); False at the first position that is
    # out of range or not above the one before (nothing past it is written)
    prev = -1
    for j in range(k):
        p = pos[a + j]
        if p <= prev or p >= n:
            return False
        out[o + j] = p - max(prev, 0)
        prev = p
    return True


@numba.njit(nogil=True, cache=True)
def encode_positions(pos, tables, bitmaps, gaps16, gaps32):  # pragma: no cover - compiled
    # Every sparse layer of one step. ``tables`` rows: kind, k, numel, src, dst per layer. Layer i's k
    # positions pos[src:src+k] (ascending) become its packed row at dst of the step's row of its dtype:
    # a bitmap (kind 1: bytes zeroed, then bit p set, most significant first) or gaps (2: uint16, 3:
    # uint32; column 0 absolute). Kind 0 (dense) has none. Returns the first layer whose positions are
    # out of range or not strictly increasing (the caller refuses the step; that layer's row is then
    # partly written), else -1.
    # The range and order check is fused into the one pass that writes (a separate pass over the
    # step's int64 positions first made it 3.7x slower: 17 vs 4.7 ms for a 29.5M-parameter GPT's step);
    # every write is of a position already checked, so a bad step never writes out of its row.
    for i in range(tables.shape[1]):
        kind, k, n, a, o = tables[0, i], tables[1, i], tables[2, i], tables[3, i], tables[4, i]
        if kind == 0 or k == 0:
            continue
        if kind == 1:
            row = bitmaps[o: o + (n + 7) // 8]
            row[:] = 0
            prev = -1
            for j in range(a, a + k):
                p = pos[j]
                if p <= prev or p >= n:
                    return i
                prev = p
                row[p >> 3] |= np.uint8(128 >> (p & 7))
        elif kind == 2:
            if not _gaps(pos, a, k, n, gaps16, o):
                return i
        elif kind == 3:
            if not _gaps(pos, a, k, n, gaps32, o):
                return i
    return -1


@numba.njit(nogil=True, cache=True)
def encode_bfloat16(bits, out):  # pragma: no cover - compiled
    # round_bfloat16, and what the writer decides the step's status by: bit 0 set if some value is NaN or
    # infinite (exponent all ones), bit 1 if some value is non-zero (either sign of zero counts as zero)
    flags = 0
    for i in range(bits.size):
        b = np.int64(bits[i])
        out[i] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        flags |= (1 if (b & 0x7F800000) == 0x7F800000 else 0) | (2 if (b & 0x7FFFFFFF) != 0 else 0)
    return flags
