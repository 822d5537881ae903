"""``dense``: keep = 1, every entry in order; no positions are stored."""

from __future__ import annotations

import numpy as np

__all__ = ["Dense"]


class Dense:
    name = "dense"
    stored = False
    shuffle = "noshuffle"
    blocksize = 0

    def width(self, numel: int, k: int) -> int:
        return 0

    def dtype(self, numel: int) -> np.dtype:
        return np.dtype("int64")

    def encode(self, positions: np.ndarray | None, numel: int) -> None:
        return None

    def check(self, rows: np.ndarray, numel: int, k: int) -> None:
        return None

    def decode(self, rows: np.ndarray, numel: int, k: int) -> np.ndarray:
        return np.broadcast_to(np.arange(k, dtype=np.int64), (len(rows), k))
