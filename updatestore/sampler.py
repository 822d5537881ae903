"""Deletion-aware batching: pack each owner's samples into as few steps as possible.

Forgetting a user's data hits every step that saw one of their samples; with
plain shuffling an owner with 10 samples lands in ~10 steps per epoch. Packing
owners whole into batches (and shuffling which owners share a batch, and the
batch order, every epoch) makes that ~1 step per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .errors import ConfigError

__all__ = ["OwnerBatchSampler", "pack_owners"]


def pack_owners(owners: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches (arrays of dataset indices) with owners packed whole.

    Owners with more samples than a batch fill whole batches first; the rest
    (and every smaller owner) go, largest first with random ties, into the open
    batch with the least room that still fits them (best-fit decreasing), so an
    owner of at most ``batch_size`` samples lands in exactly one batch.
    """
    owners = np.asarray(owners)
    order = rng.permutation(len(owners))  # random order within and across owners
    _, inverse = np.unique(owners[order], return_inverse=True)
    groups = _split(order, inverse)
    batches: list[list[int]] = []
    pieces: list[np.ndarray] = []
    for grp in groups:
        full = len(grp) // batch_size
        for i in range(full):
            batches.append(grp[i * batch_size:(i + 1) * batch_size].tolist())
        if len(grp) % batch_size:
            pieces.append(grp[full * batch_size:])
    pieces_order = sorted(range(len(pieces)), key=lambda i: (-len(pieces[i]), rng.random()))
    # open[r] = indices (into ``open_batches``) of batches with exactly r free slots
    open_by_room: list[list[int]] = [[] for _ in range(batch_size + 1)]
    open_batches: list[list[int]] = []
    for i in pieces_order:
        piece = pieces[i]
        n = len(piece)
        room = next((r for r in range(n, batch_size + 1) if open_by_room[r]), None)
        if room is None:
            open_batches.append([])
            b, room = len(open_batches) - 1, batch_size
        else:
            b = open_by_room[room].pop()
        open_batches[b].extend(piece.tolist())
        left = room - n
        if left:
            open_by_room[left].append(b)
    batches.extend(open_batches)
    perm = rng.permutation(len(batches))
    return [np.asarray(batches[i], dtype=np.int64) for i in perm]


def _split(order: np.ndarray, inverse: np.ndarray) -> list[np.ndarray]:
    sort = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[sort])) + 1
    return np.split(order[sort], bounds)


class OwnerBatchSampler(Sampler[list[int]]):
    """A batch sampler that keeps each owner's samples together (see :func:`pack_owners`).

    ``owners[i]`` is the owner key (user, document, source...) of dataset item
    ``i``. Use with ``DataLoader(dataset, batch_sampler=OwnerBatchSampler(...))``;
    call ``set_epoch(e)`` each epoch (or let iteration advance it) for a new
    shuffle. Every item is yielded exactly once per epoch.

    >>> s = OwnerBatchSampler([0, 0, 1, 1, 1, 2], batch_size=3, seed=0)
    >>> sorted(sorted(b) for b in s)
    [[0, 1, 5], [2, 3, 4]]
    """

    def __init__(self, owners: Sequence[Any], batch_size: int, *, seed: int = 0) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.owners = np.asarray(owners)
        if self.owners.ndim != 1 or len(self.owners) == 0:
            raise ConfigError("owners must be a non-empty 1-D sequence: one owner key per dataset item")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._cache = (self.epoch, pack_owners(self.owners, self.batch_size, rng))
        return self._cache[1]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()
        self.epoch += 1  # the next iteration is a new epoch unless set_epoch says otherwise
        for b in batches:
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._batches())
