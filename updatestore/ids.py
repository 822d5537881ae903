"""Stable sample IDs for any map-style ``Dataset``: ``WithIds`` adds each sample's ID to what it returns.

A sample ID must name the same record in every run and after the dataset changes, so
use a key the data already has (a database primary key, a document ID, a hash of the
file path) — ``ids=`` — rather than the position, which is stable only while the
dataset's content and order are fixed. For an ``IterableDataset``, yield the key with
each sample yourself (e.g. ``yield x, y, record["id"]``): there is no index to map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._index import as_sample_ids
from .errors import ConfigError, SampleIdError

__all__ = ["WithIds"]


class WithIds:
    """``dataset`` whose items carry their sample ID: a tuple/list item gets it appended (the
    last element, as ``rec.batch`` callers and the Lightning callback expect), a dict item gets
    it under ``key``, any other item becomes ``(item, id)``.

    ``ids``: one integer key per item (unique); default: the item's position.

    >>> ds = WithIds([(0.5, 1), (0.7, 0)], ids=[1042, 977])
    >>> ds[1]
    (0.7, 0, 977)
    >>> WithIds([{"x": 3}])[0]
    {'x': 3, 'sample_id': 0}
    """

    def __init__(self, dataset: Any, ids: Sequence[int] | np.ndarray | None = None, *, key: str = "sample_id") -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(f"WithIds needs a map-style dataset (__getitem__ and __len__), got "
                              f"{type(dataset).__name__}; an iterable dataset should yield its keys itself")
        n = len(dataset)
        if ids is None:
            self._ids = np.arange(n, dtype=np.int64)
        else:
            self._ids = as_sample_ids(ids, what="WithIds ids")
            if self._ids.ndim != 1 or self._ids.size != n:
                raise SampleIdError(f"WithIds: {self._ids.size} ids for a dataset of {n} items; give one per item")
            if np.unique(self._ids).size != n:
                raise SampleIdError("WithIds: ids repeat; forgetting one sample would forget every sample "
                                    "sharing its ID. Give each item its own key")
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self._ids)

    def id_of(self, index: int) -> int:
        """The sample ID of item ``index``."""
        return int(self._ids[index])

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        sid = int(self._ids[index])
        if isinstance(item, Mapping):
            return {**item, self.key: sid}
        if isinstance(item, (tuple, list)):
            return (*item, sid)
        return item, sid
