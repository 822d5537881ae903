"""Registry of the value and position encodings, keyed by the names a store writes.

Adding a positions encoding: write one module with a class like
:class:`~updatestore._codecs.bitmap.Bitmap`, add it to ``POSITIONS`` below, and give it a kind in
the writer's step encoder (``_jit.encode_positions``, ``_blockrows.BlockRows``).
A name read from a store that is not registered is an ``UnsupportedFormatError``,
never a fallback to another decoder.
"""

from __future__ import annotations

from ..errors import UnsupportedFormatError
from .base import CorruptRowError, PositionsCodec
from .bitmap import Bitmap
from .dense import Dense
from .gaps import Gaps
from .values import VALUES, ValuesCodec

__all__ = ["CorruptRowError", "PositionsCodec", "ValuesCodec", "positions_codec", "values_codec",
           "choose_positions", "POSITIONS", "VALUES", "BITMAP_MIN_KEEP"]

POSITIONS: dict[str, PositionsCodec] = {c.name: c for c in (Dense(), Bitmap(), Gaps())}

#: Positions are bit-mapped when keep ≥ this; below it gap coding is smaller.
#: Measured with ``python -m benchmarks.storage --encodings`` on the digits CNN:
#: the two tie at keep 0.02; gaps win by 3 % at 0.01 and 13 % at 0.002, the
#: bitmap wins by 12 % at 0.1 and 44 % at 0.5 (see FORMAT.md).
BITMAP_MIN_KEEP = 0.02


def positions_codec(name: str) -> PositionsCodec:
    """The positions codec stored under ``name``.

    >>> positions_codec("gaps").name
    'gaps'
    """
    try:
        return POSITIONS[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(
            f"unknown positions encoding {name!r}; this library reads {sorted(POSITIONS)}. "
            "Upgrade updatestore to read this store"
        ) from None


def values_codec(name: str) -> ValuesCodec:
    """The values codec stored under ``name`` (``bfloat16``, ``float16``, ``float32``)."""
    try:
        return VALUES[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(
            f"unknown value dtype {name!r}; this library reads {sorted(VALUES)}"
        ) from None


def choose_positions(encoding: str, keep: float, k: int, numel: int) -> str:
    """The positions encoding of one layer (``auto`` decides by the keep ratio)."""
    if k == numel:
        return "dense"
    if encoding == "auto":
        return "bitmap" if keep >= BITMAP_MIN_KEEP else "gaps"
    positions_codec(encoding)
    return encoding
