"""Sample IDs per step, the inverse index ("which steps saw these samples"), and its persisted cache."""

from __future__ import annotations

from typing import Any

import numpy as np

import zarr

from ._format import INDEX_RECORD, PURGED_ID, STATUS_NONFINITE, require_chunks
from ._format import paths
from .errors import CorruptStoreError, SampleIdError, StepError

__all__ = ["as_sample_ids", "as_steps", "SampleIndex", "StepTable"]


def as_sample_ids(ids: Any, *, what: str = "sample IDs") -> np.ndarray:
    """A 1-D int64 array from a list, numpy array or torch tensor of integers.

    Floats, booleans and strings are refused: sample IDs are keys, and a silently
    rounded key would forget the wrong person's data.

    >>> as_sample_ids([3, 1, 2]).tolist()
    [3, 1, 2]
    """
    if hasattr(ids, "detach") and hasattr(ids, "cpu"):  # torch tensor, without importing torch
        try:  # a CPU tensor without grad (the usual batch of IDs) in one call: this runs every step
            ids = ids.numpy()
        except (RuntimeError, TypeError):  # on a device, or requires grad
            ids = ids.detach().cpu().numpy()
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        ids = [ids]
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SampleIdError(f"{what} must be a 1-D sequence of integers ({exc})") from None
    if arr.dtype == object:
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.ravel()):
            raise SampleIdError(f"{what} must be integers; got {arr.ravel()[:3].tolist()}...")
        try:
            arr = arr.astype(np.int64)
        except OverflowError:
            raise SampleIdError(f"{what} must fit in int64 (-2**63 < id < 2**63)") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise SampleIdError(
            f"{what} must be integers, got dtype {arr.dtype} (e.g. {arr.ravel()[:3].tolist()}); "
            "pass the dataset's integer keys, not floats or strings"
        )
    if arr.ndim != 1:
        raise SampleIdError(f"{what} must be 1-D, got shape {arr.shape}; flatten them first")
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise SampleIdError(f"{what} must fit in int64")
    out = arr if arr.dtype == np.int64 else arr.astype(np.int64)
    # A batch's IDs are checked every step: a NumPy comparison and reduction cost ~70 µs right after a
    # training step (caches cold), a scan of the batch as Python ints ~10 µs
    if (PURGED_ID in out.tolist()) if out.size <= 1024 else (out == PURGED_ID).any():
        raise SampleIdError(f"{what}: -2**63 is reserved (it marks purged IDs on disk)")
    return out


def as_steps(steps: Any, num_steps: int, *, where: str = "the store") -> np.ndarray:
    """Step numbers as int64, each in ``0..num_steps-1``; floats, strings and bools are refused.

    >>> as_steps([3, 1], 5).tolist()
    [3, 1]
    """
    try:
        arr = as_sample_ids(steps, what="steps")
    except SampleIdError as exc:
        raise StepError(str(exc)) from None
    if arr.size and (arr.min() < 0 or arr.max() >= num_steps):
        raise StepError(f"steps out of range: {where} has {num_steps} committed steps (0..{num_steps - 1}), "
                        f"got {arr.min()}..{arr.max()}")
    return arr


class SampleIndex:
    """Inverse index over ``ids`` (all steps' sample IDs concatenated) and ``ends``.

    ``ends[s]`` is the exclusive end offset of step ``s`` in ``ids``. Queries are
    vectorised: a ``searchsorted`` into the IDs sorted once, no loop over steps.

    >>> idx = SampleIndex(np.array([5, 7, 7, 9]), np.array([2, 4]))
    >>> idx.batches_containing([7]).tolist(), idx.batches_containing([9, 11]).tolist()
    ([0, 1], [1])
    """

    def __init__(self, ids: np.ndarray, ends: np.ndarray,
                 presorted: tuple[np.ndarray, np.ndarray, int] | None = None) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        counts = np.diff(self.ends, prepend=0)
        n0 = 0
        base_ids = base_steps = np.zeros(0, dtype=np.int64)
        if presorted is not None:  # (sorted_ids, sorted_steps) of the first n0 steps
            base_ids, base_steps, n0 = presorted
        m0 = int(self.ends[n0 - 1]) if n0 else 0
        if len(base_ids) != m0:
            raise ValueError(f"presorted index covers {len(base_ids)} samples, steps 0..{n0 - 1} hold {m0}")
        # Only the tail (steps the presorted part does not cover) is sorted, then merged in.
        tail_steps = np.repeat(np.arange(n0, len(self.ends), dtype=np.int64), counts[n0:])
        order = np.argsort(self.ids[m0:], kind="stable")
        tail_ids, tail_steps = self.ids[m0:][order], tail_steps[order]
        if m0 == 0:
            self.sorted_ids, self.sorted_steps = tail_ids, tail_steps
        else:
            at = np.searchsorted(base_ids, tail_ids, side="right")
            self.sorted_ids = np.insert(base_ids, at, tail_ids)
            self.sorted_steps = np.insert(base_steps, at, tail_steps)

    @property
    def num_steps(self) -> int:
        return len(self.ends)

    def _ranges(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.unique(query)
        return np.searchsorted(self.sorted_ids, q, "left"), np.searchsorted(self.sorted_ids, q, "right")

    def contains(self, query: Any) -> np.ndarray:
        """Boolean mask: which of ``query`` appear in any step."""
        q = as_sample_ids(query)
        lo = np.searchsorted(self.sorted_ids, q, "left")
        hi = np.searchsorted(self.sorted_ids, q, "right")
        return hi > lo

    def batches_containing(self, query: Any) -> np.ndarray:
        """Sorted, unique steps in which any of ``query`` was used."""
        lo, hi = self._ranges(as_sample_ids(query))
        lengths = hi - lo
        total = int(lengths.sum())
        if total == 0:
            return np.zeros(0, dtype=np.int64)
        # All positions lo[i]..hi[i]-1, concatenated, without a Python loop.
        starts = np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
        pos = starts + np.arange(total, dtype=np.int64)
        return np.unique(self.sorted_steps[pos])

    def samples_in(self, step: int) -> np.ndarray:
        start = 0 if step == 0 else int(self.ends[step - 1])
        return self.ids[start : int(self.ends[step])]

    def samples_in_steps(self, steps: np.ndarray) -> np.ndarray:
        """All sample IDs (with repeats) of the given steps, concatenated."""
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size == 0:
            return np.zeros(0, dtype=np.int64)
        starts = np.where(steps == 0, 0, self.ends[np.maximum(steps - 1, 0)])
        lengths = self.ends[steps] - starts
        pos = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        return self.ids[pos]


def _pair_sums(ids: np.ndarray, steps: np.ndarray) -> tuple[int, int]:
    """Order-free fingerprint of (id, step) pairs: Σ id and Σ id·(step + 1), modulo 2**64."""
    u = ids.astype(np.int64).view(np.uint64)
    return int(u.sum(dtype=np.uint64)), int((u * (steps.astype(np.uint64) + np.uint64(1))).sum(dtype=np.uint64))


#: Sample IDs an open would have to sort below which a close does not write the sorted index: sorting
#: 128k IDs takes 13 ms (2-core CPU), while writing the index cost 43 ms of the digits CNN's close
#: (32k IDs: it reads the step table back, sorts, writes two arrays and a record).
PERSIST_MIN_SAMPLES = 1 << 17


class StepTable:
    """The committed steps' statuses and sample index, loaded once per step count.

    The sorted index of earlier steps comes from this table's previous load or
    from the copy persisted in the store, so only newer steps are sorted.
    """

    def __init__(self, root: zarr.Group, where: str, *, strict: bool = True, row_map: bool = False) -> None:
        self._root = root
        self._where = where
        self._strict = strict  # the store promises every committed chunk exists (written since 0.2)
        self._row_map = row_map  # format 2: steps/row says which layer row holds each step
        self.index: SampleIndex | None = None
        self.status: np.ndarray | None = None
        self.rows: np.ndarray | None = None
        self._generation = 0

    @property
    def generation(self) -> int:
        """The store's generation this table was loaded at; setting another one reloads it."""
        return self._generation

    @generation.setter
    def generation(self, value: int) -> None:
        if value != self._generation:  # a purge or rollback changed committed data in place
            self._generation = value
            self.invalidate()

    def load(self, n: int, m: int) -> tuple[SampleIndex, np.ndarray]:
        """Index and statuses of the first ``n`` steps (``m`` sample IDs)."""
        if self.index is not None and self.index.num_steps == n and self.status is not None:
            return self.index, self.status
        root = self._root
        # Chunks first: counts come from the store, and a forged one must fail before it sizes a read.
        self._check_chunks(n, m)
        try:
            ends = root[paths.SAMPLE_END][:n] if n else np.zeros(0, np.int64)
            ids = root[paths.SAMPLE_IDS][:m] if m else np.zeros(0, np.int64)
            status = root[paths.STATUS][:n] if n else np.zeros(0, np.uint8)
            rows = (root[paths.ROWS][:n] if n else np.zeros(0, np.int64)) if self._row_map else np.arange(n)
        except Exception as exc:  # checksum or codec failure in the step table
            raise CorruptStoreError(f"store {self._where}: the step table or sample index cannot be read: "
                                    f"{exc}") from exc
        if n and (ends[-1] != m or (np.diff(ends, prepend=0) < 0).any()):
            raise CorruptStoreError(f"store {self._where}: step table does not match {m} indexed samples")
        if (status > STATUS_NONFINITE).any():
            raise CorruptStoreError(f"store {self._where}: unknown step status codes {np.unique(status)}")
        if n and (rows[0] < 0 or (np.diff(rows) <= 0).any()):
            raise CorruptStoreError(f"store {self._where}: {paths.ROWS} is not strictly increasing from 0 "
                                    "(steps would read other steps' rows); restore it from a backup")
        self.index = SampleIndex(ids, ends, presorted=self._presorted(n, ends, ids))
        self.status = status
        self.rows = rows
        return self.index, self.status

    def _check_chunks(self, n: int, m: int) -> None:
        """A missing chunk of the step table reads as zeros: refuse it instead (statuses of all-skipped
        runs may legitimately be absent in stores written before 0.2)."""
        needed = [(paths.SAMPLE_END, n), (paths.SAMPLE_IDS, m)] + ([(paths.STATUS, n)] if self._strict else [])
        needed += [(paths.ROWS, n)] if self._row_map else []
        for path, count in needed:
            require_chunks(self._root[path], count, self._where)

    def invalidate(self) -> None:
        self.index = self.status = self.rows = None

    def status_unchanged(self) -> bool:
        """Whether the statuses on disk of the loaded steps are still the loaded ones (nothing loaded:
        True). A purge writes them before it zeroes any row, so a reader comparing them after it
        read rows knows whether some of those rows may already have been zeroed."""
        n = 0 if self.status is None else len(self.status)
        return n == 0 or bool(np.array_equal(self._root[paths.STATUS][:n], self.status))

    def forget_persisted(self) -> None:
        """Mark the persisted sorted index as covering nothing (before it is rewritten)."""
        INDEX_RECORD.write(self._root, 0, 0)

    def _presorted(self, n: int, ends: np.ndarray, primary: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
        if self.index is not None and self.index.num_steps <= n:
            return self.index.sorted_ids, self.index.sorted_steps, self.index.num_steps
        record = INDEX_RECORD.read(self._root)
        if record is None or record[0] == 0 or record[0] > n or record[1] != int(ends[record[0] - 1]):
            return None
        try:
            n0, m0 = record
            ids, steps = self._root[paths.SORTED_IDS][:m0], self._root[paths.SORTED_STEPS][:m0]
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt from the sample IDs, the source of truth
            return None
        # A cache is trusted only if it is what it claims (a missing chunk reads as zeros): sorted,
        # each step's sample count, and the same (id, step) pairs as the primary data — compared by
        # two wrapping sums, O(samples) where rebuilding sorts.
        counts = np.diff(ends[:n0], prepend=0)
        if m0 and ((np.diff(ids) < 0).any() or steps.min() < 0 or steps.max() >= n0
                   or not np.array_equal(np.bincount(steps, minlength=n0), counts)
                   or _pair_sums(ids, steps) != _pair_sums(primary[:m0], np.repeat(np.arange(n0), counts))):
            return None
        return ids, steps, n0

    def persist(self, n: int, m: int, *, force: bool = False) -> None:
        """Write the sorted index for the next open, when the part it lacks has grown past a quarter
        of it (amortised O(samples), not a rewrite per recording) and past ``PERSIST_MIN_SAMPLES``."""
        record = INDEX_RECORD.read(self._root) or (0, 0)
        if n == 0 or (not force and (m - record[1] <= record[1] // 4 or m - record[1] < PERSIST_MIN_SAMPLES)):
            return
        index, _ = self.load(n, m)
        size = len(index.sorted_ids)
        for path, values in ((paths.SORTED_IDS, index.sorted_ids), (paths.SORTED_STEPS, index.sorted_steps)):
            arr = self._root[path]
            if arr.shape[0] < size:
                arr.resize((size,))
            arr[:size] = values
        INDEX_RECORD.write(self._root, index.num_steps, size)
