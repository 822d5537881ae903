"""Compiled scatter-add kernels of the read path (numba; imported on first use, not with the package).

Module level, so that numba's on-disk cache serves every process (see ``_select_jit``). A few LLVM
bit operations (byte swap, leading/trailing zero count, population count, bit cast) are declared
here as intrinsics: numba has no portable spelling for them. On the keep-0.1 rows of the 4.2M-entry
layer of ``benchmarks/readpath.py`` (one thread, 40 interleaved repeats) they took the bitmap kernel
from 3.43 to 2.76 ns an entry against the former de Bruijn bit walk; the kernel is not memory-bound
(the same rows added into an L2-sized slice of the layer took as long).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

__all__ = ["bitmap_add", "gaps_add"]


def _word_op(name: str, build, result=types.int64):
    """An intrinsic ``uint64 -> result`` whose code is ``build(context, builder, x)``."""
    def typer(typingctx, x):  # pragma: no cover - compiled
        if x != types.uint64:
            return None

        def codegen(context, builder, signature, args):
            return build(context, builder, args[0])
        return result(types.uint64), codegen
    typer.__name__ = typer.__qualname__ = name  # numba names (and caches) an intrinsic by its function
    return intrinsic(typer)


_bswap = _word_op("_bswap", lambda ctx, b, x: b.bswap(x), types.uint64)
# leading/trailing zeros of a non-zero word, and its set bits, as int64 (the callers index with them)
_ctlz = _word_op("_ctlz", lambda ctx, b, x: b.ctlz(x, ctx.get_constant(types.boolean, True)))
_cttz = _word_op("_cttz", lambda ctx, b, x: b.cttz(x, ctx.get_constant(types.boolean, True)))
_popcount = _word_op("_popcount", lambda ctx, b, x: b.ctpop(x))


@intrinsic
def _as_float32(typingctx, x):  # pragma: no cover - compiled
    # the float32 whose bits are x (bfloat16 bits shifted up, or float32 bits)
    if x != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.uint32), codegen


@numba.njit(nogil=True, cache=True)
def bitmap_add(acc, bits, vals, shift, lo, hi, start):  # pragma: no cover - compiled
    # Words [lo, hi) of every row (the tail bytes too when hi is the last word); start[s] = set bits
    # of row s before word lo, i.e. the index of its next value. vals are float32 bits (uint32, shift
    # 0) or bfloat16 bits (uint16, shift 16), widened here: a block never holds a float32 copy of its
    # bfloat16 values. Returns the first row with more than k positions or one past the layer, else -1
    # (nothing of a word is added before its positions are checked).
    n, w = bits.shape
    k = vals.shape[1]
    numel = acc.size
    nw = w // 8
    top = np.uint64(1) << np.uint64(63)
    sh = np.uint32(shift)
    for s in range(n):
        row = bits[s]
        v = vals[s]
        words = row[: nw * 8].view(np.uint64)
        j = start[s]
        for wi in range(lo, hi):
            x = words[wi]
            if x == 0:
                continue
            # Bytes in memory order, most significant bit first: byte-swapped, the word's leading
            # bit is its first position and its trailing bit its last.
            x = _bswap(x)
            base = wi * 64
            if j + _popcount(x) > k or base + 63 - _cttz(x) >= numel:
                return s
            while x:
                z = _ctlz(x)
                acc[base + z] += _as_float32(np.uint32(np.uint32(v[j]) << sh))
                j += 1
                x ^= top >> np.uint64(z)
        if hi == nw:
            for i in range(nw * 8, w):
                byte = row[i]
                for b in range(8):
                    if byte & (128 >> b):
                        p = i * 8 + b
                        if j >= k or p >= numel:
                            return s
                        acc[p] += _as_float32(np.uint32(np.uint32(v[j]) << sh))
                        j += 1
    return -1


@numba.njit(nogil=True, cache=True)
def gaps_add(acc, gaps, vals, shift, lo, hi, start):  # pragma: no cover - compiled
    # Columns [lo, hi) of every row; start[s] = position before column lo; vals as above.
    n = gaps.shape[0]
    numel = acc.size
    sh = np.uint32(shift)
    for s in range(n):
        p = start[s]
        for j in range(lo, hi):
            p += gaps[s, j]
            if p >= numel:
                return s
            acc[p] += _as_float32(np.uint32(np.uint32(vals[s, j]) << sh))
    return -1
