"""The read path: plan slices over sorted steps, fetch every layer concurrently, decode into ``Rows``."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import zarr

from ._backend import local_root
from ._codecs import positions_codec, values_codec
from ._format import STATUS_RECORDED, LayerSpec, missing_chunks, paths
from ._format.shards import ShardLayout, read_rows
from ._kernels import NUMBA_MIN_NUMEL, add_packed, as_tensor, compiled_for
from .errors import CorruptStoreError, UpdateStoreError

__all__ = ["Rows", "PartRows", "Reader", "read_plan"]


@dataclass(frozen=True)
class Rows:
    """Decoded rows of one layer for some steps: the same type for every layer, dense included.

    ``values`` is float32 ``(n, k)`` (``stored``: the same values in the store's value dtype, which
    ``sum`` adds without widening a copy); ``positions`` is int64 ``(n, k)`` flat indices into
    the parameter, decoded from the stored rows (``packed``) only when asked for: ``sum``
    adds straight from the packed rows (for a dense layer, positions are a broadcast view of
    ``0..numel-1`` that takes no memory). Steps without a stored update (skipped, not stored,
    purged) have zero values.

    >>> rows = store.read([3, 4, 9])["fc.weight"]          # doctest: +SKIP
    >>> delta = rows.sum(torch.zeros(rows.numel))          # doctest: +SKIP
    """

    layer: str
    steps: np.ndarray
    stored: torch.Tensor
    numel: int
    dense: bool
    codec: str = "dense"
    #: the stored positions rows ``(n, width)``, validated; zeros for rows without an update
    packed: np.ndarray | torch.Tensor | None = None
    recorded: np.ndarray | None = None

    @cached_property
    def values(self) -> torch.Tensor:
        return self.stored.float()

    @staticmethod
    def step_bytes(spec: LayerSpec, value_dtype: str) -> int:
        """Memory one step of ``spec`` takes once read and summed: the values as stored and the packed
        positions row; small layers (summed with NumPy/torch) also widen values to float32 and decode
        int64 positions, large ones are summed from the stored rows.

        >>> Rows.step_bytes(store.layers[0], store.value_dtype)   # doctest: +SKIP
        """
        value_bytes = getattr(torch, value_dtype).itemsize
        if spec.positions == "dense":
            return (value_bytes + 4) * spec.k
        packed = spec.numel // 8 if spec.positions == "bitmap" else 8 * spec.k  # gaps: widened to int64 on a GPU
        return value_bytes * spec.k + packed + (12 * spec.k if spec.numel < NUMBA_MIN_NUMEL else 0)

    @cached_property
    def positions(self) -> torch.Tensor:
        n, k = self.stored.shape
        if self.dense or self.packed is None:
            return torch.arange(k, device=self.stored.device).expand(n, k)
        host = self.packed if isinstance(self.packed, np.ndarray) else self.packed.cpu().numpy()
        pos = np.broadcast_to(np.arange(k, dtype=np.int64), (n, k)).copy()
        if self.recorded.any():
            pos[self.recorded] = positions_codec(self.codec).decode(host[self.recorded], self.numel, k)
        return torch.from_numpy(pos).to(self.stored.device)

    def to(self, device: torch.device | str) -> "Rows":
        """The rows on ``device``: the stored values and the packed rows are copied, positions are decoded there."""
        device = torch.device(device)
        if device.type == "cpu" and self.stored.device.type == "cpu":
            return self
        packed = as_tensor(self.packed) if isinstance(self.packed, np.ndarray) else self.packed
        if packed is not None:
            packed = packed.to(device, non_blocking=True)
        return Rows(self.layer, self.steps, self.stored.to(device, non_blocking=True), self.numel, self.dense,
                    self.codec, packed, self.recorded)

    def sum(self, out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Add every row into the flat float32 tensor ``out`` (scatter-add at the positions) and return it.

        ``columns`` ``(n, k')`` picks which entries of each row to add (e.g. each
        row's largest k'); by default all of them, added straight from the packed rows.
        """
        if columns is not None:
            values, positions = self.values.gather(1, columns), self.positions.gather(1, columns)
            return out.index_add_(0, positions.reshape(-1), values.reshape(-1))
        if self.dense:
            return out.add_(self.stored.sum(0, dtype=torch.float32))
        if out.device.type == "cpu" and not compiled_for(self.numel):  # small: NumPy decode is fast enough
            return out.index_add_(0, self.positions.reshape(-1), self.values.reshape(-1))
        add_packed(out, self.packed, self.stored, self.codec)
        return out


@dataclass(frozen=True)
class PartRows:
    """The rows of one parameter of a sharded store: each part's :class:`Rows` at its flat offset.

    ``values``/``positions`` are the parts' side by side (positions into the whole parameter),
    so ``columns`` index them as for one layer; ``sum`` adds each part into its slice of ``out``.
    """

    layer: str
    steps: np.ndarray
    parts: list[tuple[int, Rows]]

    dense = False
    numel = property(lambda self: sum(r.numel for _, r in self.parts))

    @cached_property
    def values(self) -> torch.Tensor:
        return torch.cat([r.values for _, r in self.parts], 1)

    @cached_property
    def positions(self) -> torch.Tensor:
        return torch.cat([r.positions + offset for offset, r in self.parts], 1)

    def to(self, device: torch.device | str) -> "PartRows":
        return PartRows(self.layer, self.steps, [(o, r.to(device)) for o, r in self.parts])

    def sum(self, out: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        if columns is not None:
            values, positions = self.values.gather(1, columns), self.positions.gather(1, columns)
            return out.index_add_(0, positions.reshape(-1), values.reshape(-1))
        for offset, rows in self.parts:
            rows.sum(out[offset: offset + rows.numel])
        return out


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
    """Reads and decodes rows of a store's layers; array handles and the shards found to exist are cached
    per step count and per store generation (a purge or rollback elsewhere drops them)."""

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
        self._generation = 0  # the store's generation the caches above hold for

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

    def read(self, layers: list[str], steps: np.ndarray, rows: np.ndarray, status: np.ndarray,
             generation: int = 0) -> dict[str, Rows]:
        """Rows of sorted, unique ``steps`` (validated by the caller) for ``layers``.

        ``rows`` and ``status`` are the layer rows and statuses of exactly those steps, at the store's
        ``generation``. Every array of every layer is fetched concurrently (``shards.read_rows``).
        """
        if generation != self._generation:  # a purge or rollback elsewhere erased shards: check them again
            self.invalidate()
            self._generation = generation
        specs = [self.spec(name) for name in layers]
        need = int(rows[-1]) + 1 if rows.size else 0
        recorded = status == STATUS_RECORDED
        for spec in specs:
            self._verify(spec, self._layer_arrays(spec, need), steps[recorded], rows[recorded])
        what = (f"{steps[0]}..{steps[-1]}" + ("" if steps[-1] - steps[0] + 1 == steps.size else f" ({steps.size} steps)")
                if steps.size else "(none)")
        arrays = [a for spec in specs for a in self._layer_arrays(spec, need)]
        layouts = [ShardLayout.of(a) for a in arrays if a is not None]
        got = iter(read_rows(arrays[0].store, layouts, rows, local_root(arrays[0].store)) if layouts else [])
        raw = [None if a is None else next(got) for a in arrays]
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
        values = self._values.as_tensor(raw_v)
        if (~recorded).any() and values[torch.from_numpy(~recorded)].any():
            raise CorruptStoreError(f"store {self._where}: layer {spec.name!r} holds values "
                                    f"for steps {what} that have no stored update")
        codec = positions_codec(spec.positions)
        if not codec.stored:
            return Rows(spec.name, steps, values, spec.numel, True)
        if recorded.all():  # no fancy-indexed copy of every row in the common case
            codec.check(raw_p, spec.numel, spec.k)
        elif recorded.any():
            codec.check(raw_p[recorded], spec.numel, spec.k)
        if not recorded.all():
            raw_p[~recorded] = 0  # kernels read them: nothing stored there, nothing added
        return Rows(spec.name, steps, values, spec.numel, False, spec.positions, raw_p, recorded)
