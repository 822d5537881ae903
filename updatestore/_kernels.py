"""Scatter-adding stored rows straight from their encoded positions, without materialising them.

Decoding a 4.2M-entry bitmap row to int64 positions and scatter-adding them cost 18 ms with
NumPy; walking its set bits in a compiled loop and adding in place costs 1.5 ms (numba; measured
on the 4.3M-parameter MLP of ``benchmarks/readpath.py``). The CPU kernels (``_kernels_jit``) are
numba functions in its on-disk cache, imported on first use (≈ 0.5 s once per process, so small
layers, where NumPy is fast enough, never trigger it). On a GPU the same sums are torch ops with no host
synchronisation: only the packed rows cross the bus.

Every kernel trusts rows the reader validated (exactly ``k`` positions below ``numel``) but
still refuses, rather than writes, anything out of range.
"""

from __future__ import annotations

import numpy as np
import torch

from ._pool import map_shared, workers

__all__ = ["add_packed", "as_tensor", "compiled_for", "NUMBA_MIN_NUMEL"]

#: Layers at least this large are summed by the compiled kernels (and load them); smaller ones with
#: NumPy/torch until something has loaded them (``compiled_for``).
NUMBA_MIN_NUMEL = 1 << 16


_loaded: list[dict[str, object]] = []


def _kernels() -> dict[str, object]:
    if not _loaded:
        from . import _kernels_jit  # numba: imported on first use, not with the package

        _loaded.append({"bitmap": _kernels_jit.bitmap_add, "gaps": _kernels_jit.gaps_add})
    return _loaded[0]


def compiled_for(numel: int) -> bool:
    """Whether a CPU layer of ``numel`` entries is summed by the compiled kernels: large ones always;
    small ones once the kernels are loaded anyway. Their NumPy/torch path widened the values and
    decoded positions, and its torch ops woke torch's OpenMP threads, which then spin beside the
    kernels on a small machine (one torch thread made 100 steps of ``benchmarks/readpath.py``'s MLP
    6–10 % faster)."""
    return numel >= NUMBA_MIN_NUMEL or bool(_loaded)


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
        # a word at a time: 4× faster than per byte (25 rows of 4.2M entries: 2.5 → 0.65 ms)
        count = lambda a, b: np.bitwise_count(packed[:, 8 * a: 8 * b].view(np.uint64)).sum(axis=1, dtype=np.int64)  # noqa: E731
    else:
        count = lambda a, b: packed[:, a:b].sum(axis=1, dtype=np.int64)  # noqa: E731
    before = np.cumsum([np.zeros(n, np.int64)] + [count(a, b) for a, b in zip(cuts[:-2], cuts[1:-1])], axis=0)
    tasks = [(cuts[i], cuts[i + 1], before[i]) for i in range(parts)]
    run = lambda t: kernel(acc, packed, vals, shift, t[0], t[1], t[2])  # noqa: E731
    bad = map_shared(run, tasks)
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
    if out.device.type == "cpu" and compiled_for(out.numel()) and isinstance(packed, np.ndarray):
        _add_numba(out, np.ascontiguousarray(packed), values.contiguous(), codec)
    else:
        if isinstance(packed, np.ndarray):
            packed = as_tensor(packed).to(out.device)
        _add_torch(out, packed, values.to(out.device).float(), codec, out.numel())
