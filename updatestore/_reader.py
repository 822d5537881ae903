"""The read path: plan slices over sorted steps, fetch every layer concurrently, decode into ``Rows``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from ._codecs import positions_codec, values_codec
from ._format import STATUS_RECORDED, LayerSpec, missing_chunks, paths
from .errors import CorruptStoreError, UpdateStoreError

__all__ = ["Rows", "Reader", "read_plan"]


@dataclass(frozen=True)
class Rows:
    """Decoded rows of one layer for some steps: the same type for every layer, dense included.

    ``values`` is float32 ``(n, k)``; ``positions`` is int64 ``(n, k)`` flat indices into
    the parameter (for a dense layer, a broadcast view of ``0..numel-1`` that takes no
    memory). Steps without a stored update (skipped, not stored, purged) have zero values.

    >>> rows = store.read([3, 4, 9])["fc.weight"]          # doctest: +SKIP
    >>> delta = rows.sum(torch.zeros(rows.numel))          # doctest: +SKIP
    """

    layer: str
    steps: np.ndarray
    values: torch.Tensor
    positions: torch.Tensor
    numel: int
    dense: bool

    def to(self, device: torch.device | str) -> "Rows":
        """The rows on ``device`` (a dense layer's positions are rebuilt there, not copied)."""
        values = self.values.to(device, non_blocking=True)
        if self.dense:
            positions = torch.arange(self.numel, device=values.device).expand(*self.values.shape)
        else:
            positions = self.positions.to(device, non_blocking=True)
        return Rows(self.layer, self.steps, values, positions, self.numel, self.dense)

    def sum(self, out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Add every row into the flat tensor ``out`` (scatter-add at the positions) and return it.

        ``columns`` ``(n, k')`` picks which entries of each row to add (e.g. each
        row's largest k'); by default all of them.
        """
        values, positions = self.values, self.positions
        if columns is not None:
            values, positions = values.gather(1, columns), positions.gather(1, columns)
        elif self.dense:
            return out.add_(values.sum(0))
        return out.index_add_(0, positions.reshape(-1), values.reshape(-1))


def read_plan(sel: slice | np.ndarray, chunk_rows: int) -> tuple[list[slice], np.ndarray | None]:
    """Slices covering the sorted steps ``sel`` (runs merged across gaps < ``chunk_rows``),
    and which rows of their concatenation are the wanted ones (``None``: all).

    Steps are read as slices: Zarr's orthogonal selection was 5× slower than
    per-run slices on sharded arrays (zarr 3.1). Runs closer than one inner chunk
    share chunks anyway, so a small layer's scattered steps cost one call.

    >>> read_plan(np.array([1, 2, 3, 9]), 4)
    ([slice(1, 4, None), slice(9, 10, None)], None)
    """
    if isinstance(sel, slice):
        return [sel], None
    cut = np.flatnonzero(np.diff(sel) > max(1, chunk_rows)) + 1
    groups = np.split(sel, cut)
    spans = [slice(int(g[0]), int(g[-1]) + 1) for g in groups]
    offsets = np.cumsum([0] + [s.stop - s.start for s in spans[:-1]])
    keep = np.concatenate([g - s.start + o for g, s, o in zip(groups, spans, offsets)])
    return spans, None if len(keep) == sum(s.stop - s.start for s in spans) else keep


class Reader:
    """Reads and decodes rows of a store's layers; array handles are cached per step count."""

    def __init__(self, root: zarr.Group, specs: tuple[LayerSpec, ...], meta: dict, where: str) -> None:
        self._root = root
        self._specs = {s.name: s for s in specs}
        self._values = values_codec(meta["value_dtype"])
        self._where = where
        self._block = meta["block_steps"]
        # every chunk of a committed step exists (stores written since 0.2, FORMAT.md)
        self._strict = meta.get("chunks_always_written") is True
        self._arrays: dict[str, tuple[zarr.Array, zarr.Array | None]] = {}
        self._verified: set[tuple[str, int]] = set()

    def spec(self, layer: str) -> LayerSpec:
        spec = self._specs.get(layer)
        if spec is None:
            raise KeyError(f"store {self._where} has no layer {layer!r}; layers: {list(self._specs)}")
        return spec

    def invalidate(self) -> None:
        self._arrays = {}
        self._verified = set()

    def _verify(self, spec: LayerSpec, arrays: tuple[zarr.Array, zarr.Array | None], steps: np.ndarray,
                rows: np.ndarray) -> None:
        """The shards holding the rows of recorded ``steps`` exist (Zarr would read a deleted one as
        zeros). Positions of bitmap rows (k bits set) and of gap rows with k > 1 are never all zero, so
        they are checked in any store; values only where the store promises zero chunks are written."""
        blocks = [int(b) for b in np.unique(rows // self._block) if (spec.name, int(b)) not in self._verified]
        varr, parr = arrays
        checked = [parr] if parr is not None and (spec.positions == "bitmap" or spec.k > 1 or self._strict) else []
        checked += [varr] if self._strict else []
        for arr in checked:
            lost = missing_chunks(arr, [(b, 0) for b in blocks])
            if lost:
                hit = steps[rows // self._block == lost[0][0]]
                raise CorruptStoreError(
                    f"store {self._where}: layer {spec.name!r}: the shard holding steps {hit[0]}..{hit[-1]} is "
                    f"missing from {arr.path} although they hold a recorded update; restore it from a backup")
        self._verified.update((spec.name, b) for b in blocks)

    def _layer_arrays(self, spec: LayerSpec, num_rows: int) -> tuple[zarr.Array, zarr.Array | None]:
        # Opening an array reads its zarr.json; cache the handles (reopened after a resize).
        arrays = self._arrays.get(spec.name)
        if arrays is None or arrays[0].shape[0] < num_rows:
            varr = self._root[paths.values(spec.name)]
            parr = self._root[paths.positions(spec.name)] if positions_codec(spec.positions).stored else None
            arrays = self._arrays[spec.name] = (varr, parr)
            if min(a.shape[0] for a in arrays if a is not None) < num_rows:
                raise CorruptStoreError(f"store {self._where}: layer {spec.name!r} holds {varr.shape[0]} rows but "
                                        f"committed steps use {num_rows}; restore it from a backup")
        return arrays

    def read(self, layers: list[str], steps: np.ndarray, rows: np.ndarray, status: np.ndarray) -> dict[str, Rows]:
        """Rows of sorted, unique ``steps`` (validated by the caller) for ``layers``.

        ``rows`` and ``status`` are the layer rows and statuses of exactly those steps.
        Every array of every layer is fetched in one concurrent round trip.
        """
        specs = [self.spec(name) for name in layers]
        need = int(rows[-1]) + 1 if rows.size else 0
        recorded = status == STATUS_RECORDED
        for spec in specs:
            self._verify(spec, self._layer_arrays(spec, need), steps[recorded], rows[recorded])
        contiguous = rows.size == 0 or rows[-1] - rows[0] + 1 == rows.size
        start = int(rows[0]) if rows.size else 0
        sel: slice | np.ndarray = slice(start, start + rows.size) if contiguous else rows
        what = (f"{steps[0]}..{steps[-1]}" + ("" if steps[-1] - steps[0] + 1 == steps.size else f" ({steps.size} steps)")
                if steps.size else "(none)")
        plans = [read_plan(sel, spec.chunk_rows) for spec in specs]
        arrays = [(a, plan) for spec, plan in zip(specs, plans) for a in self._layer_arrays(spec, need)]

        async def fetch(arr: zarr.Array | None, plan: tuple[list[slice], np.ndarray | None]):
            if arr is None:
                return None
            spans, keep = plan
            parts = await asyncio.gather(*(arr.async_array.getitem(r) for r in spans))
            block = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return block if keep is None else block[keep]

        async def fetch_all():
            return await asyncio.gather(*(fetch(a, plan) for a, plan in arrays), return_exceptions=True)

        raw = sync(fetch_all())
        # Rows of steps without a stored update are zeros on disk; decode only recorded
        # rows and give the others zero values at 0..k-1.
        out = {}
        for i, spec in enumerate(specs):
            try:
                out[spec.name] = self._decode(spec, steps, raw[2 * i], raw[2 * i + 1], recorded, what)
            except UpdateStoreError:
                raise
            except Exception as exc:  # checksum, codec or decode failure: name what is broken
                raise CorruptStoreError(
                    f"store {self._where}: layer {spec.name!r} steps {what} cannot be read: {exc}"
                ) from exc
        return out

    def _decode(self, spec: LayerSpec, steps: np.ndarray, raw_v, raw_p, recorded: np.ndarray, what: str) -> Rows:
        for r in (raw_v, raw_p):
            if isinstance(r, BaseException):
                raise r
        values = self._values.to_torch(raw_v)
        codec = positions_codec(spec.positions)
        n = len(recorded)
        if not codec.stored:
            positions = torch.arange(spec.k).expand(n, spec.k)
        else:
            pos = np.broadcast_to(np.arange(spec.k, dtype=np.int64), (n, spec.k)).copy()
            if recorded.any():
                pos[recorded] = codec.decode(raw_p[recorded], spec.numel, spec.k)
            if (~recorded).any() and values[torch.from_numpy(~recorded)].any():
                raise CorruptStoreError(f"store {self._where}: layer {spec.name!r} holds values "
                                        f"for steps {what} that have no stored update")
            positions = torch.from_numpy(pos)
        return Rows(spec.name, steps, values, positions, spec.numel, not codec.stored)
