"""The lineage record: the weights' fingerprint at each checkpoint and close, and each rollback.

Unlearning checks a model against it (a model the store never saw is refused), and
``updatestore info`` shows it as the store's history.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import zarr

from ._format import LINEAGE
from .errors import CorruptStoreError

__all__ = ["read_events", "append_event"]


def read_events(root: zarr.Group, where: str) -> list[dict[str, Any]]:
    """Every event, oldest first (empty for a store written before 0.2)."""
    return LINEAGE.read_list(root, CorruptStoreError(f"store {where}: the lineage record (lineage/zarr.json) "
                                                     "is damaged"))


def append_event(root: zarr.Group, where: str, event: str, **fields: Any) -> None:
    events = read_events(root, where)
    events.append({"event": event, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   **fields})
    LINEAGE.write(root, events)  # one atomic write

