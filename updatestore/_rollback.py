"""Aligning a store with a model checkpoint: validate the recorder state, roll back later steps.

A resumed run continues from the checkpoint's step, so committed steps after it
belong to a lineage the model no longer has. Rolling back writes, in order: the
sorted-index record (invalidated if it covers rolled-back steps, so a cache of
them is never trusted again), the commit record (the atomic point: from here on
readers see the checkpoint's steps), zeros over everything the rolled-back steps
left in the arrays (rows, statuses, sample IDs), the owner table back to its
count at the checkpoint, and a ``rollback`` lineage event.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from ._format import COUNTS, INDEX_RECORD, OWNER_COUNT, LayerSpec, bump_generation, committed_rows, erase_beyond, paths, truncate
from ._lineage import append_event, read_events
from .errors import ConfigError, ModelMismatchError, StoreBehindCheckpointError

__all__ = ["check_state", "align"]

STATE_KEY = "updatestore_recorder"


def check_state(state: Any) -> dict[str, Any]:
    """A recorder state from ``rec.state_dict()``, validated, or a ``ConfigError`` saying what is wrong."""
    if not isinstance(state, dict) or state.get(STATE_KEY) != 1:
        raise ConfigError(f"resume= takes the dict that rec.state_dict() returned (saved with the model "
                          f"checkpoint); got {type(state).__name__} without '{STATE_KEY}': 1")
    steps, samples, weights = state.get("steps"), state.get("samples"), state.get("weights")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (steps, samples)):
        raise ConfigError(f"resume= state has invalid steps/samples {steps!r}/{samples!r}")
    if weights is not None and not isinstance(weights, str):
        raise ConfigError(f"resume= state has an invalid weights fingerprint {weights!r}")
    owners = state.get("owners")  # absent in states saved before 0.2's owner rollback
    if owners is not None and (not isinstance(owners, int) or isinstance(owners, bool) or owners < 0):
        raise ConfigError(f"resume= state has an invalid owner count {owners!r}")
    return {"steps": steps, "samples": samples, "weights": weights, "owners": owners}


def align(root: zarr.Group, where: str, specs: tuple[LayerSpec, ...], state: dict[str, Any],
          weights: str | None, num_steps: int, num_samples: int, *, row_map: bool = False) -> tuple[int, int]:
    """Make the store hold exactly the checkpoint's steps; returns the new committed counts.

    ``weights`` is the fingerprint of the model being resumed. Raises (changing nothing)
    when the store is behind the checkpoint or the checkpoint is not from this store.
    """
    k, m_k = state["steps"], state["samples"]
    if k > num_steps:
        raise StoreBehindCheckpointError(
            f"the checkpoint is at step {k}, but store {where} holds only {num_steps} committed steps: steps "
            f"{num_steps}..{k - 1} were trained into the model and never committed, so their samples could "
            f"never be found or unlearned. Resume from a checkpoint at step {num_steps} or earlier (save "
            "rec.state_dict() with every checkpoint: it commits the store first)")
    ends = root[paths.SAMPLE_END][:k] if k else np.zeros(0, np.int64)
    if (int(ends[-1]) if k else 0) != m_k:
        raise ModelMismatchError(
            f"the checkpoint says its first {k} steps used {m_k} samples, but store {where} holds "
            f"{int(ends[-1]) if k else 0} for them: this checkpoint is not from the run this store recorded")
    if state["weights"] is not None:
        if weights != state["weights"]:
            raise ModelMismatchError(
                "the model's weights are not the ones the checkpoint was saved with: load the checkpoint's "
                "model state (model.load_state_dict(...)) before resuming the recorder")
        vouched = {(e.get("step"), e.get("weights")) for e in read_events(root, where) if e.get("event") == "checkpoint"}
        if (k, state["weights"]) not in vouched:
            raise ModelMismatchError(
                f"store {where} has no checkpoint at step {k} with these weights: the checkpoint was saved "
                "with another store's recorder")
    if k == num_steps:
        _rollback_owners(root, state["owners"])
        return num_steps, num_samples
    index = INDEX_RECORD.read(root)
    if index is not None and index[0] > k:
        INDEX_RECORD.write(root, 0, 0)
    rows = committed_rows(root, k, row_map)
    COUNTS.write(root, k, m_k)  # the commit point of the rollback
    erase_beyond(root, specs, k, m_k, rows)
    _rollback_owners(root, state["owners"])
    bump_generation(root)
    append_event(root, where, "rollback", step=k, samples=m_k, from_step=num_steps, from_samples=num_samples)
    return k, m_k


def _rollback_owners(root: zarr.Group, keep: int | None) -> None:
    """Owner-table entries indexed after the checkpoint go too: the count record first (atomic), then the entries."""
    count = OWNER_COUNT.read(root)
    if keep is None or count is None or count[0] <= keep:
        return
    OWNER_COUNT.write(root, keep)
    for path in (paths.OWNER_SAMPLES, paths.OWNER_KEYS):
        truncate(root[path], keep)
