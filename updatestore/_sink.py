"""A recorder's sink: opens the store's background writer when the recorder attaches, closes it on detach."""

from __future__ import annotations

from collections.abc import Callable

from ._writer import BlockWriter, StepRecord
from .errors import RecorderError

__all__ = ["WriterSink"]


class WriterSink:
    """A recorder's sink: asks for a writer on attach (``open_writer(self)``), closes it on detach."""

    def __init__(self, open_writer: Callable[["WriterSink"], BlockWriter]) -> None:
        self._open_writer = open_writer
        self._writer: BlockWriter | None = None

    def open(self) -> None:
        self._writer = self._open_writer(self)

    def put(self, record: StepRecord) -> None:
        if self._writer is None:
            raise RecorderError("the store's writer is closed; record inside `with store.recorder(...)`")
        self._writer.put(record)

    @property
    def writer(self) -> BlockWriter:
        if self._writer is None:
            raise RecorderError("the store's writer is closed; call rec.state_dict() while the recorder is attached")
        return self._writer

    def checkpoint(self, weights: str | None) -> tuple[int, int, int]:
        return self.writer.checkpoint(weights)

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.stop()

    def close(self, weights: str | None = None) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close(weights)
