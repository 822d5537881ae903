"""The sink of a recorder under torch.distributed: the local sink, kept in step with the other ranks.

Every rank attaches, checkpoints and detaches together. Each of these first does the local
part (open the writer, write what was handed over), then the ranks agree that all of them
succeeded, and only then does rank 0 commit and note the lineage — so the commit record never
vouches for a part another rank failed to write, and a failure on one rank is an error on all.
"""

from __future__ import annotations

from typing import Any

from .._writer import StepRecord
from ..errors import OtherRankError
from .collective import all_ok, run_agreed, share

__all__ = ["CollectiveSink", "Discard"]


class Discard:
    """The local sink of a DDP rank > 0: its IDs reach rank 0 through the all-gather; nothing is written."""

    def open(self) -> None: ...
    def put(self, record: StepRecord) -> None: ...
    def stop(self) -> None: ...
    def checkpoint(self, weights: str | None) -> tuple[int, int, int]:
        return -1, -1, -1
    def close(self, weights: str | None = None) -> None: ...


class CollectiveSink:
    """Wraps a rank's local sink (a ``WriterSink``, or :class:`Discard`); ``sharded``: every rank writes
    its parts and rank 0 commits what all of them made durable."""

    def __init__(self, local: Any, group: Any, rank: int, sharded: bool) -> None:
        self.local, self._group, self._rank, self._sharded = local, group, rank, sharded

    def open(self) -> None:
        run_agreed(self.local.open, self._group, "attaching the recorder", undo=lambda _: self.local.close(None))

    def put(self, record: StepRecord) -> None:
        self.local.put(record)

    def checkpoint(self, weights: str | None) -> tuple[int, int, int]:
        # Collectives on every path: one all-reduce (every rank's rows durable), one broadcast (rank 0's result).
        error: BaseException | None = None
        try:
            if self._sharded:
                self.local.writer.flush()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the collectives
            error = exc
        counts, ok = [0, 0, 0], False
        if all_ok(error is None, self._group) and self._rank == 0:
            try:
                counts = list(self.local.writer.note_checkpoint(weights) if self._sharded
                              else self.local.checkpoint(weights))
                ok = True
            except BaseException as exc:  # noqa: BLE001
                error = exc
        shared = share([int(ok), *counts] if self._rank == 0 else None, 4, self._group)
        if error is not None:
            raise error
        if not shared[0]:
            raise OtherRankError("checkpointing the store failed on another rank (see its error); rank 0 committed nothing new")
        return shared[1], shared[2], shared[3]

    def close(self, weights: str | None = None) -> None:
        error: BaseException | None = None
        try:  # every rank writes what it holds; rank 0 commits once all of it is durable
            self.local.stop()
        except BaseException as exc:  # noqa: BLE001
            error = exc
        others_ok = all_ok(error is None, self._group)
        try:
            # rank 0 commits what every part record vouches for even if a rank failed: the records
            # say exactly what is durable
            self.local.close(weights if self._rank == 0 and others_ok else None)
        except BaseException as exc:  # noqa: BLE001
            error = error or exc
        if error is not None:
            raise error
        if not others_ok:
            raise OtherRankError("writing the store failed on another rank (see its error); "
                         "what every rank wrote durably is committed")
