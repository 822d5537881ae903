"""``UpdateStore``: a facade over the parts — backend, format, writer, reader, index, owners, ledger, purge."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zarr

from . import __version__, ledger as _ledger
from ._backend import CountingStore, PathLike, check_exists, set_durable, open_root, prepare_new, resolve, take_lock
from ._format import LayerSpec, check_store, committed_rows, has_row_map, create_tree, plan_store, read_state
from ._index import SampleIndex, StepTable, as_sample_ids, as_steps
from ._lineage import read_events
from ._owners import OwnerTable
from ._params import match_model, named_shapes, trainable
from ._purge import purge_steps
from ._rollback import align, check_state
from ._reader import Reader, Rows
from ._writer import BlockWriter, WriterSink, check_commit_seconds
from .config import StoreConfig
from .distributed import require_writer_rank
from .errors import ConfigError, ReadOnlyStoreError, RecorderError, StepError
from .footprint import Footprint, measure
from .ledger import weights_fingerprint
from .recorder import Recorder

__all__ = ["UpdateStore"]


class UpdateStore:
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

    def __init__(self, root: zarr.Group, where: str, mode: str, fsync: bool = False) -> None:
        self._root, self._where, self._mode = root, where, mode
        self._counter: CountingStore = root.store  # type: ignore[assignment]
        set_durable(self._counter, fsync)
        self._meta, specs, self._steps, self._samples = check_store(root, where)
        self._specs: tuple[LayerSpec, ...] = tuple(specs)
        self._row_map = has_row_map(self._meta)  # format 2: steps/row maps steps to layer rows
        self._table = StepTable(root, where, strict=self._meta.get("chunks_always_written") is True, row_map=self._row_map)
        self._owners = OwnerTable(root, where, strict=self._meta.get("chunks_always_written") is True)
        self._reader = Reader(root, self._specs, self._meta, where)
        self._writer: BlockWriter | None = None
        self._sink: WriterSink | None = None
        self._closed = False
        self._lock = take_lock(root.store, self) if mode == "r+" else None

    @classmethod
    def create(cls, path: PathLike, model: torch.nn.Module, *, keep: float | Mapping[str, float] = 0.1,
               value_dtype: str = "bfloat16", positions: str = "auto", buffer_bytes: int = 64 * 2**20,
               clevel: int = 5, overwrite: bool = False, fsync: bool = False,
               storage_options: dict[str, Any] | None = None) -> "UpdateStore":
        """A new, empty store for ``model``'s trainable parameters, opened ``"r+"``.

        ``path``: a directory, a URL (``s3://...`` with ``storage_options``) or a
        Zarr ``Store``; see :meth:`open`. ``keep`` is the fraction of each layer's
        entries kept per step (largest |Δθ|), or ``{pattern: fraction}`` with
        ``"*"`` as the default. See :class:`StoreConfig` for the other options.
        """
        config = StoreConfig(keep=keep, value_dtype=value_dtype, positions=positions,
                             buffer_bytes=buffer_bytes, clevel=clevel)
        specs, block, meta = plan_store(named_shapes(trainable(model)), config, __version__)
        store, where = resolve(path, read_only=False, storage_options=storage_options)
        root = open_root(store, where, "w" if prepare_new(store, where, overwrite) else "w-")
        create_tree(root, specs, block, config, meta)
        return cls(root, where, "r+", fsync)

    @classmethod
    def open(cls, path: PathLike, mode: str = "r", *, storage_options: dict[str, Any] | None = None,
             fsync: bool = False) -> "UpdateStore":
        """Open an existing store: ``"r"`` to read and unlearn, ``"r+"`` to append.

        ``path`` is a directory, a ``.zip`` of one (read-only), any URL zarr's
        fsspec store opens (``s3://bucket/run.zarr``, ``memory://run``, with
        ``storage_options`` for credentials and endpoints), or a Zarr ``Store``. ``fsync=True``: every
        record written (commit, purge, ledger, rollback, owners, index) is fsynced after what it vouches for.
        """
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
        store, where = resolve(path, read_only=mode == "r", storage_options=storage_options)
        check_exists(store, where)
        return cls(open_root(store, where, mode), where, mode, fsync)

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
        if self._sink is not None and self._sink.recorder is not None:
            self._sink.recorder.detach()
        if self._lock is not None:
            self._lock.release()
        self._closed = True

    path = property(lambda self: self._where, doc="Where the store is (path or URL).")
    mode = property(lambda self: self._mode, doc='"r" or "r+".')
    layers = property(lambda self: self._specs, doc="The recorded layers: name, shape, dtype, keep, k, encoding.")
    value_dtype = property(lambda self: self._meta["value_dtype"], doc="How kept values are stored.")
    config = property(lambda self: StoreConfig.from_dict(self._meta["config"]), doc="The store's StoreConfig.")
    meta = property(lambda self: dict(self._meta), doc="Format and library version, fingerprint, layers...")
    bytes_read = property(lambda self: self._counter.bytes_read, doc="Bytes read from storage by this handle.")
    bytes_written = property(lambda self: self._counter.bytes_written, doc="Bytes written by this handle.")
    num_batches = property(lambda self: self._counts()[0], doc="Committed steps (optimizer steps), skipped included.")
    num_samples = property(lambda self: self._counts()[1], doc="Sample IDs indexed, each repeat across epochs counted.")

    def _counts(self) -> tuple[int, int]:
        if self._writer is not None:
            self._steps, self._samples = self._writer.committed_steps, self._writer.committed_samples
        elif self._mode == "r":  # another process may record or purge: the commit record says what is safe
            self._steps, self._samples, self._table.generation = read_state(self._root, self._where)
        return self._steps, self._samples

    def _require_writable(self, what: str) -> None:
        if self._mode != "r+" or self._closed:
            raise ReadOnlyStoreError(f"cannot {what}: store {self._where} is " + ("closed; open it again" if self._closed
                                     else "open read-only; open it with UpdateStore.open(path, 'r+')"))

    def _no_writer(self) -> None:
        if self._writer is not None:
            raise RecorderError(f"store {self._where} already has a recorder attached; detach it first")

    # ------------------------------------------------------------ recording
    def check_model(self, model: torch.nn.Module) -> list[tuple[LayerSpec, torch.nn.Parameter]]:
        """Pair each recorded layer with ``model``'s parameter of that name, or ``ModelMismatchError``."""
        return match_model(self._specs, model, self._where)

    def recorder(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 watch: Any = None, process_group: Any = None, resume: dict[str, Any] | None = None,
                 commit_seconds: float | None = 5.0, fsync: bool = False) -> Recorder:
        """A :class:`Recorder` for ``model`` writing into this store (``"r+"``); use it as a context manager.

        ``resume=``: the ``rec.state_dict()`` saved with the checkpoint a run resumes from; later
        steps are rolled back (``StoreBehindCheckpointError`` if the store lacks some of its steps).
        ``commit_seconds`` bounds what a crash loses; ``fsync=True`` makes commits survive power loss.
        """
        self._require_writable("record")
        require_writer_rank(process_group)
        params = self.check_model(model)
        check_commit_seconds(commit_seconds)
        if resume is not None:
            self._no_writer()
            self._steps, self._samples = align(self._root, self._where, self._specs, check_state(resume),
                                               weights_fingerprint(model), *self._counts(), row_map=self._row_map)
            self._table.invalidate()
            self._reader.invalidate()
        sink = WriterSink(lambda s: self._open_writer(s, commit_seconds, fsync))
        sink.recorder = Recorder(sink, params, optimizer, watch=watch, process_group=process_group, model=model)
        return sink.recorder

    def _open_writer(self, sink: WriterSink, commit_seconds: float | None, fsync: bool) -> BlockWriter:
        self._require_writable("record")
        self._no_writer()
        steps, samples = self._counts()
        self._writer = BlockWriter(self._root, list(self._specs), self._meta["block_steps"], self.value_dtype, steps,
                                   samples, row_map=self._row_map, rows=committed_rows(self._root, steps, self._row_map),
                                   where=self._where, commit_seconds=commit_seconds, fsync=fsync, on_close=self._writer_closed)
        self._sink = sink
        return self._writer

    def _writer_closed(self, writer: BlockWriter) -> None:
        self._steps, self._samples = writer.committed_steps, writer.committed_samples
        self._writer = self._sink = None
        self._table.persist(self._steps, self._samples)

    # ------------------------------------------------------------ queries
    def _index(self) -> tuple[SampleIndex, np.ndarray]:
        return self._table.load(*self._counts())

    def batches_containing(self, ids: Any = None, *, owners: Any = None) -> np.ndarray:
        """Sorted, unique steps whose batch held any of ``ids`` or any sample of ``owners``.

        >>> store.batches_containing([3, 17, 42])      # doctest: +SKIP
        array([  0,  12,  57, 130])
        """
        query = as_sample_ids([] if ids is None else ids)
        if owners is not None:
            query = np.union1d(query, self.samples_of(owners))
        return self._index()[0].batches_containing(query)

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask over ``ids``: which were indexed in any step."""
        return self._index()[0].contains(ids)

    def samples_in(self, step: int) -> np.ndarray:
        """The sample IDs of one step."""
        index = self._index()[0]
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < index.num_steps:
            raise IndexError(f"step {step!r} out of range: store {self._where} has {index.num_steps} steps")
        return index.samples_in(int(step)).copy()

    def samples_in_steps(self, steps: Any) -> np.ndarray:
        """All sample IDs of the given steps, concatenated (repeats kept)."""
        return self._index()[0].samples_in_steps(as_steps(steps, self.num_batches, where=f"store {self._where}"))

    def step_status(self) -> np.ndarray:
        """Status of every committed step: 0 skipped, 1 recorded, 2 not stored (``watch``), 3 purged."""
        return self._index()[1].copy()

    def index_owners(self, sample_ids: Any, owners: Any) -> None:
        """Record which owner (user, document, source: an int64 key) each sample belongs to.

        >>> store.index_owners(train_ids, user_of_sample)   # doctest: +SKIP
        """
        self._require_writable("index owners")
        self._owners.append(sample_ids, owners)

    def samples_of(self, owners: Any) -> np.ndarray:
        """Sorted, unique sample IDs indexed under any of ``owners``."""
        return self._owners.samples_of(owners)

    # ------------------------------------------------------------ rows
    def read(self, steps: Any, layers: list[str] | None = None) -> dict[str, Rows]:
        """Decoded rows of sorted, unique ``steps`` for ``layers`` (default: all), one :class:`Rows` per layer.

        Every layer is fetched concurrently; each run of steps is read as one slice.

        >>> rows = store.read([3, 4, 9])["fc.weight"]   # doctest: +SKIP
        """
        index, status = self._index()
        steps = as_steps(steps, index.num_steps, where=f"store {self._where}")
        if (np.diff(steps) <= 0).any():
            raise StepError(f"steps must be sorted and unique to read them from store {self._where}")
        names = [s.name for s in self._specs] if layers is None else list(layers)
        return self._reader.read(names, steps, self._table.rows[steps], status[steps])

    # ------------------------------------------------------------ ledger, purge, footprint
    def history(self) -> list[dict[str, Any]]:
        """The lineage: checkpoints and closes (step, weights' fingerprint) and rollbacks, oldest first."""
        return read_events(self._root, self._where)

    def ledger(self) -> list[dict[str, Any]]:
        """The audit ledger: per unlearning its time, method, hashed IDs, steps, model before/after, purged."""
        return _ledger.read_entries(self._root, self._where)

    def log_unlearning(self, entry: dict[str, Any]) -> int:
        """Append an entry to the audit ledger; returns its index. Needs ``"r+"``."""
        self._require_writable("write the audit ledger")
        return _ledger.append_entry(self._root, self._where, entry)

    def update_ledger(self, index: int, **fields: Any) -> None:
        """Set ``fields`` on ledger entry ``index`` (e.g. ``purged=True``). Needs ``"r+"``."""
        self._require_writable("write the audit ledger")
        _ledger.update_entry(self._root, self._where, index, **fields)

    def purge(self, steps: Any, *, samples: Any = None) -> dict[str, int]:
        """Erase the stored updates of ``steps`` and the given sample IDs from disk.

        Steps are marked purged (never subtracted again), their rows overwritten
        with zeros in every layer, and every occurrence of ``samples`` in the
        sample index and owner table replaced by a tombstone. Other steps' data
        stay bit-identical.

        >>> store.purge(report.steps_hit, samples=[3, 17])   # doctest: +SKIP
        """
        self._require_writable("purge")
        self._no_writer()
        index, status = self._index()
        steps = np.unique(as_steps(steps, index.num_steps, where=f"store {self._where}"))
        ids = None if samples is None else as_sample_ids(samples, what="samples to purge")
        erased = purge_steps(self._root, self._specs, index, status, self._table.rows, steps, ids, self._owners)
        self._table.invalidate()
        self._reader.invalidate()
        if erased:  # the persisted sorted index held the erased IDs too
            self._table.forget_persisted()
            self._table.persist(*self._counts(), force=True)
        return {"steps_purged": int(steps.size), "sample_ids_erased": erased}

    def footprint(self) -> Footprint:
        """Bytes on disk (total and per layer) against a dense float32 log of the stored steps."""
        return measure(self._counter._store, self._specs, self._index()[1])

    def __repr__(self) -> str:  # noqa: D105
        return f"UpdateStore({self._where!r}, mode={self._mode!r}, steps={self._steps}, layers={len(self._specs)})"
