"""A store's lineage, audit ledger, purge and footprint (mixed into :class:`UpdateStore`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import ledger as _ledger
from ._index import as_sample_ids, as_steps
from ._lineage import read_events
from ._purge import purge_steps
from .footprint import Footprint, measure

__all__ = ["Upkeep"]


class Upkeep:
    """Needs the store's ``_root``, ``_where``, ``_specs``, ``_table``, ``_reader``, ``_owners``, ``_counter``,
    ``_index()``, ``_counts()`` and its ``_require_*`` checks."""

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
        self._require_owner("write the audit ledger")
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
        self._require_owner("purge")
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

