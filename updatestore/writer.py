"""Background writer: encodes pruned rows, buffers a block of steps, writes it, commits.

Commit protocol: a block's chunks are written first (every layer, then the
step and sample arrays), and only then is the commit record ``steps`` attrs
(``num_steps``, ``num_samples``) rewritten — one small atomic JSON write.
Readers trust the commit record, so a crash mid-block never shows a half step.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from .errors import WriterError
from .layout import LayerSpec, STATUS_RECORDED, write_counts

__all__ = ["StepRecord", "BlockWriter"]


@dataclass
class StepRecord:
    """One optimizer step, as the recorder hands it over (already on the host)."""

    status: int
    ids: np.ndarray
    # Per layer (same order as the store's specs): stored-dtype values and the
    # encoded positions row (bitmap bytes or gaps; None for dense layers).
    # None when the status stores no update.
    rows: list[tuple[np.ndarray, np.ndarray | None]] | None = None


_FLUSH = object()
_STOP = object()


class BlockWriter:
    """Owns the write path of one store; thread-safe ``put``/``flush``/``close``.

    ``put`` blocks when ``max_queue`` steps wait (back-pressure). An exception in
    the thread is re-raised as ``WriterError`` by the next ``put``/``flush``/``close``.
    """

    def __init__(self, root, specs: list[LayerSpec], block: int, num_steps: int,
                 num_samples: int, *, max_queue: int = 8) -> None:
        self._root = root
        self._specs = specs
        self._block = block
        self._arrays = [
            (root[f"{s.path}/values"], root[f"{s.path}/positions"] if s.positions != "dense" else None)
            for s in specs
        ]
        self._status_arr = root["steps/status"]
        self._end_arr = root["steps/sample_end"]
        self._ids_arr = root["samples/ids"]
        self.committed_steps = num_steps
        self.committed_samples = num_samples
        self._start = (num_steps // block) * block  # first step of the buffered block
        self._n = num_steps - self._start  # rows buffered in the block
        self._vals = [np.zeros((block,) + a[0].shape[1:], dtype=a[0].dtype) for a in self._arrays]
        self._pos = [
            None if p is None else np.zeros((block,) + p.shape[1:], dtype=p.dtype) for _, p in self._arrays
        ]
        self._status = np.zeros(block, dtype=np.uint8)
        self._ends = np.zeros(block, dtype=np.int64)
        self._pending_ids: list[np.ndarray] = []
        self._total_samples = num_samples
        if self._n:  # resuming inside a partly written block: reload its rows
            self._reload_tail()
        self._error: BaseException | None = None
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

    def close(self) -> None:
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put((_STOP, done))
            self._thread.join()
        self._check()

    def _check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise WriterError(f"the update store's background writer failed: {err!r}") from err

    # ------------------------------------------------------------ thread side
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, tuple) and item[0] in (_FLUSH, _STOP):
                try:
                    if self._error is None:
                        self._write_block()
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self._error = exc
                item[1].set()
                if item[0] is _STOP:
                    return
                continue
            if self._error is not None:
                continue  # drain: the caller sees the error on its next call
            try:
                self._add(item)
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _add(self, rec: StepRecord) -> None:
        r = self._n
        self._status[r] = rec.status
        if rec.rows is not None and rec.status == STATUS_RECORDED:
            for i, (vals, pos) in enumerate(rec.rows):
                self._vals[i][r] = vals
                if pos is not None:
                    self._pos[i][r] = pos
        else:
            # Rows of steps without a stored update are zeros (Zarr skips empty chunks).
            for i in range(len(self._specs)):
                self._vals[i][r] = 0
                if self._pos[i] is not None:
                    self._pos[i][r] = 0
        self._total_samples += len(rec.ids)
        self._ends[r] = self._total_samples
        self._pending_ids.append(rec.ids)
        self._n += 1
        if self._n == self._block:
            self._write_block()

    def _write_block(self) -> None:
        n = self._n
        a, b = self._start, self._start + n
        if b > self.committed_steps:
            self._write_rows(a, b, n)
        if n == self._block:
            self._start, self._n = b, 0

    def _write_rows(self, a: int, b: int, n: int) -> None:
        for (varr, parr), vbuf, pbuf in zip(self._arrays, self._vals, self._pos):
            if varr.shape[0] < b:
                varr.resize((b,) + varr.shape[1:])
            varr[a:b] = vbuf[:n]
            if parr is not None:
                if parr.shape[0] < b:
                    parr.resize((b,) + parr.shape[1:])
                parr[a:b] = pbuf[:n]
        c = self.committed_steps  # steps before c are already in the step arrays
        for arr, buf in ((self._status_arr, self._status), (self._end_arr, self._ends)):
            if arr.shape[0] < b:
                arr.resize((b,))
            arr[c:b] = buf[c - a : n]
        new_ids = np.concatenate(self._pending_ids) if self._pending_ids else np.zeros(0, np.int64)
        m0, m1 = self.committed_samples, self.committed_samples + len(new_ids)
        if len(new_ids):
            if self._ids_arr.shape[0] < m1:
                self._ids_arr.resize((m1,))
            self._ids_arr[m0:m1] = new_ids
        write_counts(self._root, b, m1)  # the commit point
        self.committed_steps, self.committed_samples = b, m1
        self._pending_ids = []

    def _reload_tail(self) -> None:
        a, b = self._start, self._start + self._n
        for i, (varr, parr) in enumerate(self._arrays):
            self._vals[i][: self._n] = varr[a:b]
            if parr is not None:
                self._pos[i][: self._n] = parr[a:b]
        self._status[: self._n] = self._status_arr[a:b]
        self._ends[: self._n] = self._end_arr[a:b]
