"""The interface every positions codec implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["PositionsCodec", "CorruptRowError"]


class CorruptRowError(ValueError):
    """Decoded positions are not a valid row (wrong count, out of range, repeated)."""


class PositionsCodec(Protocol):
    """Where a row's kept entries are: flat indices into the parameter, sorted.

    ``stored`` is False for a codec that writes no positions array (dense).
    """

    name: str
    stored: bool
    shuffle: str  # Blosc shuffle for the positions array
    blocksize: int  # Blosc block size in bytes (0: Blosc's choice)

    def width(self, numel: int, k: int) -> int:
        """Elements per stored row."""

    def dtype(self, numel: int) -> np.dtype:
        """Element dtype of the stored rows."""

    def encode(self, positions: np.ndarray, numel: int) -> np.ndarray | None:
        """One step's sorted positions (1-D int64) → one stored row (plain numpy: the writer
        thread runs it, and torch ops there would contend with training for the CPU)."""

    def check(self, rows: np.ndarray, numel: int, k: int) -> None:
        """``CorruptRowError`` unless every stored row decodes to k sorted positions below numel."""

    def decode(self, rows: np.ndarray, numel: int, k: int) -> np.ndarray:
        """Stored rows ``(n, width)`` → sorted positions ``(n, k)`` int64; ``CorruptRowError`` if invalid."""
