"""The sample-index queries of a store: which steps saw which samples, and whose samples they are."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._index import SampleIndex, as_sample_ids, as_steps
from .errors import ConfigError, StepError

__all__ = ["Queries"]


class Queries:
    """Mixed into :class:`UpdateStore`; needs ``_table``, ``_owners``, ``_where``, ``_counts()`` and
    ``_require_writable``/``_require_owner``."""

    # ------------------------------------------------------------ queries
    def _index(self) -> tuple[SampleIndex, np.ndarray]:
        return self._table.load(*self._counts())

    def batches_containing(self, ids: Any = None, *, owners: Any = None) -> np.ndarray:
        """Sorted, unique steps whose batch held any of ``ids`` or any sample of ``owners``.

        >>> store.batches_containing([3, 17, 42])      # doctest: +SKIP
        array([  0,  12,  57, 130])
        """
        query = as_sample_ids([] if ids is None else ids)
        if owners is not None:
            query = np.union1d(query, self.samples_of(owners))
        return self._index()[0].batches_containing(query)

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask over ``ids``: which were indexed in any step."""
        return self._index()[0].contains(ids)

    def samples_in(self, step: int) -> np.ndarray:
        """The sample IDs of one step."""
        index = self._index()[0]
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or not 0 <= step < index.num_steps:
            raise IndexError(f"step {step!r} out of range: store {self._where} has {index.num_steps} steps")
        return index.samples_in(int(step)).copy()

    def samples_in_steps(self, steps: Any) -> np.ndarray:
        """All sample IDs of the given steps, concatenated (repeats kept)."""
        return self._index()[0].samples_in_steps(as_steps(steps, self.num_batches, where=f"store {self._where}"))

    def read_groups(self, steps: Any, max_steps: int) -> list[np.ndarray]:
        """Sorted, unique ``steps`` cut into groups to read one after another: at most ``max_steps``
        each, cut where a shard ends, so no shard file is fetched for two groups (a shard holding
        more than ``max_steps`` of the steps is itself cut).

        >>> [g.tolist() for g in store.read_groups([1, 2, 70, 71], 3)]   # doctest: +SKIP
        [[1, 2], [70, 71]]
        """
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ConfigError(f"max_steps must be an int >= 1 (steps read per group), got {max_steps!r}")
        steps = as_steps(steps, self.num_batches, where=f"store {self._where}")
        if (np.diff(steps) <= 0).any():
            raise StepError(f"steps must be sorted and unique to group them for reading from store {self._where}")
        self._index()  # loads the step → row map
        shard = self._table.rows[steps] // self._meta["block_steps"]
        bounds = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(steps)]
        groups, start = [], 0
        for a, b in zip(bounds[:-1], bounds[1:]):  # steps[a:b] share one shard
            if b - start > max_steps and a > start:
                groups.append(steps[start:a])
                start = a
            while b - start > max_steps:
                groups.append(steps[start:start + max_steps])
                start += max_steps
        if start < len(steps):
            groups.append(steps[start:])
        return groups

    def step_status(self) -> np.ndarray:
        """Status of every committed step: 0 skipped, 1 recorded, 2 not stored (``watch``), 3 purged."""
        return self._index()[1].copy()

    def index_owners(self, sample_ids: Any, owners: Any) -> None:
        """Record which owner (user, document, source: an int64 key) each sample belongs to.

        >>> store.index_owners(train_ids, user_of_sample)   # doctest: +SKIP
        """
        self._require_writable("index owners")
        self._require_owner("index owners")
        self._owners.append(sample_ids, owners)

    def samples_of(self, owners: Any) -> np.ndarray:
        """Sorted, unique sample IDs indexed under any of ``owners``."""
        return self._owners.samples_of(owners)

