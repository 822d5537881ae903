"""Compiled encoders of the writer thread (numba; imported on their first use, not with the package).

A large layer's row was a bool mask of ``numel`` bytes set at the positions then ``np.packbits``
(three passes over ``numel`` bytes), and bfloat16 rounding five NumPy passes over the values: 8 and
3 ms a step for the 11M-parameter CNN of ``benchmarks/speed.py``, on a thread that shares the cores
with training. These write the packed row and the rounded values in one pass each. Module level,
so that numba's on-disk cache serves every process (see ``_select_jit``).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["pack_bitmap", "round_bfloat16"]


@numba.njit(nogil=True, cache=True)
def pack_bitmap(positions, limit, out):  # pragma: no cover - compiled
    # Set bit p (most significant bit first) of the zeroed row ``out`` for every p; returns how many
    # positions lie outside 0..limit-1 (the caller refuses the row: nothing out of range is written).
    bad = 0
    limit = min(limit, out.size * 8)
    for i in range(positions.size):
        p = positions[i]
        if p < 0 or p >= limit:
            bad += 1
            continue
        out[p >> 3] |= np.uint8(128 >> (p & 7))
    return bad


@numba.njit(nogil=True, cache=True)
def round_bfloat16(bits, out):  # pragma: no cover - compiled
    # float32 bits -> bfloat16 bits, round to nearest even: ValuesCodec.from_float32's formula
    # (in int64, whose low 16 bits after the shift equal its uint32 wrap-around)
    for i in range(bits.size):
        b = np.int64(bits[i])
        out[i] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
