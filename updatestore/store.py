"""``UpdateStore``: create/open a store, record into it, read rows, query, footprint."""

from __future__ import annotations

import asyncio
import os
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.errors
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore, WrapperStore, ZipStore  # noqa: F401 (MemoryStore: docstring example)

from . import __version__
from .config import StoreConfig, resolve_keep
from .encoding import decode_bitmap, decode_gaps, values_from_numpy
from .errors import (
    ConfigError,
    CorruptStoreError,
    ModelMismatchError,
    NotAStoreError,
    ReadOnlyStoreError,
    RecorderError,
    SampleIdError,
    StoreExistsError,
    StoreNotFoundError,
    UpdateStoreError,
)
from .footprint import Footprint
from .index import SampleIndex, as_sample_ids
from .lock import LOCK_NAME, WriterLock
from .layout import (
    PURGED_ID,
    STATUS_PURGED,
    STATUS_RECORDED,
    LayerSpec,
    create_tree,
    model_fingerprint,
    new_meta,
    open_arrays,
    plan_layers,
    read_counts,
    read_index_record,
    read_ledger,
    read_meta,
    read_owner_count,
    write_index_record,
    write_ledger,
    write_owner_count,
)
from .recorder import Recorder
from .writer import BlockWriter, StepRecord

__all__ = ["UpdateStore"]

PathLike = str | os.PathLike | zarr.abc.store.Store


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _CountingStore(WrapperStore):
    """Counts the bytes zarr reads through it (what unlearning reports as bytes read)."""

    def __init__(self, store: zarr.abc.store.Store) -> None:
        super().__init__(store)
        self.bytes_read = 0

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.bytes_read += len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):  # type: ignore[no-untyped-def]
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.bytes_read += sum(len(b) for b in bufs if b is not None)
        return bufs


def _to_store(path: PathLike, *, read_only: bool,
              storage_options: dict[str, Any] | None = None) -> tuple[zarr.abc.store.Store, str]:
    """A Zarr store for a local path, a ``.zip`` file (read-only), a URL, or a Store as is."""
    if isinstance(path, zarr.abc.store.Store):
        return path, repr(path)
    text = os.fspath(path)
    if "://" in str(text) and not str(text).startswith("file://"):
        try:
            store = FsspecStore.from_url(str(text), storage_options=storage_options, read_only=read_only)
        except ImportError as exc:
            raise ConfigError(f"{text}: this URL needs fsspec and its backend ({exc}); e.g. pip install s3fs") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{text} is not a URL zarr can open: {exc}") from None
        return store, str(text)
    p = Path(str(text).removeprefix("file://"))
    if p.suffix == ".zip":
        if not read_only:
            raise ConfigError(f"{p}: zip stores are read-only here (a zip cannot replace the commit record in "
                              "place); record into a directory and zip it when it is finished")
        if not p.is_file():
            raise StoreNotFoundError(f"no update store at {p}: the file does not exist")
        return ZipStore(p, mode="r"), str(p)
    return LocalStore(p, read_only=read_only), str(p)


def _read_plan(sel: slice | np.ndarray, chunk_rows: int) -> tuple[list[slice], np.ndarray | None]:
    """Slices covering the sorted steps ``sel`` (runs merged across gaps < ``chunk_rows``),
    and which rows of their concatenation are the wanted ones (``None``: all)."""
    if isinstance(sel, slice):
        return [sel], None
    cut = np.flatnonzero(np.diff(sel) > max(1, chunk_rows)) + 1
    groups = np.split(sel, cut)
    spans = [slice(int(g[0]), int(g[-1]) + 1) for g in groups]
    offsets = np.cumsum([0] + [s.stop - s.start for s in spans[:-1]])
    keep = np.concatenate([g - s.start + o for g, s, o in zip(groups, spans, offsets)])
    return spans, None if len(keep) == sum(s.stop - s.start for s in spans) else keep


class UpdateStore:
    """Pruned per-step parameter updates of one training run, in a Zarr v3 group.

    Create one before training, attach it with :meth:`recorder`, and later ask
    which steps saw some samples (:meth:`batches_containing`) and read those
    steps' stored updates (:meth:`read_rows`) — or let ``unlearn.amnesiac`` do it.

    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> with UpdateStore.create(MemoryStore(), model, keep=0.5) as store:
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     with store.recorder(model, opt) as rec:
    ...         with rec.batch([10, 11]):
    ...             opt.zero_grad(); model(torch.ones(2, 4)).sum().backward(); opt.step()
    ...     store.batches_containing([11]).tolist()
    [0]
    """

    def __init__(self, root: zarr.Group, where: str, mode: str) -> None:
        self._root = root
        self._counter: _CountingStore = root.store  # type: ignore[assignment]
        self._where = where
        self._mode = mode
        try:
            self._meta, specs = read_meta(root, where)
            self._steps, self._samples = read_counts(root, where)
            self._all_arrays = open_arrays(root, self._meta, specs, self._steps, self._samples, where)
        except UpdateStoreError:
            raise
        except Exception as exc:  # damaged JSON or metadata that zarr cannot parse
            raise NotAStoreError(f"{where} cannot be opened as an update store: {exc}") from exc
        self._specs: tuple[LayerSpec, ...] = tuple(specs)
        self._by_name = {s.name: s for s in specs}
        self._writer: BlockWriter | None = None
        self._writer_owner: Recorder | None = None
        self._index: SampleIndex | None = None
        self._status: np.ndarray | None = None
        self._arrays: dict[str, tuple[zarr.Array, zarr.Array | None]] = {}
        self._owner_table: tuple[np.ndarray, np.ndarray] | None = None
        self._closed = False
        self._lock: WriterLock | None = None
        if mode == "r+":
            self._take_lock()

    def _take_lock(self) -> None:
        backend = self._counter._store
        if isinstance(backend, LocalStore):
            lock = WriterLock(backend.root)
            lock.acquire()
            self._lock = lock
            # Release even if the handle is dropped without close().
            self._finalizer = weakref.finalize(self, lock.release)

    # ------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: PathLike, model: torch.nn.Module, *, keep: float | Mapping[str, float] = 0.1,
               value_dtype: str = "bfloat16", positions: str = "auto", buffer_bytes: int = 64 * 2**20,
               clevel: int = 5, overwrite: bool = False,
               storage_options: dict[str, Any] | None = None) -> "UpdateStore":
        """A new, empty store for ``model``'s trainable parameters, opened ``"r+"``.

        ``path``: a directory, a URL (``s3://...`` with ``storage_options``) or a
        Zarr ``Store``; see :meth:`open`.

        ``keep`` is the fraction of each layer's entries kept per step (largest
        |Δθ|), or ``{pattern: fraction}`` with ``"*"`` as the default. See
        :class:`StoreConfig` for the other options.
        """
        config = StoreConfig(keep=keep, value_dtype=value_dtype, positions=positions,
                             buffer_bytes=buffer_bytes, clevel=clevel)
        params = _trainable(model)
        if not params:
            raise ConfigError("the model has no trainable parameters to record")
        named = [(n, tuple(p.shape), _dtype_name(p.dtype)) for n, p in params]
        ratios = resolve_keep(config.keep, [n for n, *_ in named])
        specs, block = plan_layers(named, ratios, config)
        store, where = _to_store(path, read_only=False, storage_options=storage_options)
        if isinstance(store, LocalStore) and store.root.exists():
            if not overwrite and (store.root.is_file() or any(store.root.iterdir())):
                raise StoreExistsError(
                    f"{where} already exists and is not empty; choose a new path, "
                    "open it with UpdateStore.open(path, 'r+'), or pass overwrite=True"
                )
            if overwrite and store.root.is_dir():
                probe = WriterLock(store.root)  # never overwrite a store someone is writing
                probe.acquire()
                probe.release()
                shutil.rmtree(store.root)
                overwrite = False
        meta = new_meta(specs, block, config, model_fingerprint(named), __version__)
        try:
            root = zarr.open_group(_CountingStore(store), mode="w" if overwrite else "w-", zarr_format=3)
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
            raise StoreExistsError(f"{where} already holds Zarr data; pass overwrite=True to replace it") from exc
        create_tree(root, specs, block, config, meta)
        return cls(root, where, "r+")

    @classmethod
    def open(cls, path: PathLike, mode: str = "r", *,
             storage_options: dict[str, Any] | None = None) -> "UpdateStore":
        """Open an existing store: ``"r"`` to read and unlearn, ``"r+"`` to append.

        ``path`` is a directory, a ``.zip`` of one (read-only), any URL zarr's
        fsspec store opens (``s3://bucket/run.zarr``, ``memory://run``, with
        ``storage_options`` for credentials and endpoints), or a Zarr ``Store``.
        """
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
        store, where = _to_store(path, read_only=mode == "r", storage_options=storage_options)
        if isinstance(store, LocalStore):
            if not store.root.exists():
                raise StoreNotFoundError(
                    f"no update store at {where}: the path does not exist; "
                    "create one with UpdateStore.create(path, model)"
                )
            if not (store.root / "zarr.json").is_file():
                raise NotAStoreError(
                    f"{where} is not an update store (no zarr.json in it); "
                    "check the path, or create one with UpdateStore.create(path, model)"
                )
        try:
            root = zarr.open_group(_CountingStore(store), mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError(f"no update store at {where}") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise NotAStoreError(f"{where} is not a readable update store: {exc}") from exc
        return cls(root, where, mode)

    def __enter__(self) -> "UpdateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self) -> None:
        """Write and commit every step recorded so far (the writer otherwise writes whole blocks)."""
        if self._writer is not None:
            self._writer.flush()
            self._refresh_counts()

    def close(self) -> None:
        """Flush pending steps and release the writer; reading still works after."""
        if self._writer is not None:
            owner = self._writer_owner
            if owner is not None:
                owner.detach()
            else:  # pragma: no cover - writer without owner does not happen
                self._close_writer(None)
        if self._lock is not None:
            self._lock.release()
        self._closed = True

    # ------------------------------------------------------------ properties
    @property
    def path(self) -> str:
        return self._where

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        """The recorded layers: name, shape, dtype, keep, k, positions encoding."""
        return self._specs

    @property
    def value_dtype(self) -> str:
        return self._meta["value_dtype"]

    @property
    def config(self) -> StoreConfig:
        return StoreConfig.from_dict(self._meta["config"])

    @property
    def meta(self) -> dict[str, Any]:
        """The store's self-description (format and library version, fingerprint, layers...)."""
        return dict(self._meta)

    @property
    def num_batches(self) -> int:
        """Committed steps (optimizer steps, "batches"), skipped ones included."""
        self._refresh_counts()
        return self._steps

    @property
    def num_samples(self) -> int:
        """Sample IDs indexed, counting each repeat across epochs."""
        self._refresh_counts()
        return self._samples

    # ------------------------------------------------------------ recording
    def recorder(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 watch: Any = None, process_group: Any = None) -> Recorder:
        """A recorder for ``model``; with ``optimizer`` it hooks ``optimizer.step()``.

        ``watch``: store updates only for steps that contain one of these sample
        IDs (every step's samples are indexed regardless).
        """
        return Recorder(self, model, optimizer, watch=watch, process_group=process_group)

    def _require_writable(self, what: str) -> None:
        if self._mode != "r+":
            raise ReadOnlyStoreError(
                f"cannot {what}: store {self._where} is open read-only; open it with UpdateStore.open(path, 'r+')"
            )
        if self._closed:
            raise ReadOnlyStoreError(f"cannot {what}: store {self._where} is closed; open it again")

    def _match_model(self, model: torch.nn.Module) -> list[tuple[LayerSpec, torch.nn.Parameter]]:
        """Pair each stored layer with the model's parameter, or explain the mismatch."""
        params = dict(_trainable(model))
        out = []
        for spec in self._specs:
            p = params.pop(spec.name, None)
            if p is None:
                raise ModelMismatchError(
                    f"store {self._where} was recorded for a model with layer {spec.name!r} of shape "
                    f"{spec.shape}; this model has no trainable parameter of that name"
                )
            if tuple(p.shape) != spec.shape:
                raise ModelMismatchError(
                    f"store {self._where} was recorded for a model with layer {spec.name!r} of shape "
                    f"{spec.shape}; this model has {tuple(p.shape)}"
                )
            out.append((spec, p))
        if params:
            raise ModelMismatchError(
                f"this model has trainable parameter(s) {sorted(params)} that store {self._where} "
                "does not record; freeze them (requires_grad=False) or create a store for this model"
            )
        return out

    def check_model(self, model: torch.nn.Module) -> list[tuple[LayerSpec, torch.nn.Parameter]]:
        """Pair each recorded layer with ``model``'s parameter of that name.

        Raises ``ModelMismatchError`` unless ``model`` has exactly the recorded
        layers with the recorded shapes.
        """
        return self._match_model(model)

    def _open_writer(self, owner: Recorder) -> None:
        self._require_writable("record")
        if self._writer is not None:
            raise RecorderError(f"store {self._where} already has a recorder attached; detach it first")
        self._refresh_counts()
        self._writer = BlockWriter(self._root, list(self._specs), self._meta["block_steps"],
                                   self._steps, self._samples)
        self._writer_owner = owner

    def _close_writer(self, owner: Recorder | None) -> None:
        writer, self._writer, self._writer_owner = self._writer, None, None
        if writer is not None:
            try:
                writer.close()
            finally:
                self._steps, self._samples = writer.committed_steps, writer.committed_samples
            self._persist_index()

    def _writer_put(self, record: StepRecord) -> None:
        if self._writer is None:
            raise RecorderError("the store's writer is closed; record inside `with store.recorder(...)`")
        self._writer.put(record)

    def _refresh_counts(self) -> None:
        if self._writer is not None:
            self._steps, self._samples = self._writer.committed_steps, self._writer.committed_samples
        elif self._mode == "r":
            # Another process may be recording: the commit record says what is safe to read.
            self._steps, self._samples = read_counts(self._root, self._where)

    # ------------------------------------------------------------ query layer
    def _get_index(self) -> SampleIndex:
        n = self.num_batches
        if self._index is None or self._index.num_steps != n:
            m = self._samples
            try:
                ends = self._root["steps/sample_end"][:n] if n else np.zeros(0, np.int64)
                ids = self._root["samples/ids"][:m] if m else np.zeros(0, np.int64)
                status = self._root["steps/status"][:n] if n else np.zeros(0, np.uint8)
            except Exception as exc:  # checksum or codec failure in the step table
                raise CorruptStoreError(f"store {self._where}: the step table or sample index cannot be read: "
                                        f"{exc}") from exc
            if n and (ends[-1] != m or (np.diff(ends, prepend=0) < 0).any()):
                raise CorruptStoreError(f"store {self._where}: step table does not match {m} indexed samples")
            if (status > STATUS_PURGED).any():
                raise CorruptStoreError(f"store {self._where}: unknown step status codes {np.unique(status)}")
            self._index = SampleIndex(ids, ends, presorted=self._presorted(n, ends))
            self._status = status
        return self._index

    def _presorted(self, n: int, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        """The sorted index already built for the first steps: this handle's own, else the
        one persisted in the store; only the steps after it need sorting."""
        if self._index is not None and self._index.num_steps <= n:
            return self._index.sorted_ids, self._index.sorted_steps, self._index.num_steps
        record = read_index_record(self._root)
        if record is None or record[0] == 0 or record[0] > n or record[1] != int(ends[record[0] - 1]):
            return None
        try:
            m0 = record[1]
            return self._root["index/sorted_ids"][:m0], self._root["index/sorted_steps"][:m0], record[0]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the sample IDs, the source of truth
            return None

    def _persist_index(self, force: bool = False) -> None:
        """Write the sorted index for the next open, when the part it lacks has grown
        past a quarter of it (amortised O(samples), not a rewrite per recording)."""
        if self._mode != "r+" or self._steps == 0:
            return
        record = read_index_record(self._root) or (0, 0)
        if not force and self._samples - record[1] <= record[1] // 4:
            return
        index = self._get_index()
        m = len(index.sorted_ids)
        for name, values in (("sorted_ids", index.sorted_ids), ("sorted_steps", index.sorted_steps)):
            arr = self._root[f"index/{name}"]
            if arr.shape[0] < m:
                arr.resize((m,))
            arr[:m] = values
        write_index_record(self._root, index.num_steps, m)

    def batches_containing(self, ids: Any = None, *, owners: Any = None) -> np.ndarray:
        """Sorted, unique steps whose batch held any of ``ids`` or any sample of ``owners``.

        >>> store.batches_containing([3, 17, 42])      # doctest: +SKIP
        array([  0,  12,  57, 130])
        >>> store.batches_containing(owners=[7001])    # doctest: +SKIP
        """
        return self._get_index().batches_containing(self._with_owners(ids, owners))

    def _with_owners(self, ids: Any, owners: Any) -> np.ndarray:
        out = as_sample_ids([] if ids is None else ids)
        if owners is not None:
            out = np.union1d(out, self.samples_of(owners))
        return out

    # ------------------------------------------------------------ owners
    def index_owners(self, sample_ids: Any, owners: Any) -> None:
        """Record which owner (user, document, source: an int64 key) each sample belongs to.

        Appends to the store's owner table; ``batches_containing(owners=...)`` and
        ``unlearn.amnesiac(..., owners=...)`` then find an owner's samples.

        >>> store.index_owners(train_ids, user_of_sample)   # doctest: +SKIP
        """
        self._require_writable("index owners")
        ids = as_sample_ids(sample_ids)
        keys = as_sample_ids(owners, what="owner keys")
        if len(ids) != len(keys):
            raise SampleIdError(f"index_owners needs one owner per sample: got {len(ids)} IDs and {len(keys)} owners")
        n = read_owner_count(self._root, self._where)
        for name, values in (("sample_ids", ids), ("keys", keys)):
            arr = self._root[f"owners/{name}"]
            if arr.shape[0] < n + len(ids):
                arr.resize((n + len(ids),))
            arr[n:n + len(ids)] = values
        write_owner_count(self._root, n + len(ids))  # the commit point
        self._owner_table = None

    def _owners(self) -> tuple[np.ndarray, np.ndarray]:
        if self._owner_table is None:
            n = read_owner_count(self._root, self._where)
            try:
                sids = self._root["owners/sample_ids"][:n] if n else np.zeros(0, np.int64)
                keys = self._root["owners/keys"][:n] if n else np.zeros(0, np.int64)
            except Exception as exc:
                raise CorruptStoreError(f"store {self._where}: the owner table cannot be read: {exc}") from exc
            order = np.argsort(keys, kind="stable")
            self._owner_table = (keys[order], sids[order])
        return self._owner_table

    def samples_of(self, owners: Any) -> np.ndarray:
        """Sorted, unique sample IDs indexed under any of ``owners``."""
        keys, sids = self._owners()
        q = np.unique(as_sample_ids(owners, what="owner keys"))
        lo, hi = np.searchsorted(keys, q, "left"), np.searchsorted(keys, q, "right")
        if not (hi > lo).any():
            return np.zeros(0, dtype=np.int64)
        found = np.concatenate([sids[a:b] for a, b in zip(lo, hi) if b > a])
        return np.unique(found[found != PURGED_ID])

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask over ``ids``: which were indexed in any step."""
        return self._get_index().contains(ids)

    def samples_in(self, step: int) -> np.ndarray:
        """The sample IDs of one step."""
        index = self._get_index()
        if not isinstance(step, (int, np.integer)) or not 0 <= step < index.num_steps:
            raise IndexError(f"step {step!r} out of range: store {self._where} has {index.num_steps} steps")
        return index.samples_in(int(step)).copy()

    def samples_in_steps(self, steps: Any) -> np.ndarray:
        """All sample IDs of the given steps, concatenated (repeats kept)."""
        return self._get_index().samples_in_steps(np.asarray(steps, dtype=np.int64))

    def step_status(self) -> np.ndarray:
        """Status of every committed step: 0 skipped, 1 recorded, 2 not stored (``watch``), 3 purged."""
        return self._statuses().copy()

    def _statuses(self) -> np.ndarray:
        # The cached array itself, for reads on the hot path (no copy of every step's status).
        self._get_index()
        assert self._status is not None
        return self._status

    # ------------------------------------------------------------ rows
    def read_rows(self, layer: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded rows of steps ``start..stop-1`` of one layer, as CPU tensors.

        Returns ``(values, positions)``: float32 ``(n, k)`` and int64 ``(n, k)``
        flat indices into the parameter (``None`` for a dense, keep = 1 layer).
        Rows of steps without a stored update (status ≠ 1: skipped, not stored,
        purged) hold zero values at positions ``0..k-1``.
        """
        return self._read(layer, slice(start, stop), f"{start}..{stop - 1}")

    def _read(self, layer: str, sel: slice | np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._read_many([layer], sel, what)[layer]

    def _read_many(self, layers: list[str], sel: slice | np.ndarray,
                   what: str) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Fetch the same steps of several layers in one round trip (Zarr reads them concurrently)."""
        specs = []
        for layer in layers:
            spec = self._by_name.get(layer)
            if spec is None:
                raise KeyError(f"store {self._where} has no layer {layer!r}; layers: {[s.name for s in self._specs]}")
            specs.append(spec)
        n = self.num_batches
        lo, hi = (sel.start, sel.stop) if isinstance(sel, slice) else (int(sel[0]), int(sel[-1]) + 1)
        if not 0 <= lo <= hi <= n or (not isinstance(sel, slice) and (np.diff(sel) <= 0).any()):
            raise IndexError(f"steps {what} out of range or unsorted: store {self._where} has {n} committed steps")

        # Steps are read as slices: Zarr's orthogonal selection was 5x slower than
        # per-run slices on sharded arrays (zarr 3.1). Per layer, runs closer than
        # one inner chunk are merged (they share chunks anyway) and the extra rows
        # dropped after the read: a small layer's scattered steps cost one call.
        plans = [_read_plan(sel, spec.chunk_rows) for spec in specs]
        arrays = [(a, plan) for spec, plan in zip(specs, plans) for a in self._layer_arrays(spec)]

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
        # Rows of steps without a stored update (skipped, unwatched, purged) are zeros
        # on disk; decode only recorded rows and give the others zero values at 0..k-1.
        status = self._statuses()[sel]
        recorded = status == STATUS_RECORDED
        out = {}
        for i, spec in enumerate(specs):
            raw_v, raw_p = raw[2 * i], raw[2 * i + 1]
            try:
                for r in (raw_v, raw_p):
                    if isinstance(r, BaseException):
                        raise r
                values = values_from_numpy(raw_v, self.value_dtype)
                if spec.positions == "dense":
                    out[spec.name] = (values, None)
                else:
                    pos = np.broadcast_to(np.arange(spec.k, dtype=np.int64), (len(status), spec.k)).copy()
                    if recorded.any():
                        rows = raw_p[recorded]
                        pos[recorded] = (decode_gaps(rows, spec.numel) if spec.positions == "gaps"
                                         else decode_bitmap(rows, spec.numel, spec.k))
                    if (~recorded).any() and values[torch.from_numpy(~recorded)].any():
                        raise CorruptStoreError(f"store {self._where}: layer {spec.name!r} holds values "
                                                f"for steps {what} that have no stored update")
                    out[spec.name] = (values, torch.from_numpy(pos))
            except UpdateStoreError:
                raise
            except Exception as exc:  # checksum, codec or decode failure: name what is broken
                raise CorruptStoreError(
                    f"store {self._where}: layer {spec.name!r} steps {what} cannot be read: {exc}"
                ) from exc
        return out

    def _layer_arrays(self, spec: LayerSpec) -> tuple[zarr.Array, zarr.Array | None]:
        # Opening an array reads its zarr.json; cache the handles (shapes refresh on resize).
        arrays = self._arrays.get(spec.name)
        if arrays is None or arrays[0].shape[0] < self._steps:
            varr = self._root[f"{spec.path}/values"]
            parr = None if spec.positions == "dense" else self._root[f"{spec.path}/positions"]
            arrays = self._arrays[spec.name] = (varr, parr)
        return arrays

    def read_steps(self, layer: str, steps: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Like :meth:`read_rows` for any sorted steps: each contiguous run is read
        as one slice, all runs concurrently (Zarr reads only their chunks)."""
        return self.read_steps_many([layer], steps)[layer]

    def read_steps_many(self, layers: list[str], steps: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """:meth:`read_steps` for several layers at once, fetched concurrently.

        >>> rows = store.read_steps_many([s.name for s in store.layers], [3, 4, 9])  # doctest: +SKIP
        """
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size == 0 or (steps[-1] - steps[0] + 1 == steps.size):
            start = int(steps[0]) if steps.size else 0
            return self._read_many(list(layers), slice(start, start + steps.size), f"{start}..{start + steps.size - 1}")
        return self._read_many(list(layers), steps, f"{steps[0]}..{steps[-1]} ({steps.size} steps)")

    @property
    def bytes_read(self) -> int:
        """Bytes read from storage by this handle so far (compressed, as stored)."""
        return self._counter.bytes_read

    # ------------------------------------------------------------ ledger and purge
    def ledger(self) -> list[dict[str, Any]]:
        """The audit ledger: one entry per unlearning (time, method, hashed sample IDs,
        steps subtracted, model fingerprint before and after, whether rows were purged)."""
        return read_ledger(self._root, self._where)

    def log_unlearning(self, entry: dict[str, Any]) -> int:
        """Append an entry to the audit ledger; returns its index. Needs ``"r+"``."""
        self._require_writable("write the audit ledger")
        entries = self.ledger()
        entries.append(dict(entry))
        write_ledger(self._root, entries)
        return len(entries) - 1

    def _update_ledger(self, index: int, **fields: Any) -> None:
        entries = self.ledger()
        entries[index] = dict(entries[index], **fields)
        write_ledger(self._root, entries)

    def purge(self, steps: Any, *, samples: Any = None) -> dict[str, int]:
        """Erase the stored updates of ``steps`` and the given sample IDs from disk.

        Steps are first marked purged (status 3: never subtracted again), then
        their rows are overwritten with zeros in every layer — Zarr drops chunks
        that become empty and rewrites the others, so the old bytes are no longer
        in any file — and every occurrence of ``samples`` in the sample index is
        replaced by a tombstone. Other steps' data stay bit-identical.

        >>> store.purge(report.steps_hit, samples=[3, 17])   # doctest: +SKIP
        """
        self._require_writable("purge")
        if self._writer is not None:
            raise RecorderError(f"cannot purge store {self._where} while a recorder is attached; detach it first")
        index = self._get_index()
        n = index.num_steps
        steps = np.unique(np.asarray(steps, dtype=np.int64))
        if steps.size and (steps[0] < 0 or steps[-1] >= n):
            raise IndexError(f"steps to purge out of range: store {self._where} has {n} steps")
        status = self.step_status()
        status[steps] = STATUS_PURGED
        self._root["steps/status"][:n] = status  # 1. never used again, even if we stop here
        for spec in self._specs:  # 2. the rows themselves
            for arr in self._layer_arrays(spec):
                if arr is None:
                    continue
                for run in _read_plan(steps, 1)[0] if steps.size else []:
                    arr[run] = 0
        erased = 0
        if samples is not None:  # 3. the forgotten IDs, wherever they occur
            ids = as_sample_ids(samples, what="samples to purge")
            hit = np.flatnonzero(np.isin(index.ids, ids))
            erased = int(hit.size)
            if erased:
                arr = self._root["samples/ids"]
                chunk = arr.chunks[0]
                for c in np.unique(hit // chunk):
                    a, b = int(c * chunk), int(min((c + 1) * chunk, len(index.ids)))
                    block = index.ids[a:b].copy()
                    block[np.isin(block, ids)] = PURGED_ID
                    arr[a:b] = block
            # ... and in the owner table
            n_own = read_owner_count(self._root, self._where)
            if n_own:
                arr = self._root["owners/sample_ids"]
                own = arr[:n_own]
                mask = np.isin(own, ids)
                if mask.any():
                    own[mask] = PURGED_ID
                    arr[:n_own] = own
        self._index = None
        self._status = None
        self._arrays = {}
        self._owner_table = None
        if erased:  # the persisted sorted index held the erased IDs too
            write_index_record(self._root, 0, 0)
            self._persist_index(force=True)
        return {"steps_purged": int(steps.size), "sample_ids_erased": erased}

    # ------------------------------------------------------------ footprint
    def footprint(self) -> Footprint:
        """Bytes on disk (total and per layer) against a dense float32 log of the stored steps."""
        store = self._counter._store  # sizes from the backend, not counted as reads

        def size(prefix: str) -> int:
            return int(sync(store.getsize_prefix(prefix)))

        layer_bytes = {s.name: size(f"{s.path}/") for s in self._specs}
        total = size("")
        if sync(store.exists(LOCK_NAME)):  # the writer lock is not part of the data
            total -= int(sync(store.getsize(LOCK_NAME)))
        index_bytes = size("steps/") + size("samples/") + size("index/") + size("owners/")
        stored = int((self.step_status() == STATUS_RECORDED).sum())
        numel = sum(s.numel for s in self._specs)
        kept = sum(s.k for s in self._specs) / numel
        return Footprint(
            total_bytes=total,
            layer_bytes=layer_bytes,
            index_bytes=index_bytes,
            full_log_bytes=stored * numel * 4,
            stored_steps=stored,
            kept_fraction=kept,
            per_layer_full={s.name: stored * s.numel * 4 for s in self._specs},
        )

    def __repr__(self) -> str:
        return (f"UpdateStore({self._where!r}, mode={self._mode!r}, steps={self._steps}, "
                f"layers={len(self._specs)}, value_dtype={self.value_dtype!r})")
