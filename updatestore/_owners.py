"""The owner table: which owner (user, document, source) each sample ID belongs to."""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from ._format import OWNER_COUNT, PURGED_ID, dense_array, paths, require_chunks
from ._index import as_sample_ids
from .errors import CorruptStoreError, SampleIdError

__all__ = ["OwnerTable"]


class OwnerTable:
    """Append ``(sample, owner)`` pairs; look up an owner's samples (sorted by key, cached)."""

    def __init__(self, root: zarr.Group, where: str, *, strict: bool = False) -> None:
        self._root = root
        self._where = where
        self._strict = strict  # every chunk is written, zeros included (stores since 0.2): check presence
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        self._sorted_count = -1  # the committed count the cache was built at (a rollback lowers it)

    def count(self) -> int:
        record = OWNER_COUNT.read(self._root)
        if record is None:
            raise CorruptStoreError(f"{self._where}: the owner table's record (owners/zarr.json) is missing or "
                                    "damaged; restore it from a backup")
        return record[0]

    def _check_chunks(self, n: int) -> None:
        for path in (paths.OWNER_SAMPLES, paths.OWNER_KEYS):
            require_chunks(self._root[path], n, self._where, presence=self._strict)

    def append(self, sample_ids: Any, owners: Any) -> None:
        ids = as_sample_ids(sample_ids)
        keys = as_sample_ids(owners, what="owner keys")
        if len(ids) != len(keys):
            raise SampleIdError(f"index_owners needs one owner per sample: got {len(ids)} IDs and {len(keys)} owners")
        n = self.count()
        for path, values in ((paths.OWNER_SAMPLES, ids), (paths.OWNER_KEYS, keys)):
            arr = dense_array(self._root, path)
            if arr.shape[0] < n + len(ids):
                arr.resize((n + len(ids),))
            arr[n:n + len(ids)] = values
        OWNER_COUNT.write(self._root, n + len(ids))  # the commit point
        self._sorted = None

    def _table(self) -> tuple[np.ndarray, np.ndarray]:
        n = self.count()
        if self._sorted is None or self._sorted_count != n:
            self._check_chunks(n)
            try:
                sids = self._root[paths.OWNER_SAMPLES][:n] if n else np.zeros(0, np.int64)
                keys = self._root[paths.OWNER_KEYS][:n] if n else np.zeros(0, np.int64)
            except Exception as exc:
                raise CorruptStoreError(f"store {self._where}: the owner table cannot be read: {exc}") from exc
            order = np.argsort(keys, kind="stable")
            self._sorted, self._sorted_count = (keys[order], sids[order]), n
        return self._sorted

    def samples_of(self, owners: Any) -> np.ndarray:
        """Sorted, unique sample IDs indexed under any of ``owners`` (tombstones left out)."""
        keys, sids = self._table()
        q = np.unique(as_sample_ids(owners, what="owner keys"))
        lo, hi = np.searchsorted(keys, q, "left"), np.searchsorted(keys, q, "right")
        if not (hi > lo).any():
            return np.zeros(0, dtype=np.int64)
        found = np.concatenate([sids[a:b] for a, b in zip(lo, hi) if b > a])
        return np.unique(found[found != PURGED_ID])

    def tombstone(self, ids: np.ndarray) -> None:
        """Overwrite every row holding one of ``ids`` — sample and owner key — with the tombstone
        (an owner whose samples are all forgotten leaves no key behind)."""
        n = self.count()
        if n:
            self._check_chunks(n)  # a deleted chunk would read as zeros and be written back as zeros
            own = self._root[paths.OWNER_SAMPLES][:n]
            mask = np.isin(own, ids)
            if mask.any():
                for path in (paths.OWNER_SAMPLES, paths.OWNER_KEYS):
                    arr = dense_array(self._root, path)
                    values = own if path == paths.OWNER_SAMPLES else arr[:n]
                    values[mask] = PURGED_ID
                    arr[:n] = values
        self._sorted = None
