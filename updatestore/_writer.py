"""Background writer: encodes pruned rows off the training thread, buffers a block of steps, commits.

Commit protocol: a block's chunks are written first (every layer, then the step and sample arrays),
and only then is the commit record (``steps`` attributes: ``num_steps``, ``num_samples``) rewritten —
one small atomic JSON write. Readers trust the commit record, so a crash mid-block never shows a half
step. In format 2 every commit closes its shard (the next step starts the next shard and ``steps/row``
says where each step went), so each shard is written once however often the loss window commits; a
format 1 store keeps row = step and rewrites a partial shard.
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from ._codecs import positions_codec, values_codec
from ._format import (COUNTS, OWNER_COUNT, dense_array, erase_beyond, part_record, resize_all, STATUS_NONFINITE, STATUS_RECORDED,
                      STATUS_SKIPPED, LayerSpec, paths)
from ._backend import set_durable
from ._blockrows import BlockRows, flatten
from ._pacing import GROW_SHARDS, ahead as _ahead, lower_priority as _lower_priority, queue_steps
from ._format.shards import ShardLayout, write_shards
from ._lineage import append_event
from .errors import ConfigError, WriterError

__all__ = ["StepRecord", "BlockWriter", "check_commit_seconds"]


@dataclass
class StepRecord:
    """One optimizer step as the recorder hands it over.

    ``rows`` holds, per layer in the store's order, the pruned ``(values, positions)`` tensors on the
    parameters' device (positions ``None`` for a dense layer), never written to again by the recorder;
    ``None`` when the status stores no update. ``flat``, when given instead, holds the same rows as two
    host arrays: every layer's kept values (float32) and every sparse layer's positions (int64), in the
    store's layer order (what ``BlockRows.encode`` takes; the recorder's fused CPU path makes them).
    """

    status: int
    ids: np.ndarray
    rows: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    #: a CUDA event (anything with ``query()``) that completes when ``rows`` are written; ``None``: now
    ready: Any = None
    flat: tuple[np.ndarray, np.ndarray] | None = None


def _wait(event: Any) -> None:
    """Wait, on the writer's thread, for the rows' device-to-host copies: polled, not ``synchronize()``,
    which ``torch.cuda.set_sync_debug_mode`` would report; it costs at most one sleep of latency."""
    delay = 1e-5
    while event is not None and not event.query():
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)


def check_commit_seconds(value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ConfigError(f"commit_seconds must be a positive number of seconds or None, got {value!r}")


_FLUSH = object()
_STOP = object()

class BlockWriter:
    """Owns the write path of one store; thread-safe ``put``/``flush``/``close``.

    ``put`` blocks when ``max_queue`` steps wait (back-pressure; by default as many steps as
    ``QUEUE_BYTES`` of pruned rows hold, 8 to one block). An exception in
    the thread is re-raised as ``WriterError`` by the next ``put``/``flush``/``close``.
    A recorded step whose kept values are all zero (the optimizer changed nothing,
    e.g. AMP skipped it) is stored as skipped; one with NaN or infinity is stored as
    non-finite (indexed, no update) with a warning naming the step.

    Besides full blocks, the writer commits whenever ``commit_seconds`` have passed
    since its last commit and steps are waiting (the loss window of a crash).

    In a sharded store (``part=(rank, world)``) the writer writes only this rank's parts
    (``specs``) and, after them, its part record; rank 0's writer also writes the step table
    and commits ``min`` over every rank's part record (:meth:`recommit`), so a committed step
    is complete in every part. There the recorder decides each step's status for all ranks.
    """

    def __init__(self, root: zarr.Group, specs: list[LayerSpec], block: int, value_dtype: str, num_steps: int,
                 num_samples: int, *, row_map: bool = False, rows: int | None = None, where: str = "",
                 max_queue: int | None = None, commit_seconds: float | None = 5.0, fsync: bool = False,
                 on_close: Callable[["BlockWriter"], None] | None = None,
                 part: tuple[int, int] | None = None) -> None:
        self._root = root
        self._part = part
        self.owner = part is None or part[0] == 0  # writes the step table, sample IDs and commit record
        self._commit_lock = threading.Lock()
        self._layouts: dict[str, ShardLayout] = {}
        if fsync and root.store.unsynced is None:  # on: each record is fsynced after what it vouches for
            set_durable(root.store, True)  # (CountingStore.set); already on for an fsync=True store
        self._where = where
        if row_map:  # erase an interrupted writer's uncommitted rows first: the handles below cache shapes
            rows = num_steps if rows is None else rows
            erase_beyond(root, specs, num_steps, num_samples, rows)
        self._commit_seconds = commit_seconds
        self._last_commit = time.monotonic()
        self._specs = specs
        self._block = block
        self._values = values_codec(value_dtype)
        self._codecs = [positions_codec(s.positions) for s in specs]
        self._arrays = [(dense_array(root, paths.values(s.name)), dense_array(root, paths.positions(s.name)) if c.stored else None)
                        for s, c in zip(specs, self._codecs)]
        self._status_arr = dense_array(root, paths.STATUS)
        self._end_arr = dense_array(root, paths.SAMPLE_END)
        self._ids_arr = dense_array(root, paths.SAMPLE_IDS)
        self._on_close = on_close
        self.committed_steps = num_steps
        self.committed_samples = num_samples
        self._written_steps, self._written_samples = num_steps, num_samples  # in the arrays, maybe not committed
        if part is not None:  # rows past the commit (an interrupted run's) are not vouched for by this rank
            part_record(part[0]).write(root, num_steps)
        # Format 2 (row map): every commit closes its shard and the next step starts a new one, so
        # a shard is written once however often the loss window commits (format 1 rewrote it).
        self._row_map = row_map
        self._rows_arr = dense_array(root, paths.ROWS) if row_map else None
        self._buf = BlockRows(specs, block, self._values, self._arrays)
        self._status = np.zeros(block, dtype=np.uint8)
        self._ends = np.zeros(block, dtype=np.int64)
        self._pending_ids: list[np.ndarray] = []
        self._total_samples = num_samples
        if row_map:
            self._start, self._n, self._row0 = num_steps, 0, -(-rows // block) * block  # a new shard
        else:
            self._start = (num_steps // block) * block  # first step of the buffered block
            self._n = num_steps - self._start  # rows buffered in the block
            self._row0 = self._start  # format 1: row = step
            if self._n:  # resuming inside a partly written block: reload its rows
                self._reload_tail()
        self._rows_end = 0  # one past the last layer row written
        self._grown: dict[str, tuple[zarr.Array, str, int]] = {}  # grown ahead: (array, of what, length before)
        self._error: BaseException | None = None
        self._waited = False  # a flush or close waits on the write in progress
        self._last = False  # the write in progress is the last: arrays grow to exactly what it needs
        if max_queue is None:
            max_queue = queue_steps(specs, block)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="updatestore-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ caller side
    def put(self, record: StepRecord) -> None:
        self._check()
        self._queue.put(record)

    def flush(self) -> None:
        """Write and commit every step handed over so far."""
        self._check()
        done = threading.Event()
        self._queue.put((_FLUSH, done))
        while not done.wait(0.05):
            if not self._thread.is_alive():
                break
        self._check()

    def checkpoint(self, weights: str | None) -> tuple[int, int, int]:
        """Commit every step handed over so far and note the model's fingerprint there; returns the
        committed steps, samples and owner-table entries."""
        self.flush()
        return self.note_checkpoint(weights)

    def note_checkpoint(self, weights: str | None) -> tuple[int, int, int]:
        """Note the model's fingerprint at the committed step (after :meth:`flush`; sharded: after every
        rank flushed, and on rank 0 only); returns the committed steps, samples and owner-table entries."""
        if self._part is not None:
            self.recommit()
        append_event(self._root, self._where, "checkpoint", step=self.committed_steps,
                     samples=self.committed_samples, weights=weights)
        return self.committed_steps, self.committed_samples, (OWNER_COUNT.read(self._root) or (0,))[0]

    def close(self, weights: str | None = None) -> None:
        """Commit everything and stop; ``weights`` (the model's fingerprint now) goes into the lineage."""
        try:
            self.stop()
            if self._part is not None and self.owner:
                self.recommit()
            if weights is not None and self.owner:
                append_event(self._root, self._where, "close", step=self.committed_steps,
                             samples=self.committed_samples, weights=weights)
        finally:
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close(self)

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise WriterError(f"the update store's background writer failed: {err!r}") from err

    # ------------------------------------------------------------ thread side
    def _run(self) -> None:
        _lower_priority()
        while True:
            try:
                item = self._queue.get(timeout=self._commit_seconds)
            except queue.Empty:  # training paused or slow: commit what waits, within the loss window
                self._commit_if_due()
                continue
            if isinstance(item, tuple) and item[0] in (_FLUSH, _STOP):
                try:
                    if self._error is None:
                        self._waited = True  # the caller waits for this write: compress on every core
                        self._last = item[0] is _STOP
                        self._write_block()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc
                finally:
                    self._waited = self._last = False
                item[1].set()
                if item[0] is _STOP:
                    return
                continue
            if self._error is not None:
                continue  # drain: the caller sees the error on its next call
            try:
                self._add(item)
                self._commit_if_due()
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _commit_if_due(self) -> None:
        if (self._error is None and self._part is not None and self.owner and self._commit_seconds is not None
                and self.committed_steps < self._written_steps):  # other ranks may have caught up since
            try:
                self.recommit()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
        if (self._error is None and self._commit_seconds is not None and self._n
                and self._start + self._n > self._written_steps
                and time.monotonic() - self._last_commit >= self._commit_seconds):
            try:
                self._write_block()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc

    def _add(self, rec: StepRecord) -> None:
        r = self._n
        status = rec.status
        if status == STATUS_RECORDED:
            _wait(rec.ready)
            # Host arrays, then numpy only: torch ops on this thread would compete with the
            # training thread's (measured: recording 1.8× slower on the digits CNN with 2 cores).
            finite, nonzero = self._buf.encode(r, *(rec.flat if rec.flat is not None else flatten(rec.rows)))
            if self._part is None:  # decided here (a sharded store's status comes agreed across ranks)
                # The kept entries are each layer's largest |Δ|: all zero means nothing changed.
                status = STATUS_NONFINITE if not finite else STATUS_RECORDED if nonzero else STATUS_SKIPPED
        self._status[r] = status
        if status == STATUS_NONFINITE and self.owner:
            warnings.warn(f"step {self._start + r} of store {self._where} changed the parameters by NaN or "
                          "infinity (a diverged step): its samples are indexed, its update is not stored and "
                          "cannot be subtracted", RuntimeWarning, stacklevel=1)
        if status != STATUS_RECORDED:
            self._buf.clear(r)  # rows of steps without a stored update are zeros (Zarr skips empty chunks)
        self._total_samples += len(rec.ids)
        self._ends[r] = self._total_samples
        self._pending_ids.append(rec.ids)
        self._n += 1
        if self._n == self._block:
            self._write_block()

    def _write_block(self) -> None:
        n = self._n
        a, b = self._start, self._start + n
        if b > self._written_steps:
            self._write_rows(a, b, n)
        if n == self._block or (self._row_map and n):
            self._start, self._n = b, 0
            self._row0 = -(-(self._row0 + n) // self._block) * self._block

    def _grow(self, grow: list, arr: zarr.Array, need: int, unit: int, what: str) -> None:
        """Grow ``arr`` to hold ``need`` rows, ahead to a multiple of ``unit`` unless this is the last
        write (growing ahead, then shrinking back at close, rewrote each zarr.json twice)."""
        if arr.shape[0] < need:
            grow.append((arr, (need if self._last else _ahead(need, unit),) + arr.shape[1:]))
            self._grown.setdefault(arr.path, (arr, what, arr.shape[0]))

    def _write_rows(self, a: int, b: int, n: int) -> None:
        r0, r1 = self._row0, self._row0 + n
        self._rows_end = max(self._rows_end, r1)
        new_ids = np.concatenate(self._pending_ids) if self._pending_ids else np.zeros(0, np.int64)
        m0, m1 = self._written_samples, self._written_samples + len(new_ids)
        shards = []  # every write starts a shard (format 2: each commit a new one; 1 and 3: the block's)
        grow: list = []  # every array this write grows, resized at once (uncommitted until COUNTS is written)
        for (varr, parr), vbuf, pbuf in zip(self._arrays, self._buf.values, self._buf.positions):
            for arr, buf in ((varr, vbuf), (parr, pbuf)):
                if arr is not None:
                    self._grow(grow, arr, r1, self._block * GROW_SHARDS, "rows")
                    shards.append((self._layout(arr), r0, buf[:n]))
        vectors = [(self._status_arr, self._status), (self._end_arr, self._ends)]
        if self._rows_arr is not None:
            vectors.append((self._rows_arr, np.arange(r0, r1, dtype=np.int64)))
        if self.owner:
            for arr, _ in vectors:
                self._grow(grow, arr, b, arr.chunks[0], "steps")
            if len(new_ids):
                self._grow(grow, self._ids_arr, m1, self._ids_arr.chunks[0], "samples")
        resize_all(grow)
        write_shards(self._root.store, shards, parallel=self._waited)  # a flush or close waits: every core
        if not self.owner:  # a rank > 0 of a sharded store: its parts are durable up to b
            part_record(self._part[0]).write(self._root, b)
            self._written_steps = self.committed_steps = b
            self._last_commit = time.monotonic()
            self._pending_ids = []
            return
        c = self._written_steps  # steps before c are already in the step arrays
        for arr, buf in vectors:
            arr[c:b] = buf[c - a : n]
        if len(new_ids):
            self._ids_arr[m0:m1] = new_ids
        self._written_steps, self._written_samples = b, m1
        self._pending_ids = []
        self._last_commit = time.monotonic()
        if self._part is None:
            COUNTS.write(self._root, b, m1)  # the commit point
            self.committed_steps, self.committed_samples = b, m1
        else:
            part_record(0).write(self._root, b)
            self.recommit()

    def _layout(self, arr: zarr.Array) -> ShardLayout:
        lay = self._layouts.get(arr.path)
        if lay is None:
            lay = self._layouts[arr.path] = ShardLayout.of(arr)
        return lay

    def recommit(self) -> None:
        """Rank 0 of a sharded store: commit every step that every rank's part record vouches for.

        Called after each block and, on checkpoint and close, after every rank has flushed. Never
        moves the commit back (a reader may have seen it).
        """
        with self._commit_lock:
            durable = [self._written_steps]
            for rank in range(1, self._part[1]):
                got = part_record(rank).read(self._root)
                durable.append(got[0] if got is not None else self.committed_steps)
            n = min(durable)
            if n <= self.committed_steps:
                return
            m = int(self._end_arr[n - 1])
            COUNTS.write(self._root, n, m)  # the commit point
            self.committed_steps, self.committed_samples = n, m

    def stop(self) -> None:
        """Write everything handed over and stop the thread (``close`` then only records and reports)."""
        if self._thread.is_alive():
            self._queue.put((_STOP, threading.Event()))
            self._thread.join()
        self._check()
        # Arrays grown ahead shrink back to what was written (not below their length before): a closed
        # store's arrays hold exactly its rows. Nothing was written past that, so there is nothing to
        # delete (zarr would try every shard of the cut: 84 ms at the digits CNN's close).
        ends = {"rows": self._rows_end, "steps": self._written_steps, "samples": self._written_samples}
        cut = [(a, (max(ends[w], n),) + a.shape[1:]) for a, w, n in self._grown.values()]
        resize_all([(a, shape) for a, shape in cut if a.shape[0] > shape[0]], delete_outside=False)
        self._grown = {}

    def _reload_tail(self) -> None:
        a, b = self._start, self._start + self._n
        for i, (varr, parr) in enumerate(self._arrays):
            self._buf.values[i][: self._n] = varr[a:b]
            if parr is not None:
                self._buf.positions[i][: self._n] = parr[a:b]
        self._status[: self._n] = self._status_arr[a:b]
        self._ends[: self._n] = self._end_arr[a:b]
