"""The sample-index queries of a store: which steps saw which samples, and whose samples they are."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ._format import read_state
from ._index import SampleIndex, as_sample_ids, as_steps
from .errors import ConfigError, CorruptStoreError, StepError, StoreChangedError

__all__ = ["Queries"]


class Queries:
    """Mixed into :class:`UpdateStore`; needs ``_table``, ``_owners``, ``_where``, ``_counts()`` and
    ``_require_writable``/``_require_owner``."""

    _pins = 0  # > 0 inside pinned(): _counts() keeps the commit state read when the block began
    # Another handle writes what this one reads (a "r" handle, or a rank > 0 of a collective "r+" store):
    # its commit state comes from the commit record, re-read per call unless pinned.
    _follows = property(lambda self: self._mode == "r" or self._rank != 0)

    @contextmanager
    def pinned(self) -> Iterator[Any]:
        """Within the block, every query and read of this handle sees one commit state: the one read as it begins.

        A ``"r"`` handle re-reads the store's commit record on each call, so that it follows another
        process's commits and purges. Calls that must agree with each other (the steps a request
        hits, their statuses, their rows) belong in one ``pinned()`` block — ``unlearn.amnesiac`` uses
        one — which also spares the re-reads. Steps committed meanwhile are seen after the block; if
        another handle purged or rolled back steps meanwhile, leaving the block raises
        :class:`StoreChangedError` (what was read may mix two states: discard it and run again).
        Blocks nest (the outermost checks); a ``"r+"`` handle that owns the store sees its own changes.

        >>> with store.pinned():                                       # doctest: +SKIP
        ...     steps = store.batches_containing([3, 17])
        ...     rows = store.read(steps[store.step_status()[steps] == 1])
        """
        steps = self._counts()[0]
        generation = self._table.generation
        self._pins += 1
        check = self._pins == 1 and self._follows  # another handle may write meanwhile
        try:
            yield self
        except CorruptStoreError:  # rows zeroed by a purge under way fail their checks: say what happened
            if check:
                self._check_unchanged(steps, generation)
            raise
        finally:
            self._pins -= 1
        if check:
            self._check_unchanged(steps, generation)

    def _check_unchanged(self, steps: int, generation: int) -> None:
        """Raise ``StoreChangedError`` if committed data changed in place since the commit state
        ``(steps, generation)`` was read. A purge writes statuses, zeroes rows, then bumps the
        generation; a rollback lowers the step count, erases rows, then bumps it: whichever point
        it reached, one of the three checks sees it."""
        now, _, gen = read_state(self._root, self._where)
        if gen != generation or now < steps or not self._table.status_unchanged():
            raise StoreChangedError(
                f"store {self._where} was changed in place (a purge or a rollback by another handle) while this "
                "one read it in store.pinned(): what was read may mix the two states; discard it and run again "
                "(unlearn.amnesiac has changed nothing when it raises this)")

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

