"""``UpdateStore``: a facade over the parts — backend, format, writer, reader, index, owners, ledger, purge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zarr

from . import __version__
from ._backend import CountingStore, PathLike, check_exists, set_durable, open_root, prepare_new, resolve, take_lock
from ._format import LayerSpec, check_store, committed_rows, has_row_map, create_tree, logical_layers, plan_store, read_state
from ._index import StepTable, as_sample_ids, as_steps
from ._owners import OwnerTable
from ._params import match_model, named_shapes, trainable
from ._rollback import align, check_state
from ._reader import PartRows, Reader, Rows
from ._sink import WriterSink
from ._writer import BlockWriter, check_commit_seconds
from .config import StoreConfig
from .distributed import check_parts, is_sharded, plan_parts, run_agreed, world
from .distributed.sink import CollectiveSink, Discard
from .errors import ConfigError, ReadOnlyStoreError, RecorderError, StepError
from .ledger import weights_fingerprint
from .recorder import Recorder
from ._queries import Queries
from ._upkeep import Upkeep

__all__ = ["UpdateStore"]


class UpdateStore(Queries, Upkeep):
    """Pruned per-step parameter updates of one training run, in a Zarr v3 group.

    Create one before training, attach it with :meth:`recorder`, and later ask
    which steps saw some samples (:meth:`batches_containing`) and read those
    steps' stored updates (:meth:`read`) — or let ``unlearn.amnesiac`` do it.

    >>> import torch
    >>> model = torch.nn.Linear(4, 2)
    >>> with UpdateStore.create(zarr.storage.MemoryStore(), model, keep=0.5) as store:
    ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ...     with store.recorder(model, opt) as rec:
    ...         with rec.batch([10, 11]):
    ...             opt.zero_grad(); model(torch.ones(2, 4)).sum().backward(); opt.step()
    ...     store.batches_containing([11]).tolist()
    [0]
    """

    def __init__(self, root: zarr.Group, where: str, mode: str, fsync: bool = False, group: Any = None) -> None:
        self._root, self._where, self._mode = root, where, mode
        # Opened by every rank of ``group`` (create / open "r+"): rank 0 owns the store, others follow.
        self._group, (self._world, self._rank) = group, world(group)
        self._counter: CountingStore = root.store  # type: ignore[assignment]
        set_durable(self._counter, fsync)
        self._meta, specs, self._steps, self._samples = check_store(root, where)
        self._specs: tuple[LayerSpec, ...] = tuple(specs)  # the stored layers (a sharded store: parts)
        self._layers = tuple(logical_layers(self._meta, specs))  # one per recorded parameter
        self._row_map = has_row_map(self._meta)  # format 2: steps/row maps steps to layer rows
        self._table = StepTable(root, where, strict=self._meta.get("chunks_always_written") is True, row_map=self._row_map)
        self._owners = OwnerTable(root, where, strict=self._meta.get("chunks_always_written") is True)
        self._reader = Reader(root, self._specs, self._meta, where)
        self._writer: BlockWriter | None = None
        self._sink: WriterSink | None = None
        self._recorder: Recorder | None = None  # the last one made: close() detaches it
        self._closed = False
        self._lock = take_lock(root.store, self) if mode == "r+" and self._rank == 0 else None

    @classmethod
    def create(cls, path: PathLike, model: torch.nn.Module, *, keep: float | Mapping[str, float] = 0.1,
               value_dtype: str = "bfloat16", positions: str = "auto", buffer_bytes: int = 64 * 2**20,
               clevel: int = 1, codec: str = "zstd", overwrite: bool = False, fsync: bool = False,
               storage_options: dict[str, Any] | None = None, process_group: Any = None) -> "UpdateStore":
        """A new, empty store for ``model``'s trainable parameters, opened ``"r+"``.

        ``path``: a directory, a URL (``s3://...`` with ``storage_options``) or a
        Zarr ``Store``; see :meth:`open`. ``keep`` is the fraction of each layer's
        entries kept per step (largest |Δθ|), or ``{pattern: fraction}`` with
        ``"*"`` as the default. See :class:`StoreConfig` for the other options.

        Under torch.distributed (an initialised default group, or ``process_group``) every rank
        calls it: rank 0 creates the store, the others open it once it exists. A model whose
        parameters are DTensors (FSDP2) gets a sharded store (format 3): each rank records its shard.
        """
        size = world(process_group)[0]

        def planned() -> tuple[StoreConfig, list[LayerSpec], int, dict[str, Any]]:
            config = StoreConfig(keep=keep, value_dtype=value_dtype, positions=positions,
                                 buffer_bytes=buffer_bytes, clevel=clevel, codec=codec)
            params = trainable(model)
            parts = plan_parts(params, size) if size > 1 and any(is_sharded(p) for _, p in params) else None
            return config, *plan_store(named_shapes(params), config, __version__, parts, size)

        config, specs, block, meta = run_agreed(planned, process_group, "planning the store") if size > 1 else planned()

        def make() -> "UpdateStore":
            store, where = resolve(path, read_only=False, storage_options=storage_options)
            root = open_root(store, where, "w" if prepare_new(store, where, overwrite) else "w-")
            create_tree(root, specs, block, config, meta)
            return cls(root, where, "r+", fsync, process_group if size > 1 else None)

        if size == 1:
            return make()
        return cls._on_every_rank(make, lambda: cls._open_here(path, "r+", storage_options, fsync, process_group),
                                  process_group, "creating the store")

    @staticmethod
    def _on_every_rank(first: Any, then: Any, group: Any, what: str) -> "UpdateStore":
        """Rank 0 runs ``first``; once it succeeded, the other ranks run ``then``; errors reach every rank."""
        rank = world(group)[1]
        made = run_agreed(first if rank == 0 else lambda: None, group, what, undo=lambda s: s and s.close())
        out = run_agreed(then if rank != 0 else lambda: made, group, f"{what} (opening it on ranks > 0)",
                         undo=lambda s: s.close())
        return out

    @classmethod
    def open(cls, path: PathLike, mode: str = "r", *, storage_options: dict[str, Any] | None = None,
             fsync: bool = False, process_group: Any = None) -> "UpdateStore":
        """Open an existing store: ``"r"`` to read and unlearn, ``"r+"`` to append.

        ``path`` is a directory, a ``.zip`` of one (read-only), any URL zarr's
        fsspec store opens (``s3://bucket/run.zarr``, ``memory://run``, with
        ``storage_options`` for credentials and endpoints), or a Zarr ``Store``. ``fsync=True``: every
        record written (commit, purge, ledger, rollback, owners, index) is fsynced after what it vouches for.
        ``"r+"`` under torch.distributed is collective, as :meth:`create`; ``"r"`` is local to the rank.
        """
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
        if mode == "r" or world(process_group)[0] == 1:
            return cls._open_here(path, mode, storage_options, fsync, None)

        def make() -> "UpdateStore":
            return cls._open_here(path, mode, storage_options, fsync, process_group)

        return cls._on_every_rank(make, make, process_group, "opening the store")

    @classmethod
    def _open_here(cls, path: PathLike, mode: str, storage_options: dict[str, Any] | None, fsync: bool,
                   group: Any) -> "UpdateStore":
        store, where = resolve(path, read_only=mode == "r", storage_options=storage_options)
        check_exists(store, where)
        return cls(open_root(store, where, mode), where, mode, fsync, group)

    def __enter__(self) -> "UpdateStore":  # noqa: D105
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self) -> None:
        """Write and commit every step recorded so far (the writer otherwise writes whole blocks)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Detach the recorder (flushing pending steps) and release the lock; reading still works after."""
        if self._recorder is not None:  # every rank's, so that a collective detach runs on all of them
            self._recorder.detach()
        if self._lock is not None:
            self._lock.release()
        self._closed = True

    path = property(lambda self: self._where, doc="Where the store is (path or URL).")
    mode = property(lambda self: self._mode, doc='"r" or "r+".')
    layers = property(lambda self: self._layers, doc="The recorded layers: name, shape, dtype, keep, k, encoding.")
    parts = property(lambda self: self._specs, doc="The stored layers: ``layers``, or a sharded store's parts.")
    value_dtype = property(lambda self: self._meta["value_dtype"], doc="How kept values are stored.")
    config = property(lambda self: StoreConfig.from_dict(self._meta["config"]), doc="The store's StoreConfig.")
    meta = property(lambda self: dict(self._meta), doc="Format and library version, fingerprint, layers...")
    bytes_read = property(lambda self: self._counter.bytes_read, doc="Bytes read from storage by this handle.")
    bytes_written = property(lambda self: self._counter.bytes_written, doc="Bytes written by this handle.")
    num_batches = property(lambda self: self._counts()[0], doc="Committed steps (optimizer steps), skipped included.")
    num_samples = property(lambda self: self._counts()[1], doc="Sample IDs indexed, each repeat across epochs counted.")

    def _counts(self) -> tuple[int, int]:
        if self._writer is not None and self._writer.owner:
            self._steps, self._samples = self._writer.committed_steps, self._writer.committed_samples
        elif self._follows and not self._pins:  # others commit: their record says what is safe
            self._steps, self._samples, self._table.generation = read_state(self._root, self._where)
        return self._steps, self._samples

    def _require_writable(self, what: str) -> None:
        if self._mode != "r+" or self._closed:
            raise ReadOnlyStoreError(f"cannot {what}: store {self._where} is " + ("closed; open it again" if self._closed
                                     else "open read-only; open it with UpdateStore.open(path, 'r+')"))

    def _require_owner(self, what: str) -> None:
        if self._rank != 0:
            raise RecorderError(f"cannot {what} on rank {self._rank}: rank 0 writes store {self._where}'s index, "
                                "ledger and purges; call it there")

    def _no_writer(self) -> None:
        if self._writer is not None:
            raise RecorderError(f"store {self._where} already has a recorder attached; detach it first")

    # ------------------------------------------------------------ recording
    def check_model(self, model: torch.nn.Module) -> list[tuple[LayerSpec, torch.nn.Parameter]]:
        """Pair each recorded layer with ``model``'s parameter of that name, or ``ModelMismatchError``."""
        return match_model(self._layers, model, self._where)

    def recorder(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 watch: Any = None, process_group: Any = None, resume: dict[str, Any] | None = None,
                 commit_seconds: float | None = 5.0, fsync: bool = False) -> Recorder:
        """A :class:`Recorder` for ``model`` writing into this store (``"r+"``); use it as a context manager.

        ``resume=``: the ``rec.state_dict()`` saved with the checkpoint a run resumes from; later
        steps are rolled back (``StoreBehindCheckpointError`` if the store lacks some of its steps).
        ``commit_seconds`` bounds what a crash loses; ``fsync=True`` makes commits survive power loss.
        Under torch.distributed every rank calls it (DDP: rank 0 writes; FSDP2: every rank its parts).
        """
        group = self._group if process_group is None else process_group
        size, rank = world(group)
        sharded = "sharding" in self._meta

        def checked() -> tuple[list[tuple[LayerSpec, torch.nn.Parameter]], dict[str, Any] | None]:
            self._require_writable("record")
            if sharded and size != self._meta["sharding"]["world"]:
                raise ConfigError(f"store {self._where} was created for {self._meta['sharding']['world']} ranks "
                                  f"(FSDP parts); this run has {size}. Record into a store created by this run")
            check_commit_seconds(commit_seconds)
            if watch is not None:
                as_sample_ids(watch, what="watch")
            pairs = self.check_model(model)
            if sharded:
                check_parts(self._specs, pairs, rank, size, self._where)
            return pairs, None if resume is None else check_state(resume)

        # a bad argument on one rank is an error on every rank, not a hang at the first collective
        pairs, state = run_agreed(checked, group, "checking store.recorder's arguments") if size > 1 else checked()
        if state is not None:
            weights = weights_fingerprint(model) if sharded or rank == 0 else None  # sharded: collective

            def align_store() -> None:
                if rank == 0:
                    self._no_writer()
                    self._steps, self._samples = align(self._root, self._where, self._specs, state, weights,
                                                       *self._counts(), row_map=self._row_map)

            run_agreed(align_store, group, "resuming the store") if size > 1 else align_store()
            self._table.invalidate()
            self._reader.invalidate()
        if size > 1 and rank != 0 and not sharded:  # DDP: this rank's IDs reach rank 0's writer
            self._recorder = Recorder(CollectiveSink(Discard(), group, rank, False), [], optimizer, watch=watch,
                                      process_group=group, model=model)
            return self._recorder
        part = (rank, size) if sharded else None
        if sharded:  # this rank's parts, each paired with its parameter (a DTensor: the local shard is recorded)
            params = dict((spec.name, p) for spec, p in pairs)
            pairs = [(spec, params[spec.part[0]]) for spec in self._specs if spec.part[2] == rank]
        sink = WriterSink(lambda s: self._open_writer(s, commit_seconds, fsync, part))
        outer = CollectiveSink(sink, group, rank, sharded) if size > 1 else sink
        self._recorder = Recorder(outer, pairs, optimizer, watch=watch, process_group=group, model=model, sharded=sharded)
        return self._recorder

    def _open_writer(self, sink: WriterSink, commit_seconds: float | None, fsync: bool,
                     part: tuple[int, int] | None) -> BlockWriter:
        self._require_writable("record")
        self._no_writer()
        steps, samples = self._counts()
        specs = [s for s in self._specs if part is None or s.part[2] == part[0]]
        self._writer = BlockWriter(self._root, specs, self._meta["block_steps"], self.value_dtype, steps,
                                   samples, row_map=self._row_map, rows=committed_rows(self._root, steps, self._row_map),
                                   where=self._where, commit_seconds=commit_seconds, fsync=fsync, on_close=self._writer_closed,
                                   part=part)
        self._sink = sink
        return self._writer

    def _writer_closed(self, writer: BlockWriter) -> None:
        self._writer = self._sink = None
        if writer.owner:
            self._steps, self._samples = writer.committed_steps, writer.committed_samples
            self._table.persist(self._steps, self._samples)

    # ------------------------------------------------------------ rows
    def read(self, steps: Any, layers: list[str] | None = None) -> dict[str, Rows]:
        """Decoded rows of sorted, unique ``steps`` for ``layers`` (default: all), one :class:`Rows` per layer
        (a sharded store's parameter: one ``PartRows`` over its parts; a part's name gives that part's Rows).

        Every layer is fetched concurrently; each run of steps is read as one slice.

        >>> rows = store.read([3, 4, 9])["fc.weight"]   # doctest: +SKIP
        """
        index, status = self._index()
        steps = as_steps(steps, index.num_steps, where=f"store {self._where}")
        if (np.diff(steps) <= 0).any():
            raise StepError(f"steps must be sorted and unique to read them from store {self._where}")
        names = [s.name for s in self._layers] if layers is None else list(layers)
        parts = {s.name: [p for p in self._specs if p.part is not None and p.part[0] == s.name]
                 for s in self._layers if s.name in names and s not in self._specs}
        stored = [p.name for n in names for p in parts.get(n, [])] + [n for n in names if n not in parts]
        got = self._reader.read(stored, steps, self._table.rows[steps], status[steps], self._table.generation)
        return {n: PartRows(n, steps, [(p.part[1], got[p.name]) for p in parts[n]]) if n in parts else got[n]
                for n in names}

    def __repr__(self) -> str:  # noqa: D105
        return f"UpdateStore({self._where!r}, mode={self._mode!r}, steps={self._steps}, layers={len(self._specs)})"
