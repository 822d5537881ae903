"""What the framework callbacks share: finding a batch's sample IDs, ending a recording."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError, RecorderError

__all__ = ["ID_KEY", "ids_getter", "finish"]

#: The batch key (dict batches) or dataset column holding each sample's ID.
ID_KEY = "sample_id"


def _default(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        if ID_KEY not in batch:
            raise RecorderError(f"the batch is a mapping without a {ID_KEY!r} key (keys: {sorted(map(str, batch))[:8]}); "
                                f"put each sample's ID under {ID_KEY!r} or pass ids=lambda batch: ...")
        return batch[ID_KEY]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[-1]
    raise RecorderError(f"cannot find sample IDs in a batch of type {type(batch).__name__}: use a dict batch with a "
                        f"{ID_KEY!r} key, a tuple/list batch whose last element is the IDs, or pass ids=callable")


def ids_getter(ids: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """``ids`` if given (a callable batch -> IDs), else the default rule: a dict batch's ``sample_id``,
    or the last element of a tuple/list batch."""
    if ids is None:
        return _default
    if not callable(ids):
        raise ConfigError(f"ids= must be a callable taking a batch and returning its sample IDs, got {ids!r}")
    return ids


def finish(rec: Any, *, checkpoint: bool) -> dict[str, Any] | None:
    """Detach ``rec`` (committing its steps) and, with ``checkpoint``, first take its checkpoint state;
    the recorder is detached even if taking the state fails. ``None`` without a state."""
    if rec is None:
        return None
    try:
        return rec.state_dict() if checkpoint else None
    finally:
        rec.detach()
