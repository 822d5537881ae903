"""The deletion request every store-based method shares: resolve IDs to steps, then record the outcome.

``resolve`` finds the samples (by ID or owner), the steps that used them, which of
those this very model already had subtracted (audit ledger, matched by a hash of
its weights) and which are gone (purged after unlearning another copy).
``record`` appends the ledger entry and purges, in that order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from updatestore import (PURGED_ID, STATUS_NOT_STORED, STATUS_PURGED, STATUS_RECORDED, STATUS_SKIPPED, ConfigError,
                         ReadOnlyStoreError, UpdateStore, as_sample_ids, hash_ids, ids_in_ledger,
                         subtracted_in_lineage, weights_fingerprint)
from updatestore.ledger import now

__all__ = ["Request", "resolve", "record"]


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


def resolve(model: torch.nn.Module, store: UpdateStore, sample_ids: Any, owners: Any, *, writes: bool) -> Request:
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
    forgotten = ~found & ids_in_ledger(entries, ids) if ids.size else np.zeros(0, dtype=bool)
    unknown = ids[~found & ~forgotten]
    if unknown.size:
        warnings.warn(f"{unknown.size} of {ids.size} sample IDs were never recorded in {store.path}: "
                      f"{unknown[:10].tolist()}", stacklevel=3)
    fingerprint = weights_fingerprint(model)
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


def record(store: UpdateStore, request: Request, model: torch.nn.Module, *, method: str, applied: bool,
           kept: dict[str, int], ledger: bool, purge: bool) -> tuple[int | None, bool]:
    """Append the ledger entry (when something was applied), then purge; returns ``(entry, purged)``.

    The purge erases the steps subtracted now or earlier from this model whose rows
    are still on disk, and every occurrence of the found IDs.
    """
    entry = None
    if applied and ledger:
        entry = store.log_unlearning({
            "time": now(), "method": method, "sample_id_sha256": hash_ids(request.ids[request.found]),
            "steps": request.hit.tolist(), "model_before": request.fingerprint,
            "model_after": weights_fingerprint(model), "kept_per_step": kept, "purged": False,
        })
    if not (purge and request.found.any()):
        return entry, False
    steps, status = request.steps, request.status
    leftover = steps[(status[steps] == STATUS_RECORDED) & (request.was_done | np.isin(steps, request.hit))]
    store.purge(leftover, samples=request.ids[request.found])
    if entry is not None:
        store.update_ledger(entry, purged=True)
    return entry, True
