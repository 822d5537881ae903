"""Store configuration: a frozen, validated dataclass written into every store."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Union

from .errors import ConfigError

__all__ = ["StoreConfig", "VALUE_DTYPES", "POSITION_ENCODINGS", "VALUE_CODECS", "resolve_keep", "match_layers", "check_ratio",
           "kept_count"]

#: Value dtypes a store can keep its pruned updates in.
VALUE_DTYPES = ("bfloat16", "float16", "float32")
#: How the positions of kept entries are written. ``auto`` picks per layer (see FORMAT.md).
POSITION_ENCODINGS = ("auto", "bitmap", "gaps")
#: How kept values are compressed: Blosc-zstd (the default; smallest) or Blosc-lz4 (fastest).
VALUE_CODECS = ("zstd", "lz4")

KeepSpec = Union[float, Mapping[str, float]]


def check_ratio(value: Any, what: str) -> float:
    """``value`` as a float in (0, 1], or a ``ConfigError`` naming ``what``.

    >>> check_ratio(0.25, "keep")
    0.25
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number in (0, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ConfigError(
            f"{what} must be in (0, 1] (the fraction of each layer's entries kept), got {value!r}"
        )
    return value


def kept_count(keep: float, numel: int) -> int:
    """k = ceil(keep × numel), at least 1 and at most numel: the entries kept per step.

    >>> kept_count(0.1, 1000), kept_count(0.001, 10), kept_count(1.0, 7)
    (100, 1, 7)
    """
    # round() first so that 0.1 * 1000 = 100.00000000000001 does not become 101.
    return max(1, min(numel, math.ceil(round(keep * numel, 9))))


def _matches(name: str, pattern: str) -> bool:
    # PEFT-style: an exact name, a dotted suffix ("fc.weight" matches "head.fc.weight"),
    # or a shell glob ("conv*.weight").
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def match_layers(names: Sequence[str], patterns: Sequence[str] | str | None) -> list[str]:
    """Names selected by ``patterns`` (exact names, dotted suffixes or globs); ``None`` = all.

    Raises ``ConfigError`` listing the patterns when a pattern selects nothing.

    >>> match_layers(["conv.weight", "fc.weight", "fc.bias"], ["fc.*"])
    ['fc.weight', 'fc.bias']
    """
    if patterns is None:
        return list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen = [n for n in names if any(_matches(n, p) for p in patterns)]
    unused = [p for p in patterns if not any(_matches(n, p) for n in names)]
    if unused:
        raise ConfigError(
            f"layer pattern(s) {unused} match no parameter; patterns given: {list(patterns)}; "
            f"parameters are: {list(names)}"
        )
    return chosen


def resolve_keep(keep: KeepSpec, names: Sequence[str]) -> dict[str, float]:
    """Per-layer keep ratios from a float or a ``{pattern: ratio}`` mapping.

    In a mapping the first matching pattern wins; ``"*"`` gives the default.

    >>> resolve_keep({"fc.*": 0.5, "*": 0.1}, ["conv.weight", "fc.weight"])
    {'conv.weight': 0.1, 'fc.weight': 0.5}
    """
    if not isinstance(keep, Mapping):
        ratio = check_ratio(keep, "keep")
        return {n: ratio for n in names}
    ratios = {str(p): check_ratio(r, f"keep[{p!r}]") for p, r in keep.items()}
    out: dict[str, float] = {}
    used: set[str] = set()
    for name in names:
        for pattern, ratio in ratios.items():
            if _matches(name, pattern):
                out[name] = ratio
                used.add(pattern)
                break
    missing = [n for n in names if n not in out]
    if missing:
        raise ConfigError(
            f"keep patterns {list(ratios)} cover no ratio for layer(s) {missing}; "
            "add a default such as {'*': 0.1}"
        )
    unused = [p for p in ratios if p not in used]
    if unused:
        raise ConfigError(f"keep pattern(s) {unused} match no parameter; parameters are: {list(names)}")
    return out


@dataclass(frozen=True)
class StoreConfig:
    """How updates are pruned and encoded.

    Args:
        keep: fraction of each layer's entries kept per step (largest |Δθ|), or a
            mapping ``{pattern: fraction}``.
        value_dtype: ``"bfloat16"`` (default; float16 underflows on small SGD
            steps), ``"float16"`` or ``"float32"``.
        positions: ``"auto"`` (per layer, see FORMAT.md), ``"bitmap"`` or ``"gaps"``.
        buffer_bytes: how many bytes of pruned rows the writer buffers before it
            writes a block of steps; sets the steps per shard.
        clevel: zstd level inside Blosc (1-9). The default 1 compresses a row 5-8× faster
            than level 5 for ~5 % more bytes (measured on keep-0.1 bf16 rows of a 4.2M-entry
            layer: 6.4 vs 34.5 ms a step, 0.707 vs 0.672 MB); the writer's compression competes
            with training for the same cores, so the cheaper level is the default.
        codec: how kept values are compressed (positions are always zstd). ``"zstd"`` (default):
            the smallest store. ``"lz4"`` (bit-shuffled): values decompress 3× faster and compress 3×
            faster on the writer thread, for a larger store — +10 % at keep 0.1 on the 11M CNN
            (3.72 vs 3.37 % of the full log), about +40 % at keep 0.01 or 1.0, where values dominate
            (``python -m benchmarks.storage``; read-path figures in ``benchmarks/readpath.py``).

    >>> StoreConfig(keep=0.05).value_dtype
    'bfloat16'
    """

    keep: KeepSpec = 0.1
    value_dtype: str = "bfloat16"
    positions: str = "auto"
    buffer_bytes: int = 64 * 2**20
    clevel: int = 1
    codec: str = "zstd"
    _extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.keep, Mapping):
            for p, r in self.keep.items():
                check_ratio(r, f"keep[{p!r}]")
            object.__setattr__(self, "keep", dict(self.keep))
        else:
            object.__setattr__(self, "keep", check_ratio(self.keep, "keep"))
        if self.value_dtype not in VALUE_DTYPES:
            raise ConfigError(f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}")
        if self.positions not in POSITION_ENCODINGS:
            raise ConfigError(f"positions must be one of {POSITION_ENCODINGS}, got {self.positions!r}")
        if not isinstance(self.buffer_bytes, int) or self.buffer_bytes < 2**16:
            raise ConfigError(f"buffer_bytes must be an int >= 65536, got {self.buffer_bytes!r}")
        if not isinstance(self.clevel, int) or not 1 <= self.clevel <= 9:
            raise ConfigError(f"clevel must be an int in 1..9, got {self.clevel!r}")
        if self.codec not in VALUE_CODECS:
            raise ConfigError(f"codec must be one of {VALUE_CODECS}, got {self.codec!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StoreConfig":
        """Inverse of ``to_dict``; unknown keys (from a newer version) warn and are kept aside."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"store config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if not f.name.startswith("_")}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            warnings.warn(
                f"store config has keys this version does not know, ignored: {sorted(extra)}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known}, _extra=extra)
