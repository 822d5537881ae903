"""``gaps``: sorted positions delta-coded along the row; column 0 is absolute.

Unsigned, 16-bit when the layer has at most 65 536 entries, else 32-bit.
"""

from __future__ import annotations

import numpy as np

from .base import CorruptRowError

__all__ = ["Gaps", "gap_dtype"]


def gap_dtype(numel: int) -> np.dtype:
    return np.dtype("uint16") if numel <= 2**16 else np.dtype("uint32")


class Gaps:
    name = "gaps"
    stored = True
    shuffle = "shuffle"
    blocksize = 0

    def width(self, numel: int, k: int) -> int:
        return k

    def dtype(self, numel: int) -> np.dtype:
        return gap_dtype(numel)

    def encode(self, positions: np.ndarray, numel: int) -> np.ndarray:
        return np.diff(positions, prepend=0).astype(gap_dtype(numel))

    def check(self, rows: np.ndarray, numel: int, k: int) -> None:
        """Positions (running sums) stay below numel and never repeat (no zero gap after column 0)."""
        if rows.size and (rows.sum(axis=1, dtype=np.int64).max() >= numel
                          or (rows.shape[1] > 1 and not rows[:, 1:].all())):
            raise CorruptRowError("gap-coded positions are out of range or repeat an entry")

    def decode(self, rows: np.ndarray, numel: int, k: int) -> np.ndarray:
        self.check(rows, numel, k)
        return np.cumsum(rows, axis=1, dtype=np.int64)
