"""Hugging Face ``Trainer``: record every optimizer step into an update store.

Give the train dataset an integer ``sample_id`` column and add the callback; nothing
else changes. The ``Trainer`` keeps only the columns its model's ``forward`` accepts
(``remove_unused_columns=True``), so the callback wraps that ``forward`` (an instance
attribute, removed when training ends) to accept ``sample_id``, note the IDs of each
training micro-batch and call the original without them. Each optimizer step is
recorded with the IDs of all its micro-batches (``gradient_accumulation_steps``); a step
the GradScaler skipped is recorded as skipped. The recorder's checkpoint state is saved
in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``), and
``trainer.train(resume_from_checkpoint=...)`` first rolls the store back to it.

>>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[UpdateStoreCallback(store)])  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:
    raise ImportError("updatestore.integrations.transformers needs transformers: "
                      "pip install 'updatestore[transformers]'") from exc

from .._index import as_sample_ids
from ..errors import ConfigError, RecorderError
from ..recorder import Recorder
from ..store import UpdateStore
from ._ids import ID_KEY, finish

__all__ = ["UpdateStoreCallback"]


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate wraps the optimizer (AcceleratedOptimizer); step hooks live on the torch one inside.
    while not type(optimizer).__module__.startswith("torch.") and isinstance(
            getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RecorderError(f"UpdateStoreCallback: cannot find the torch optimizer inside {type(optimizer).__name__}")
    return optimizer


class UpdateStoreCallback(TrainerCallback, ExportableState):
    """Records ``Trainer.train`` into ``store`` (opened ``"r+"``, created for the model the Trainer trains).

    ``commit_seconds``, ``fsync`` and ``watch`` are :meth:`UpdateStore.recorder`'s. Leave
    ``TrainingArguments.restore_callback_states_from_checkpoint`` at its default (False):
    the callback restores its own state from the checkpoint it resumes from.
    """

    def __init__(self, store: UpdateStore | None = None, *, commit_seconds: float | None = 5.0, fsync: bool = False,
                 watch: Any = None) -> None:
        if not isinstance(store, UpdateStore):
            raise ConfigError(
                "UpdateStoreCallback needs an UpdateStore opened 'r+'" + (
                    " (if the Trainer re-created this callback from a checkpoint, leave "
                    "restore_callback_states_from_checkpoint=False)" if store is None else f", got {type(store).__name__}"))
        if store.mode != "r+":
            raise ConfigError(f"store {store.path} is open read-only; open it with UpdateStore.open(path, 'r+')")
        self.store = store
        self._options = {"commit_seconds": commit_seconds, "fsync": fsync, "watch": watch}
        self._rec: Recorder | None = None
        self._wrapped: torch.nn.Module | None = None
        self._seen: list[np.ndarray] = []
        self.recorder_state: dict[str, Any] | None = None

    # ------------------------------------------------------------ the IDs' way to the model
    def on_init_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            self._wrap_forward(model)

    def _wrap_forward(self, model: torch.nn.Module) -> None:
        # The Trainer inspects the base model's forward under PEFT; keyword arguments reach it from the wrapper.
        target = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self._wrapped is target:
            return
        original = target.forward
        sig = inspect.signature(original)
        if ID_KEY in sig.parameters:
            raise ConfigError(f"the model's forward already takes {ID_KEY!r}; rename the dataset column")
        params = list(sig.parameters.values())
        extra = inspect.Parameter(ID_KEY, inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        seen = self._seen

        def forward(*a: Any, **kw: Any) -> Any:
            ids = kw.pop(ID_KEY, None)
            if ids is not None and target.training and torch.is_grad_enabled():
                seen.append(as_sample_ids(ids))
            return original(*a, **kw)

        forward.__signature__ = sig.replace(parameters=params[:at] + [extra] + params[at:])  # type: ignore[attr-defined]
        target.forward = forward
        self._wrapped = target

    def _unwrap(self) -> None:
        target, self._wrapped = self._wrapped, None
        if target is not None and "forward" in vars(target):
            del target.forward

    # ------------------------------------------------------------ recording
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None or optimizer is None:
            raise RecorderError("UpdateStoreCallback: the Trainer passed no model or optimizer to on_train_begin")
        self._wrap_forward(model)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        saved = saved[0] if isinstance(saved, list) else saved  # one store per Trainer
        resume = (saved or {}).get("attributes", {}).get("recorder_state")
        self._seen.clear()
        self._rec = self.store.recorder(model, _torch_optimizer(optimizer), resume=resume, **self._options).attach()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._seen:
            raise RecorderError(f"no sample IDs reached the model for this step: give the train dataset an integer "
                                f"{ID_KEY!r} column (each sample's stable ID)")
        ids, self._seen[:] = np.concatenate(self._seen), []
        self._recorder().begin(ids)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recorder().end()  # without an optimizer step (GradScaler skipped it): a skipped step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_save:  # the checkpoint about to be written: commit the store first
            self.recorder_state = self._recorder().state_dict()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rec, self._rec = self._rec, None
        try:
            self.recorder_state = finish(rec, checkpoint=True) or self.recorder_state
        finally:
            self._unwrap()

    def _recorder(self) -> Recorder:
        if self._rec is None:
            raise RecorderError("UpdateStoreCallback: an optimizer step outside Trainer.train")
        return self._rec

    def state(self) -> dict[str, Any]:
        """Saved in ``trainer_state.json`` with every checkpoint (JSON: the recorder's state)."""
        return {"args": {}, "attributes": {"recorder_state": self.recorder_state}}
