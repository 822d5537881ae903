"""Attach a store to a training loop: capture Δθ per optimizer step, prune it on the device.

The recorder knows a sink (``put``/``close``), never the store or Zarr: it hands
each step's pruned tensors to the sink, which encodes and writes them on its own thread.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from ._format import STATUS_NOT_STORED, STATUS_RECORDED, STATUS_SKIPPED, LayerSpec
from ._index import as_sample_ids
from ._deltas import Deltas, stage
from ._writer import StepRecord
from .distributed import gather_ids, world
from .distributed.collective import all_ok, step_status
from .distributed.sink import CollectiveSink, Discard
from .errors import OtherRankError, RecorderError
from .ledger import weights_fingerprint

__all__ = ["Recorder", "StepSink"]

# Optimizers with a recorder attached. Kept here, not as an attribute on the
# user's optimizer, so that we never mutate objects we do not own.
_ATTACHED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


class StepSink(Protocol):
    """Where a recorder hands its steps: opened on attach, closed on detach.

    ``checkpoint`` commits every step so far and notes the weights' fingerprint there (it
    returns the committed steps, sample IDs and owner-table entries);
    ``close`` notes the fingerprint at the end of recording.
    """

    def open(self) -> None: ...
    def put(self, record: StepRecord) -> None: ...
    def checkpoint(self, weights: str | None) -> tuple[int, int, int]: ...
    def close(self, weights: str | None = None) -> None: ...


class Recorder:
    """Records each optimizer step's pruned parameter change into a store.

    Made by :meth:`UpdateStore.recorder`. With an optimizer, it hooks
    ``optimizer.step()``; wrap each step's forward/backward/step in
    ``rec.batch(ids)``. Without one, call ``rec.step(ids)`` after each update.

    Under torch.distributed every rank calls ``store.recorder(model, opt)`` and every
    rank's batch IDs are gathered into the step. DDP (Δθ is the same on every rank):
    rank 0 prunes and writes. FSDP2 (a sharded store): every rank prunes and writes
    its own shard. (``Recorder(None, model, opt)`` on ranks > 0 is deprecated.)

    >>> with store.recorder(model, optimizer) as rec:          # doctest: +SKIP
    ...     for x, y, ids in loader:
    ...         with rec.batch(ids):
    ...             optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    """

    def __init__(self, sink: StepSink | None, params: Any,
                 optimizer: torch.optim.Optimizer | None = None, *, watch: Any = None,
                 process_group: Any = None, model: torch.nn.Module | None = None, sharded: bool = False) -> None:
        self._group = process_group
        self._world, self._rank = world(process_group)
        self._sharded = sharded
        if sink is None:  # Recorder(None, model, opt): a DDP rank > 0 contributes its IDs only
            if self._world == 1:
                raise RecorderError("a recorder needs a store (store=None is for ranks > 0 of a distributed run)")
            if self._rank == 0:
                raise RecorderError(
                    "with torch.distributed, rank 0 records into the store and every other rank passes store=None "
                    "(Recorder(None, model, optimizer)); this is rank 0 without a store"
                )
            warnings.warn("Recorder(None, model, optimizer) on ranks > 0 is deprecated: call "
                          "UpdateStore.create(path, model) (or open(path, 'r+')) and store.recorder(model, optimizer) "
                          "on every rank", DeprecationWarning, stacklevel=2)
            # the agreement rank 0's store.recorder(...) makes on its arguments
            if not all_ok(True, process_group):
                raise OtherRankError("store.recorder(...) failed on rank 0 (see its error); nothing was attached here")
            sink, params = CollectiveSink(Discard(), process_group, self._rank, sharded=False), []
        self._sink: StepSink = sink
        self._params: list[tuple[LayerSpec, torch.nn.Parameter]] = list(params)
        self._model = model
        self._optimizer = optimizer
        # What was recorded at attach: a parameter unfrozen or added later would go unrecorded. The model's
        # parameters are listed once (walking the module tree every step cost ~15 µs of a 3 ms step): one
        # unfrozen later flips requires_grad here; one added later is trained only through the optimizer,
        # whose parameters are counted each step.
        self._model_params = [] if model is None else [p for p in model.parameters() if p.numel() > 0]
        self._trainable = self._count_trainable()
        self._in_optimizer = self._count_optimized()
        self._watch = None if watch is None else np.unique(as_sample_ids(watch, what="watch"))
        self._handles: list[Any] = []
        self._deltas = Deltas(self._params)
        self._pending: list[np.ndarray] = []
        self._in_batch = False
        self._steps_in_batch = 0
        self._snap_valid = False
        self._attached = False
        self.steps_recorded = 0
        #: Seconds this recorder spent on the training thread: snapshots, Δθ and top-k, handing
        #: steps to the writer (which then encodes and writes on its own thread).
        self.seconds = {"snapshot": 0.0, "prune": 0.0, "hand_off": 0.0}

    # ------------------------------------------------------------ lifecycle
    def attach(self) -> "Recorder":
        """Install the optimizer hooks (or take the first snapshot in manual mode)."""
        if self._attached:
            raise RecorderError("this recorder is already attached; use one `with store.recorder(...)` block")
        opt = self._optimizer
        if opt is not None and opt in _ATTACHED:
            raise RecorderError(
                "this optimizer already has an update-store recorder attached; "
                "detach it (leave its `with` block) before attaching another"
            )
        self._sink.open()
        if opt is not None:
            self._handles = [opt.register_step_pre_hook(self._pre_step), opt.register_step_post_hook(self._post_step)]
            _ATTACHED.add(opt)
        self._attached = True
        if opt is None:
            self._snapshot()
        return self

    def detach(self) -> None:
        """Remove the hooks and flush everything recorded to disk."""
        if not self._attached:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._optimizer is not None:
            _ATTACHED.discard(self._optimizer)
        self._attached = False
        self._sink.close(self._fingerprint())

    def state_dict(self) -> dict[str, Any]:
        """Commit every step recorded so far (durably) and return the state to save in the model checkpoint.

        Save it beside ``model.state_dict()`` and the optimizer's; after a crash, load the
        checkpoint and pass it to ``store.recorder(model, optimizer, resume=state)``, which
        rolls back the steps the checkpoint does not have. JSON-serialisable.

        >>> torch.save({"model": model.state_dict(), "store": rec.state_dict()}, "ckpt.pt")  # doctest: +SKIP
        """
        self._require_attached()
        if self._in_batch or self._pending:
            raise RecorderError("rec.state_dict() inside a rec.batch(...) block or between gradient-accumulation "
                                "micro-batches: checkpoint after an optimizer step")
        weights = self._fingerprint()
        steps, samples, owners = self._sink.checkpoint(weights)
        return {"updatestore_recorder": 1, "steps": steps, "samples": samples, "owners": owners, "weights": weights}

    def _fingerprint(self) -> str | None:
        # Sharded: a collective (every rank gathers each parameter), so every rank computes it.
        return None if self._model is None or not (self._params or self._sharded) else weights_fingerprint(self._model)

    def _count_trainable(self) -> int:
        if self._model is None:
            return -1
        return sum(1 for p in self._model_params if p.requires_grad)

    def _count_optimized(self) -> int:
        if self._optimizer is None:
            return -1
        return sum(len(g["params"]) for g in self._optimizer.param_groups)

    def _check_parameters(self) -> None:
        """A parameter unfrozen or added after attach would silently go unrecorded: refuse the step."""
        if self._count_trainable() != self._trainable or self._count_optimized() != self._in_optimizer:
            recorded = {id(p) for _, p in self._params}
            new = [n for n, p in (self._model.named_parameters() if self._model is not None else [])
                   if p.requires_grad and p.numel() > 0 and id(p) not in recorded]
            raise RecorderError(
                "the set of trained parameters changed after the recorder attached "
                f"({'newly trainable: ' + ', '.join(new) if new else 'the optimizer has new parameters or groups'}); "
                "the store records only the parameters it was created for, so this step would be missing from "
                "it. Freeze them again, or detach, and record into a store created for the new set")

    def __enter__(self) -> "Recorder":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # ------------------------------------------------------------ hook mode
    @contextmanager
    def batch(self, ids: Any, *, accumulate: bool = False) -> Iterator[None]:
        """One optimizer step's worth of samples.

        ``accumulate=True`` marks a gradient-accumulation micro-batch: its IDs are
        carried to the next step. A batch that ends with no optimizer step (and
        no ``accumulate``) is recorded as a skipped step (e.g. AMP GradScaler).
        """
        self.begin(ids)
        try:
            yield
        except BaseException:
            self._in_batch = False
            self._pending = [] if self._steps_in_batch == 0 else self._pending
            raise
        self.end(accumulate=accumulate)

    def begin(self, ids: Any) -> None:
        """Open a batch (``rec.batch`` split in two, for frameworks whose hooks bracket a batch): ``ids`` are
        its samples; the optimizer step, if any, must come before :meth:`end`."""
        self._require_attached()
        if self._optimizer is None:
            raise RecorderError("rec.batch() needs an optimizer; without one call rec.step(ids) after each update")
        if self._in_batch:
            raise RecorderError("rec.batch() blocks cannot be nested")
        batch_ids = as_sample_ids(ids)
        if batch_ids.size == 0:
            raise RecorderError("a batch was recorded without sample IDs; pass the batch's IDs to rec.batch(ids)")
        self._pending.append(batch_ids)
        self._in_batch, self._steps_in_batch = True, 0

    def end(self, *, accumulate: bool = False) -> bool:
        """Close the batch :meth:`begin` opened; returns whether an optimizer step happened in it.

        Without a step, ``accumulate=True`` carries its IDs to the next step; otherwise the batch
        is recorded as a skipped step (the optimizer did not update: e.g. GradScaler skipped it).
        """
        if not self._in_batch:
            raise RecorderError("rec.end() without rec.begin(ids)")
        self._in_batch = False
        if self._steps_in_batch == 0 and not accumulate:
            self._emit(StepRecord(STATUS_SKIPPED, self._step_ids()))
        return self._steps_in_batch > 0

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._in_batch:
            raise RecorderError(
                "optimizer.step() was called outside `with rec.batch(ids):`; every step must say "
                "which sample IDs it used"
            )
        if self._steps_in_batch:
            raise RecorderError("optimizer.step() was called twice inside one rec.batch(...) block")
        self._check_parameters()
        # With several ranks the watch decision needs every rank's IDs: snapshot always.
        if self._world > 1 or self._wanted(self._pending):
            self._snapshot()

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._steps_in_batch += 1
        self._record_step()

    # ------------------------------------------------------------ manual mode
    def step(self, ids: Any) -> None:
        """Record the change since the previous ``step`` (or attach) under ``ids``."""
        self._require_attached()
        if self._optimizer is not None:
            raise RecorderError("this recorder hooks the optimizer; use `with rec.batch(ids):` instead of rec.step")
        self._check_parameters()
        self._pending.append(as_sample_ids(ids))
        self._record_step()
        self._snapshot()

    # ------------------------------------------------------------ internals
    def _require_attached(self) -> None:
        if not self._attached:
            raise RecorderError("the recorder is not attached; use it as `with store.recorder(model, opt) as rec:`")

    def _wanted(self, pending: list[np.ndarray]) -> bool:
        if self._watch is None:
            return True
        ids = np.concatenate(pending) if pending else np.zeros(0, np.int64)
        return bool(np.isin(ids, self._watch, assume_unique=False).any())

    def _step_ids(self) -> np.ndarray:
        """This step's IDs (every rank's, under torch.distributed); clears the pending ones."""
        # a copy either way: the writer must not see the caller's array (or tensor) change later
        pending = self._pending
        ids = pending[0].copy() if len(pending) == 1 else np.concatenate(pending) if pending else np.zeros(0, np.int64)
        if ids.size == 0:
            raise RecorderError("a step was recorded without sample IDs; pass the batch's IDs to rec.step(ids)")
        self._pending = []
        return gather_ids(ids, self._group) if self._world > 1 else ids

    def _snapshot(self) -> None:
        t0 = time.perf_counter()
        self._deltas.snapshot()
        self._snap_valid = True
        self.seconds["snapshot"] += time.perf_counter() - t0

    @torch.no_grad()
    def _record_step(self) -> None:
        ids = self._step_ids()
        if not self._wanted([ids]):
            self._emit(StepRecord(STATUS_NOT_STORED, ids))
            return
        if not self._snap_valid:
            raise RecorderError("internal: no parameter snapshot before this step")
        self._snap_valid = False  # the snapshot buffer now holds Δθ; manual mode snapshots again next
        t0 = time.perf_counter()
        # On the fused CPU path the step goes over as two flat arrays, which the writer encodes in two calls
        flat = self._deltas.pruned_flat() if self._deltas.fused and not self._sharded else None
        rows = self._deltas.pruned() if flat is None else None
        self.seconds["prune"] += time.perf_counter() - t0
        status = STATUS_RECORDED  # whether the step changed anything is decided by the writer, unless sharded:
        if self._sharded:  # each rank sees only its parts, so it is agreed
            status = step_status([v for v, _ in rows], self._group)
            if status != STATUS_RECORDED:
                self._emit(StepRecord(status, ids))
                return
        rows, ready = stage(rows) if rows is not None else (None, None)  # GPU rows: to pinned memory, side stream
        self._emit(StepRecord(status, ids, rows, ready, flat))

    def _emit(self, record: StepRecord) -> None:
        t0 = time.perf_counter()
        self._sink.put(record)
        self.steps_recorded += 1
        self.seconds["hand_off"] += time.perf_counter() - t0
