"""Purge: erase the stored rows of subtracted steps and the forgotten sample IDs from disk.

Order (each point is safe to stop at): 1. the steps are marked purged in the
step table, so they are never subtracted again; 2. their rows are overwritten
with zeros in every layer — Zarr drops chunks that become empty and rewrites
the others, so the old bytes are in no file; 3. every occurrence of the
forgotten IDs in the sample index and the owner table becomes a tombstone.
"""

from __future__ import annotations

import numpy as np
import zarr

from ._backend import local_root
from ._format import PURGED_ID, STATUS_PURGED, LayerSpec, bump_generation, dense_array, erase_beyond, paths
from ._index import SampleIndex
from ._owners import OwnerTable
from ._reader import read_plan

__all__ = ["purge_steps"]


def purge_steps(root: zarr.Group, specs: tuple[LayerSpec, ...], index: SampleIndex, status: np.ndarray,
                rows: np.ndarray, steps: np.ndarray, samples: np.ndarray | None, owners: OwnerTable) -> int:
    """Erase ``steps`` (sorted, unique, validated) and ``samples``; returns the sample IDs erased.

    ``rows`` is every committed step's layer row (``arange`` in format 1).

    Also erased: whatever an interrupted writer left beyond the committed steps (rows and
    sample IDs no commit vouches for, which could hold the forgotten samples) and the
    temporary files of interrupted chunk rewrites.
    """
    n = index.num_steps
    erase_beyond(root, specs, n, len(index.ids), int(rows[-1]) + 1 if n else 0)
    directory = local_root(root.store)
    if directory is not None:  # zarr's local store writes a chunk as <name>.<uuid>.partial, then renames it
        for leftover in directory.rglob("*.partial"):
            leftover.unlink(missing_ok=True)
    new_status = status.copy()
    new_status[steps] = STATUS_PURGED
    dense_array(root, paths.STATUS)[:n] = new_status  # 1.
    runs = read_plan(rows[steps], 1)[0] if steps.size else []
    for spec in specs:  # 2.
        for path in spec.array_paths:
            arr = dense_array(root, path)  # zeroed rows stay as chunks: other rows of the shard are still checked
            for run in runs:
                arr[run] = 0
    if samples is None:
        bump_generation(root)
        return 0
    hit = np.flatnonzero(np.isin(index.ids, samples))  # 3.
    if hit.size:
        arr = root[paths.SAMPLE_IDS]
        chunk = arr.chunks[0]
        for c in np.unique(hit // chunk):
            a, b = int(c * chunk), int(min((c + 1) * chunk, len(index.ids)))
            block = index.ids[a:b].copy()
            block[np.isin(block, samples)] = PURGED_ID
            arr[a:b] = block
    owners.tombstone(samples)
    bump_generation(root)
    return int(hit.size)

