"""Attach a store to a training loop: capture Δθ per optimizer step, prune on device.

The recorder never touches Zarr: it hands host-side pruned rows to the writer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from .encoding import encode_positions_torch, values_to_numpy
from .errors import RecorderError
from .index import as_sample_ids
from .layout import STATUS_NOT_STORED, STATUS_RECORDED, STATUS_SKIPPED
from .pruning import prune_topk
from .writer import StepRecord

if TYPE_CHECKING:
    from .store import UpdateStore

__all__ = ["Recorder"]

# Optimizers with a recorder attached. Kept here, not as an attribute on the
# user's optimizer, so that we never mutate objects we do not own.
_ATTACHED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


class Recorder:
    """Records each optimizer step's pruned parameter change into a store.

    Made by :meth:`UpdateStore.recorder`. With an optimizer, it hooks
    ``optimizer.step()``; wrap each step's forward/backward/step in
    ``rec.batch(ids)``. Without one, call ``rec.step(ids)`` after each update.

    With torch.distributed (DistributedDataParallel: Δθ is the same on every
    rank), rank 0 prunes and writes, and every rank's batch IDs are gathered
    into the step: on rank 0 use ``store.recorder(model, opt)``, on the others
    ``Recorder(None, model, opt)``.

    >>> with store.recorder(model, optimizer) as rec:          # doctest: +SKIP
    ...     for x, y, ids in loader:
    ...         with rec.batch(ids):
    ...             optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
    """

    def __init__(self, store: "UpdateStore | None", model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer | None = None, *, watch: Any = None,
                 process_group: Any = None) -> None:
        self._group = process_group
        self._world, self._rank = 1, 0
        if process_group is not None or (dist.is_available() and dist.is_initialized()):
            self._world = dist.get_world_size(process_group)
            self._rank = dist.get_rank(process_group)
        if self._world > 1 and (store is None) != (self._rank != 0):
            raise RecorderError(
                f"with torch.distributed, rank 0 records into the store and every other rank passes store=None "
                f"(Recorder(None, model, optimizer)); this is rank {self._rank} "
                f"{'without' if store is None else 'with'} a store"
            )
        if store is None and self._world == 1:
            raise RecorderError("a recorder needs a store (store=None is for ranks > 0 of a distributed run)")
        if store is not None:
            store._require_writable("record")
            self._params = store._match_model(model)
        else:
            self._params = []
        self._store = store
        self._optimizer = optimizer
        self._watch = None if watch is None else np.unique(as_sample_ids(watch, what="watch"))
        self._value_dtype = store.value_dtype if store is not None else "float32"
        self._handles: list[Any] = []
        self._before: list[torch.Tensor] | None = None
        self._pending: list[np.ndarray] = []
        self._in_batch = False
        self._steps_in_batch = 0
        self._snap_valid = False
        self._attached = False
        self.steps_recorded = 0

    # ------------------------------------------------------------ lifecycle
    def attach(self) -> "Recorder":
        """Install the optimizer hooks (or take the first snapshot in manual mode)."""
        if self._attached:
            raise RecorderError("this recorder is already attached; use one `with store.recorder(...)` block")
        opt = self._optimizer
        if opt is not None:
            if opt in _ATTACHED:
                raise RecorderError(
                    "this optimizer already has an update-store recorder attached; "
                    "detach it (leave its `with` block) before attaching another"
                )
            self._handles = [
                opt.register_step_pre_hook(self._pre_step),
                opt.register_step_post_hook(self._post_step),
            ]
            _ATTACHED.add(opt)
        if self._store is not None:
            self._store._open_writer(self)
        self._attached = True
        if opt is None and self._store is not None:
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
        if self._store is not None:
            self._store._close_writer(self)

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
        try:
            yield
        except BaseException:
            self._pending = [] if self._steps_in_batch == 0 else self._pending
            raise
        finally:
            self._in_batch = False
        if self._steps_in_batch == 0 and not accumulate:
            ids = self._take_ids()
            if self._world > 1:
                ids = self._gather(ids)
                if self._store is None:
                    return
            self._emit(StepRecord(STATUS_SKIPPED, ids))

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._in_batch:
            raise RecorderError(
                "optimizer.step() was called outside `with rec.batch(ids):`; every step must say "
                "which sample IDs it used"
            )
        if self._steps_in_batch:
            raise RecorderError("optimizer.step() was called twice inside one rec.batch(...) block")
        # With several ranks the watch decision needs every rank's IDs: snapshot always.
        if self._store is not None and (self._world > 1 or self._wanted(self._pending)):
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
        self._pending.append(as_sample_ids(ids))
        self._record_step()
        if self._store is not None:
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

    def _take_ids(self) -> np.ndarray:
        ids = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int64)
        if ids.size == 0:
            raise RecorderError("a step was recorded without sample IDs; pass the batch's IDs to rec.step(ids)")
        self._pending = []
        return ids

    @torch.no_grad()
    def _snapshot(self) -> None:
        if self._before is None:
            self._before = [p.detach().clone() for _, p in self._params]
        else:
            for buf, (_, p) in zip(self._before, self._params):
                buf.copy_(p.detach())
        self._snap_valid = True

    def _gather(self, ids: np.ndarray) -> np.ndarray:
        """Every rank's IDs of this step, in rank order (two tensor all-gathers, no pickle)."""
        dev = (torch.device("cuda", torch.cuda.current_device())
               if dist.get_backend(self._group) == "nccl" else torch.device("cpu"))
        n = torch.tensor([len(ids)], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self._world)]
        dist.all_gather(sizes, n, group=self._group)
        width = int(max(int(s) for s in sizes))
        buf = torch.zeros(width, dtype=torch.int64, device=dev)
        buf[: len(ids)] = torch.from_numpy(ids).to(dev)
        parts = [torch.zeros_like(buf) for _ in range(self._world)]
        dist.all_gather(parts, buf, group=self._group)
        return np.concatenate([p[: int(s)].cpu().numpy() for p, s in zip(parts, sizes)])

    @torch.no_grad()
    def _record_step(self) -> None:
        ids = self._take_ids()
        if self._world > 1:
            ids = self._gather(ids)
            if self._store is None:  # ranks > 0: the IDs are all they contribute
                self.steps_recorded += 1
                return
        wanted = self._wanted([ids])
        if not wanted:
            self._emit(StepRecord(STATUS_NOT_STORED, ids))
            return
        if not self._snap_valid:
            raise RecorderError("internal: no parameter snapshot before this step")
        self._snap_valid = self._optimizer is None
        changed = None
        on_device = []
        for buf, (spec, p) in zip(self._before, self._params):
            # Δθ = θ_after − θ_before, written into the snapshot buffer (no new allocation).
            delta = torch.sub(p.detach(), buf, out=buf) if self._optimizer is not None else p.detach() - buf
            vals, pos = prune_topk(delta, spec.k)
            # The kept entries are the largest |Δ|: the layer changed iff one of them is non-zero.
            nz = vals.ne(0).any()
            changed = nz if changed is None else changed | nz
            on_device.append((vals, pos))
        if not bool(changed):  # one device sync per step
            self._emit(StepRecord(STATUS_SKIPPED, ids))
            return
        rows = []
        for (spec, _), (vals, pos) in zip(self._params, on_device):
            host_pos = None if pos is None else encode_positions_torch(pos, spec.numel, spec.positions)
            rows.append((values_to_numpy(vals, self._value_dtype), host_pos))
        self._emit(StepRecord(STATUS_RECORDED, ids, rows))

    def _emit(self, record: StepRecord) -> None:
        self._store._writer_put(record)
        self.steps_recorded += 1
