"""The writer's block buffer: a block of steps' encoded rows, every layer's side by side.

A step arrives as two flat arrays (every layer's kept values, every sparse layer's positions, in the
store's layer order) and is encoded with one call for the values and one compiled call for every
layer's positions, whatever the number of layers. Encoding layer by layer (two torch conversions and
four NumPy calls each) cost the writer 0.23 ms of CPU a step on the 8-layer digits CNN, whose step
takes 3 ms on two cores; the writer then caught up at the recorder's close.

Each layer's rows are a column slice of one wide buffer per stored dtype (values; bitmaps; 16- and
32-bit gaps); ``write_shards`` copies a layer's slice to contiguous rows once a block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._codecs import CorruptRowError, ValuesCodec
from ._format import LayerSpec
from .errors import UnsupportedFormatError

__all__ = ["BlockRows", "flatten"]


def flatten(rows: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer ``(values, positions)`` tensors (on the host) as the two flat arrays ``BlockRows.encode`` takes."""
    vals = [v.detach().float().cpu().numpy().reshape(-1) for v, _ in rows]
    pos = [p.detach().cpu().numpy().reshape(-1) for _, p in rows if p is not None]
    return (np.concatenate(vals) if vals else np.zeros(0, np.float32),
            np.concatenate(pos).astype(np.int64, copy=False) if pos else np.zeros(0, np.int64))


class BlockRows:
    """``block`` rows of every layer of ``specs``: ``values[i]`` and ``positions[i]`` (``None`` for a
    dense layer) are layer ``i``'s ``(block, width)`` views, in the dtypes of its Zarr arrays."""

    def __init__(self, specs: list[LayerSpec], block: int, values: ValuesCodec, arrays: list[tuple[Any, Any]]) -> None:
        # ``arrays``: each layer's (values, positions or None) Zarr arrays, whose dtypes and widths the rows take
        self._specs = specs
        self._codec = values
        ks = np.array([s.k for s in specs], dtype=np.int64)
        self.num_values = int(ks.sum())
        self._vwide = np.zeros((block, self.num_values), dtype=values.storage)
        cuts = np.concatenate([[0], np.cumsum(ks)]).tolist()
        self.values = [self._vwide[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
        # positions: each sparse layer's row at an offset of the wide row of its dtype
        widths: dict[np.dtype, int] = {}
        kinds, src, dst, layout, at = [], [], [], [], 0
        for s, (varr, parr) in zip(specs, arrays):
            if np.dtype(varr.dtype) != values.storage or varr.shape[1] != s.k:
                raise UnsupportedFormatError(f"layer {s.name!r}: values array {varr.dtype} × {varr.shape[1]} is not "
                                             f"{values.storage} × {s.k}")
            if parr is None:
                kinds.append(0), src.append(0), dst.append(0), layout.append(None)
                continue
            dt, width = np.dtype(parr.dtype), int(parr.shape[1])
            kind = {("bitmap", "uint8"): 1, ("gaps", "uint16"): 2, ("gaps", "uint32"): 3}.get((s.positions, dt.name))
            if kind is None:
                raise UnsupportedFormatError(f"layer {s.name!r}: {s.positions} positions stored as {dt} cannot be written")
            kinds.append(kind), src.append(at), dst.append(widths.get(dt, 0)), layout.append((dt, widths.get(dt, 0), width))
            widths[dt] = widths.get(dt, 0) + width
            at += s.k
        self.num_positions = at
        self._pwide = {dt: np.zeros((block, w), dtype=dt) for dt, w in widths.items()}
        self.positions = [None if lay is None else self._pwide[lay[0]][:, lay[1]:lay[1] + lay[2]] for lay in layout]
        self._tables = np.array([kinds, ks.tolist(), [s.numel for s in specs], src, dst], dtype=np.int64).reshape(5, -1)
        self._empty = {dt: np.zeros(0, dt) for dt in ("uint8", "uint16", "uint32")}

    def _row(self, dtype: str, r: int) -> np.ndarray:
        wide = self._pwide.get(np.dtype(dtype))
        return self._empty[dtype] if wide is None else wide[r]

    def encode(self, r: int, values: np.ndarray, positions: np.ndarray) -> tuple[bool, bool]:
        """Row ``r`` of every layer from one step's flat float32 ``values`` and int64 ``positions``; returns
        whether every value is finite and whether any is non-zero (the writer's status decision: it clears
        the row of a step it does not store).

        Raises ``CorruptRowError`` (row ``r`` is then unspecified) when the sizes do not match the
        layers or a layer's positions are out of range or not strictly increasing.
        """
        if values.shape != (self.num_values,) or positions.shape != (self.num_positions,):
            raise CorruptRowError(f"a step holds {values.size} values and {positions.size} positions; the layers "
                                  f"keep {self.num_values} and {self.num_positions}")
        from ._codecs._jit import encode_bfloat16, encode_positions

        values = np.ascontiguousarray(values, dtype=np.float32)
        if self._codec.name == "bfloat16":  # one compiled pass (rounding and both checks), not seven NumPy ones
            flags = encode_bfloat16(values.view(np.uint32), self._vwide[r])
            finite, nonzero = not flags & 1, bool(flags & 2)
        else:
            finite, nonzero = bool(np.isfinite(values).all()), bool(values.any())
            self._vwide[r] = self._codec.from_float32(values)
        bad = encode_positions(np.ascontiguousarray(positions, dtype=np.int64), self._tables,
                               self._row("uint8", r), self._row("uint16", r), self._row("uint32", r))
        if bad >= 0:
            raise CorruptRowError(f"layer {self._specs[bad].name!r}: kept positions out of range or not strictly "
                                  "increasing")
        return finite, nonzero

    def clear(self, r: int) -> None:
        """Row ``r`` of every layer to zeros (a step without a stored update)."""
        self._vwide[r] = 0
        for wide in self._pwide.values():
            wide[r] = 0
