"""The deletion request every store-based method shares: resolve IDs to steps, then record the outcome.

``resolve`` finds the samples (by ID or owner), the steps that used them, which of
those this very model already had subtracted (audit ledger, matched by a hash of
its weights) and which are gone (purged after unlearning another copy).
``log`` appends the ledger entry; ``purge`` erases what was subtracted. Both should come
after the caller saved the model (``amnesiac(defer=True)`` + ``report.commit()``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from updatestore import (PURGED_ID, STATUS_NONFINITE, STATUS_NOT_STORED, STATUS_PURGED, STATUS_RECORDED,
                         STATUS_SKIPPED, ConfigError, ReadOnlyStoreError, UpdateStore, as_sample_ids,
                         ids_in_ledger, subtracted_in_lineage, weights_fingerprint)
from updatestore.ledger import ledger_ids, lineage_entries, now

from .errors import UnknownModelError

__all__ = ["Request", "resolve", "check_lineage", "log", "purge"]


@dataclass
class Request:
    """A resolved deletion request (all arrays sorted)."""

    ids: np.ndarray  # every requested sample ID, owners' samples included
    found: np.ndarray  # mask over ids: indexed in some step
    unknown: np.ndarray  # never recorded, and not forgotten earlier
    already_forgotten: np.ndarray  # forgotten and purged by an earlier request
    fingerprint: str  # hash of the model's weights before this request
    steps: np.ndarray  # every step holding a found sample
    status: np.ndarray  # status of every committed step
    was_done: np.ndarray  # mask over steps: already subtracted from this model
    hit: np.ndarray  # the steps to subtract now
    unavailable: np.ndarray  # steps purged after unlearning another copy of the model
    collateral: int  # other samples that shared the hit steps

    @property
    def without_update(self) -> int:
        s = self.status[self.steps]
        return int(((s == STATUS_SKIPPED) | (s == STATUS_NOT_STORED)).sum())

    @property
    def nonfinite(self) -> int:
        """Steps holding the samples whose update was NaN/infinite: nothing stored to subtract."""
        return int((self.status[self.steps] == STATUS_NONFINITE).sum())


def check_lineage(store: UpdateStore, fingerprint: str, entries: list[dict[str, Any]]) -> None:
    """Refuse a model whose weights the store never saw (at a checkpoint, at the end of recording,
    or as the result of an unlearning). Stores written before 0.2 record no lineage: not checked."""
    recorded = {e.get("weights") for e in store.history() if e.get("event") in ("checkpoint", "close")} - {None}
    if recorded and fingerprint not in recorded | {e.get("model_after") for e in entries}:
        raise UnknownModelError(
            f"this model's weights match no state store {store.path} recorded (a checkpoint or the end of "
            "recording) and no earlier unlearning's result: it was trained further outside the recorder, or "
            "comes from another run, so the stored updates may not be the ones it received. Pass "
            "allow_unknown_model=True to subtract them anyway")


def resolve(model: torch.nn.Module, store: UpdateStore, sample_ids: Any, owners: Any, *, writes: bool,
            allow_unknown_model: bool = False) -> Request:
    """Validate the request and find its steps; ``writes``: the method will write the ledger or purge."""
    if writes and store.mode != "r+":
        raise ReadOnlyStoreError(
            f"unlearning records an audit entry in store {store.path} and purges the forgotten rows: open it "
            "with UpdateStore.open(path, 'r+'), or pass ledger=False, purge=False"
        )
    if sample_ids is None and owners is None:
        raise ConfigError("give the sample IDs to forget, or owners=[...] whose samples to forget")
    ids = np.unique(as_sample_ids([] if sample_ids is None else sample_ids))
    if owners is not None:  # every sample indexed under these owners (user, document, source)
        ids = np.union1d(ids, store.samples_of(owners))
    entries = store.ledger()
    found = store.contains(ids) if ids.size else np.zeros(0, dtype=bool)
    forgotten = ~found & ids_in_ledger(entries, ids, store.meta.get("ledger_key")) if ids.size else np.zeros(0, dtype=bool)
    unknown = ids[~found & ~forgotten]
    if unknown.size:
        warnings.warn(f"{unknown.size} of {ids.size} sample IDs were never recorded in {store.path}: "
                      f"{unknown[:10].tolist()}", stacklevel=3)
    fingerprint = weights_fingerprint(model)
    if not allow_unknown_model:
        check_lineage(store, fingerprint, entries)
    done = subtracted_in_lineage(entries, fingerprint)
    steps = store.batches_containing(ids[found])
    status = store.step_status()
    was_done = np.isin(steps, np.fromiter(done, dtype=np.int64, count=len(done)))
    hit = steps[(status[steps] == STATUS_RECORDED) & ~was_done]
    unavailable = steps[(status[steps] == STATUS_PURGED) & ~was_done]
    if unavailable.size:
        warnings.warn(f"{unavailable.size} step(s) holding these samples were purged after unlearning another "
                      "copy of the model; their updates cannot be subtracted from this one", stacklevel=3)
    others = np.setdiff1d(store.samples_in_steps(hit), np.append(ids, PURGED_ID))
    return Request(ids, found, unknown, ids[forgotten], fingerprint, steps, status, was_done, hit, unavailable,
                   int(others.size))


def log(store: UpdateStore, request: Request, model_after: str, *, method: str, kept: dict[str, int]) -> int:
    """Append the ledger entry of an applied unlearning (``purged: False`` until :func:`purge`);
    ``model_after`` is the fingerprint of the unlearned weights."""
    return store.log_unlearning({
        "time": now(), "method": method, **ledger_ids(request.ids[request.found], store.meta.get("ledger_key")),
        "steps": request.hit.tolist(), "model_before": request.fingerprint,
        "model_after": model_after, "kept_per_step": kept, "purged": False,
    })


def purge(store: UpdateStore, request: Request, entry: int | None) -> bool:
    """Erase the steps subtracted now or earlier from this model (rows still on disk, or left by an
    interrupted purge: purging is idempotent) and every occurrence of the found IDs; then mark
    the ledger entry purged. Returns whether anything was requested to purge."""
    if not request.found.any():
        return False
    steps, status = request.steps, request.status
    ours = request.was_done | np.isin(steps, request.hit)
    leftover = steps[((status[steps] == STATUS_RECORDED) | (status[steps] == STATUS_PURGED)) & ours]
    store.purge(leftover, samples=request.ids[request.found])
    # This request's entry, and earlier ones of this model's lineage whose purge was interrupted.
    entries, status = store.ledger(), store.step_status()
    for i in sorted(set(lineage_entries(entries, request.fingerprint)) | ({entry} - {None})):
        steps = np.asarray(entries[i].get("steps", []), dtype=np.int64)
        if not entries[i].get("purged") and (status[steps] == STATUS_PURGED).all():
            store.update_ledger(i, purged=True)
    return True
