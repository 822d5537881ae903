"""Scatter-adding stored rows straight from their encoded positions, without materialising them.

Decoding a 4.2M-entry bitmap row to int64 positions and scatter-adding them cost 18 ms with
NumPy; walking its set bits in a compiled loop and adding in place costs 1.5 ms (numba; measured
on the 4.3M-parameter MLP of ``benchmarks/readpath.py``). The CPU kernels are compiled with numba on first use (its
import and the cached compile cost ≈ 0.8 s once per process, so small layers, where NumPy is
fast enough, never trigger it). On a GPU the same sums are torch ops with no host
synchronisation: only the packed rows cross the bus.

Every kernel trusts rows the reader validated (exactly ``k`` positions below ``numel``) but
still refuses, rather than writes, anything out of range.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ._pool import pool, workers

__all__ = ["add_packed", "as_tensor", "NUMBA_MIN_NUMEL"]

#: Layers at least this large are summed by the compiled kernels; smaller ones with NumPy/torch.
NUMBA_MIN_NUMEL = 1 << 16
_lock = threading.Lock()
_compiled: dict[str, object] = {}

# A bitmap packs positions most-significant-bit first; reversing the bits of every byte of a
# little-endian 64-bit word makes position order equal to bit order, so the lowest set bit is
# the next position. Its index comes from a de Bruijn multiply (portable, no intrinsics).
_DEBRUIJN = 0x03F79D71B4CB0A89
_DEBRUIJN_TABLE = np.zeros(64, dtype=np.int64)
for _i in range(64):
    _DEBRUIJN_TABLE[(((1 << _i) * _DEBRUIJN) & (2**64 - 1)) >> 58] = _i


def _kernels() -> dict[str, object]:
    with _lock:
        if not _compiled:
            import numba

            table, debruijn = _DEBRUIJN_TABLE, np.uint64(_DEBRUIJN)
            m1, m2, m4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
            one, s1, s2, s4, s58 = np.uint64(1), np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(58)

            @numba.njit(nogil=True, cache=True)
            def bitmap_add(acc, bits, vals, shift, lo, hi, start):  # pragma: no cover - compiled
                # words [lo, hi) of every row (the tail bytes too when hi is the last word);
                # start[s] = set bits of row s before word lo, i.e. the index of its next value.
                # vals are float32 bits (uint32, shift 0) or bfloat16 bits (uint16, shift 16),
                # widened here: a block never holds a float32 copy of its bfloat16 values.
                n, w = bits.shape
                k = vals.shape[1]
                numel = acc.size
                nw = w // 8
                word = np.empty(1, np.uint32)
                real = word.view(np.float32)
                for s in range(n):
                    row = bits[s]
                    v = vals[s]
                    words = row[: nw * 8].view(np.uint64)
                    j = start[s]
                    for wi in range(lo, hi):
                        x = words[wi]
                        if x == 0:
                            continue
                        x = ((x >> s1) & m1) | ((x & m1) << s1)
                        x = ((x >> s2) & m2) | ((x & m2) << s2)
                        x = ((x >> s4) & m4) | ((x & m4) << s4)
                        base = wi * 64
                        while x:
                            p = base + table[((x & (~x + one)) * debruijn) >> s58]
                            if j >= k or p >= numel:
                                return s
                            word[0] = np.uint32(v[j]) << shift
                            acc[p] += real[0]
                            j += 1
                            x &= x - one
                    if hi == nw:
                        for i in range(nw * 8, w):
                            byte = row[i]
                            for b in range(8):
                                if byte & (128 >> b):
                                    p = i * 8 + b
                                    if j >= k or p >= numel:
                                        return s
                                    word[0] = np.uint32(v[j]) << shift
                                    acc[p] += real[0]
                                    j += 1
                return -1

            @numba.njit(nogil=True, cache=True)
            def gaps_add(acc, gaps, vals, shift, lo, hi, start):  # pragma: no cover - compiled
                # columns [lo, hi) of every row; start[s] = position before column lo; vals as above
                n = gaps.shape[0]
                numel = acc.size
                word = np.empty(1, np.uint32)
                real = word.view(np.float32)
                for s in range(n):
                    p = start[s]
                    for j in range(lo, hi):
                        p += gaps[s, j]
                        if p >= numel:
                            return s
                        word[0] = np.uint32(vals[s, j]) << shift
                        acc[p] += real[0]
                return -1

            _compiled.update(bitmap=bitmap_add, gaps=gaps_add)
    return _compiled


def _add_numba(out: torch.Tensor, packed: np.ndarray, values: torch.Tensor, codec: str) -> None:
    kernel = _kernels()[codec]
    acc = out.numpy()
    # the kernels take the values' bits: bfloat16 as stored (no float32 copy), anything else as float32
    if values.dtype == torch.bfloat16:
        vals, shift = values.view(torch.int16).numpy().view(np.uint16), 16
    else:
        vals, shift = values.float().numpy().view(np.uint32), 0
    n = packed.shape[0]
    # Units a row is split at: 64-bit words of a bitmap, columns of gaps.
    units = packed.shape[1] // 8 if codec == "bitmap" else packed.shape[1]
    parts = workers() if n and out.numel() >= (1 << 20) else 1
    cuts = [units * i // parts for i in range(parts + 1)]
    # Each thread takes a range of positions across all rows (so every entry is added in row
    # order, as one thread would), starting from the values before its range.
    if codec == "bitmap":
        count = lambda a, b: np.bitwise_count(packed[:, 8 * a: 8 * b]).sum(axis=1, dtype=np.int64)  # noqa: E731
    else:
        count = lambda a, b: packed[:, a:b].sum(axis=1, dtype=np.int64)  # noqa: E731
    before = np.cumsum([np.zeros(n, np.int64)] + [count(a, b) for a, b in zip(cuts[:-2], cuts[1:-1])], axis=0)
    tasks = [(cuts[i], cuts[i + 1], before[i]) for i in range(parts)]
    run = lambda t: kernel(acc, packed, vals, shift, t[0], t[1], t[2])  # noqa: E731
    bad = list(pool().map(run, tasks)) if parts > 1 else [run(tasks[0])]
    if any(b >= 0 for b in bad):
        raise ValueError("a stored row has positions beyond the layer or more than k of them")


def _add_torch(out: torch.Tensor, packed: torch.Tensor, values: torch.Tensor, codec: str, numel: int) -> None:
    """The same sum with torch ops on ``out``'s device (no host synchronisation)."""
    if codec == "gaps":
        pos = torch.cumsum(packed.to(torch.int64), dim=1)
        pos = pos.clamp_(max=numel - 1)  # the reader checked the range; never write outside
        out.index_add_(0, pos.reshape(-1), values.reshape(-1))
        return
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    # a few rows at a time: each row expands to numel bytes of bits and numel int32 ranks
    step = max(1, (1 << 25) // max(1, numel))
    for a in range(0, packed.shape[0], step):
        part = packed[a: a + step]
        bits = ((part.unsqueeze(-1) >> shifts) & 1).reshape(part.shape[0], -1)[:, :numel]
        rank = torch.cumsum(bits, dim=1, dtype=torch.int32).sub_(1).clamp_(0, values.shape[1] - 1)
        vals = values[a: a + step].gather(1, rank.long())
        out.add_((vals * bits).sum(0))


def as_tensor(packed: np.ndarray) -> torch.Tensor:
    """Stored rows as a tensor torch can compute with (it has no unsigned 16/32-bit arithmetic:
    gaps are widened to int64; bitmaps stay uint8)."""
    return torch.from_numpy(packed if packed.dtype == np.uint8 else packed.astype(np.int64))


def add_packed(out: torch.Tensor, packed: np.ndarray | torch.Tensor, values: torch.Tensor, codec: str) -> None:
    """``out += Σ_rows scatter(positions(row), values[row])`` for ``bitmap``/``gaps`` rows.

    ``packed`` holds the stored rows (validated by the reader); ``out`` is flat float32; ``values``
    float32, or bfloat16/float16 as stored (widened while they are added).
    """
    if out.device.type == "cpu" and out.numel() >= NUMBA_MIN_NUMEL and isinstance(packed, np.ndarray):
        _add_numba(out, np.ascontiguousarray(packed), values.contiguous(), codec)
    else:
        if isinstance(packed, np.ndarray):
            packed = as_tensor(packed).to(out.device)
        _add_torch(out, packed, values.to(out.device).float(), codec, out.numel())
