"""Compiled scatter-add kernels of the read path (numba; imported on first use, not with the package).

Module level, so that numba's on-disk cache serves every process (see ``_select_jit``). A few LLVM
bit operations (bit reversal, byte swap, leading/trailing zero count, population count, bit cast)
are declared here as intrinsics: numba has no portable spelling for them. On the keep-0.1 rows of the
4.2M-entry layer of ``benchmarks/readpath.py`` (one thread) they took the bitmap kernel from 3.43 to
2.76 ns an entry against the former de Bruijn bit walk; adding tile by tile (the accumulator's slice
stays in L2) and walking set bits from the lowest took it from 3.2–3.5 to 2.4 ns (this VM, same rows).
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


_reverse_byte_bits = _word_op("_reverse_byte_bits", lambda ctx, b, x: b.bswap(b.bitreverse(x)), types.uint64)
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


#: Words of every row added before the next ones (a tile): 64K positions, 256 KiB of float32
#: accumulator, which stays in L2 while every row adds into it. Untiled, each row of the 4.2M-entry
#: layer of ``benchmarks/readpath.py`` streamed its whole 16 MiB accumulator through L3 again.
TILE_WORDS = 1024


@numba.njit(nogil=True, cache=True)
def bitmap_add(acc, bits, vals, shift, lo, hi, start):  # pragma: no cover - compiled
    # Words [lo, hi) of every row (the tail bytes too when hi is the last word); start[s] = set bits
    # of row s before word lo, i.e. the index of its next value. vals are float32 bits (uint32, shift
    # 0) or bfloat16 bits (uint16, shift 16), widened here: a block never holds a float32 copy of its
    # bfloat16 values. Returns a row with more than k positions or one past the layer, else -1
    # (nothing of a word is added before its positions are checked).
    #
    # Tiles of TILE_WORDS words, every row in turn: each entry of acc still receives its rows'
    # values in row order, so the sum is bit for bit the untiled one.
    n, w = bits.shape
    k = vals.shape[1]
    numel = acc.size
    nw = w // 8
    one = np.uint64(1)
    sh = np.uint32(shift)
    nxt = start.copy()
    for t in range(lo, hi, TILE_WORDS):
        te = min(hi, t + TILE_WORDS)
        for s in range(n):
            words = bits[s, : nw * 8].view(np.uint64)
            v = vals[s]
            j = nxt[s]
            for wi in range(t, te):
                x = words[wi]
                if x == 0:
                    continue
                # Bytes in memory order, each most significant bit first: with every byte's bits
                # reversed, bit i of the word is position base + i, and the set bits are walked
                # from the lowest by clearing it (x & (x - 1), one cycle) rather than from the
                # highest (a three-cycle count on the loop's critical path): 3.2 -> 2.4 ns an entry.
                x = _reverse_byte_bits(x)
                base = wi * 64
                if j + _popcount(x) > k or base + 63 - _ctlz(x) >= numel:
                    return s
                while x:
                    acc[base + _cttz(x)] += _as_float32(np.uint32(np.uint32(v[j]) << sh))
                    j += 1
                    x &= x - one
            nxt[s] = j
    if hi == nw:
        for s in range(n):
            row = bits[s]
            v = vals[s]
            j = nxt[s]
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
