"""The storage footprint of a store against a full amnesiac log."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from zarr.abc.store import Store
from zarr.core.sync import sync

from ._format import STATUS_RECORDED, LayerSpec, paths
from ._lock import LOCK_NAME

__all__ = ["Footprint", "measure"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Footprint:
    """Bytes on disk against a dense float32 log of the same stored steps.

    ``full_log_bytes`` = stored steps × parameters × 4 (one dense float32 Δθ per
    step, the "full amnesiac log"); ``ratio`` = ``total_bytes / full_log_bytes``.
    """

    total_bytes: int
    layer_bytes: dict[str, int]
    index_bytes: int
    full_log_bytes: int
    stored_steps: int
    kept_fraction: float
    per_layer_full: dict[str, int] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.full_log_bytes if self.full_log_bytes else float("nan")

    def to_dict(self) -> dict:
        return {
            "total_bytes": self.total_bytes,
            "layer_bytes": dict(self.layer_bytes),
            "index_bytes": self.index_bytes,
            "full_log_bytes": self.full_log_bytes,
            "stored_steps": self.stored_steps,
            "kept_fraction": self.kept_fraction,
            "ratio": self.ratio,
        }

    def __str__(self) -> str:
        lines = [
            f"update store: {_human(self.total_bytes)} on disk for {self.stored_steps} stored steps "
            f"(kept {self.kept_fraction:.2%} of entries)",
            f"full amnesiac log (dense float32): {_human(self.full_log_bytes)}",
            f"ratio: {self.ratio:.2%} of the full log ({1 / self.ratio:.1f}x smaller)"
            if self.full_log_bytes and self.total_bytes
            else "ratio: n/a (no stored steps)",
            f"sample index, step table and owner table: {_human(self.index_bytes)}",
        ]
        width = max((len(n) for n in self.layer_bytes), default=0)
        for name, nbytes in self.layer_bytes.items():
            full = self.per_layer_full.get(name, 0)
            share = f"  ({nbytes / full:.2%} of its full log)" if full else ""
            lines.append(f"  {name:<{width}}  {_human(nbytes):>10}{share}")
        return "\n".join(lines)


def measure(store: Store, specs: tuple[LayerSpec, ...], status: np.ndarray) -> Footprint:
    """Sizes from the backend (not counted as reads) against a dense float32 log of the stored steps."""

    def size(prefix: str) -> int:
        return int(sync(store.getsize_prefix(prefix)))

    layer_bytes = {s.name: size(f"{s.path}/") for s in specs}
    total = size("")
    if sync(store.exists(LOCK_NAME)):  # the writer lock is not part of the data
        total -= int(sync(store.getsize(LOCK_NAME)))
    stored = int((status == STATUS_RECORDED).sum())
    numel = sum(s.numel for s in specs)
    return Footprint(
        total_bytes=total,
        layer_bytes=layer_bytes,
        index_bytes=sum(size(f"{g}/") for g in paths.NON_LAYER_GROUPS),
        full_log_bytes=stored * numel * 4,
        stored_steps=stored,
        kept_fraction=sum(s.k for s in specs) / numel,
        per_layer_full={s.name: stored * s.numel * 4 for s in specs},
    )
