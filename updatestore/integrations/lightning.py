"""PyTorch Lightning: record every optimizer step of ``Trainer.fit`` into an update store.

Each optimizer step is recorded with the sample IDs of all its micro-batches
(``accumulate_grad_batches``); a step the precision plugin skipped (16-mixed's GradScaler
on an overflow) is recorded as skipped. The recorder's checkpoint state travels in
Lightning's own checkpoint (this callback's ``state_dict``), so ``trainer.fit(model,
ckpt_path=...)`` after a crash first rolls the store back to that checkpoint.

>>> store = UpdateStore.create("run.zarr", model)                          # doctest: +SKIP
>>> trainer = lightning.Trainer(callbacks=[UpdateStoreCallback(store)])   # doctest: +SKIP
>>> trainer.fit(model, loader)                                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError("updatestore.integrations.lightning needs PyTorch Lightning: "
                          "pip install 'updatestore[lightning]'") from exc

from ..errors import ConfigError, RecorderError
from ..recorder import Recorder
from ..store import UpdateStore
from ._ids import finish, ids_getter

__all__ = ["UpdateStoreCallback"]


class UpdateStoreCallback(Callback):
    """Records ``trainer.fit`` into ``store`` (opened ``"r+"``).

    ``ids``: a callable ``batch -> sample IDs`` (default: a dict batch's ``"sample_id"``, or
    the last element of a tuple/list batch). ``module``: the attribute of the
    LightningModule the store was created for (e.g. ``"net"``; default: the LightningModule
    itself). ``commit_seconds``, ``fsync`` and ``watch`` are :meth:`UpdateStore.recorder`'s.
    One optimizer (automatic optimization) is supported.
    """

    def __init__(self, store: UpdateStore, *, ids: Callable[[Any], Any] | None = None, module: str | None = None,
                 commit_seconds: float | None = 5.0, fsync: bool = False, watch: Any = None) -> None:
        if not isinstance(store, UpdateStore):
            raise ConfigError(f"UpdateStoreCallback needs an UpdateStore opened 'r+', got {type(store).__name__}")
        if store.mode != "r+":
            raise ConfigError(f"store {store.path} is open read-only; open it with UpdateStore.open(path, 'r+')")
        if module is not None and not isinstance(module, str):
            raise ConfigError(f"module= is an attribute name of the LightningModule (e.g. 'net'), got {module!r}")
        self.store = store
        self._ids = ids_getter(ids)
        self._module = module
        self._options = {"commit_seconds": commit_seconds, "fsync": fsync, "watch": watch}
        self._rec: Recorder | None = None
        self._resume: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self._stepped = False

    # ------------------------------------------------------------ recording
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise RecorderError(f"UpdateStoreCallback records one optimizer; this run has {len(optimizers)}")
        model = pl_module
        for part in (self._module or "").split(".") if self._module else []:
            model = getattr(model, part)
        # Loading the checkpoint (ckpt_path=) restored this callback's state before training starts.
        resume, self._resume = self._resume, None
        self._rec = self.store.recorder(model, optimizers[0], resume=resume, **self._options).attach()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._stepped = False
        self._recorder().begin(self._ids(batch))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        # Called on every accumulation boundary, also when a GradScaler then skips the step.
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A micro-batch before the boundary carries its IDs to the step; a boundary without an
        # optimizer step (the scaler skipped it) is recorded as a skipped step.
        self._recorder().end(accumulate=not self._stepped)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(checkpoint=True)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Commit the steps recorded before the failure (a resume rolls back what its checkpoint lacks).
        self._finish(checkpoint=False)

    def _finish(self, *, checkpoint: bool) -> None:
        rec, self._rec = self._rec, None
        self._state = finish(rec, checkpoint=checkpoint) or self._state

    def _recorder(self) -> Recorder:
        if self._rec is None:
            raise RecorderError("UpdateStoreCallback: training batch outside Trainer.fit's training loop")
        return self._rec

    # ------------------------------------------------------------ Lightning checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The recorder's checkpoint state (commits the store first); saved in Lightning's checkpoint."""
        if self._rec is not None:
            self._state = self._rec.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by ``trainer.fit(ckpt_path=...)``: the store is aligned with it when training starts."""
        self._resume = dict(state_dict) if state_dict else None
