"""What an unlearning call did, in numbers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["UnlearnReport"]


@dataclass
class UnlearnReport:
    """The outcome of :func:`unlearn.amnesiac`.

    ``steps_hit`` are the steps whose stored updates were (or, with
    ``dry_run``, would be) subtracted; ``collateral`` counts the other samples
    that shared those steps — their contribution is removed too.
    """

    method: str
    requested: int
    found: int
    unknown: np.ndarray
    steps_hit: np.ndarray
    steps_total: int
    steps_without_update: int
    collateral: int
    bytes_read: int
    seconds: float
    dry_run: bool
    applied: bool
    device: str
    keep: dict[str, float] = field(default_factory=dict)
    steps_already_subtracted: int = 0
    steps_unavailable: int = 0
    already_forgotten: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    purged: bool = False
    ledger_entry: int | None = None
    #: keep="auto": every candidate's keep, forget/validation accuracy, target, and the choice.
    candidates: list[dict] = field(default_factory=list)
    #: entries subtracted per step for each layer (k', ≤ the recorded k)
    kept: dict[str, int] = field(default_factory=dict)
    #: steps holding the samples whose update was NaN/infinite (nothing stored to subtract)
    steps_nonfinite: int = 0
    #: defer=True: what ``commit()`` writes to the store (ledger entry, purge)
    pending: Callable[[], tuple[int | None, bool]] | None = field(default=None, repr=False, compare=False)

    def commit(self) -> bool:
        """Write what ``amnesiac(..., defer=True)`` held back — the ledger entry, then the purge —
        once the unlearned model is saved. Idempotent; returns whether it wrote anything now.

        >>> report = unlearn.amnesiac(model, store, ids, defer=True)       # doctest: +SKIP
        >>> save_file(model.state_dict(), "model.safetensors"); report.commit()  # doctest: +SKIP
        """
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        self.ledger_entry, self.purged = pending()
        return True

    @property
    def share(self) -> float:
        """Fraction of all recorded steps that were hit."""
        return len(self.steps_hit) / self.steps_total if self.steps_total else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "requested": self.requested,
            "found": self.found,
            "unknown": self.unknown.tolist(),
            "steps_hit": self.steps_hit.tolist(),
            "steps_total": self.steps_total,
            "share": self.share,
            "steps_without_update": self.steps_without_update,
            "collateral": self.collateral,
            "bytes_read": self.bytes_read,
            "seconds": self.seconds,
            "dry_run": self.dry_run,
            "applied": self.applied,
            "device": self.device,
            "steps_already_subtracted": self.steps_already_subtracted,
            "steps_unavailable": self.steps_unavailable,
            "already_forgotten": self.already_forgotten.tolist(),
            "purged": self.purged,
            "ledger_entry": self.ledger_entry,
            "candidates": self.candidates,
            "kept": self.kept,
            "steps_nonfinite": self.steps_nonfinite,
            "commit_pending": self.pending is not None,
        }

    def __str__(self) -> str:
        verb = "would subtract" if self.dry_run else ("subtracted" if self.applied else "subtracted nothing from")
        lines = [
            f"{self.method}: {self.found}/{self.requested} samples found; {verb} "
            f"{len(self.steps_hit)} of {self.steps_total} steps ({self.share:.1%})",
            f"collateral: {self.collateral} other samples shared those steps",
        ]
        if self.steps_without_update:
            lines.append(f"{self.steps_without_update} step(s) held the samples but stored no update (skipped/unwatched)")
        if self.steps_already_subtracted:
            lines.append(f"{self.steps_already_subtracted} step(s) were already subtracted from this model "
                         "(audit ledger): not subtracted again")
        if len(self.already_forgotten):
            lines.append(f"{len(self.already_forgotten)} sample ID(s) were already forgotten and purged")
        if self.steps_nonfinite:
            lines.append(f"{self.steps_nonfinite} step(s) held the samples but their update was NaN/infinite: "
                         "nothing was stored, nothing subtracted")
        if self.steps_unavailable:
            lines.append(f"{self.steps_unavailable} step(s) were purged after unlearning another copy of the "
                         "model: their updates are gone")
        if len(self.unknown):
            shown = ", ".join(map(str, self.unknown[:10].tolist())) + (" ..." if len(self.unknown) > 10 else "")
            lines.append(f"unknown sample IDs (never recorded): {shown}")
        for c in self.candidates:
            lines.append(f"  keep {c['keep']:<6} forget acc {c['forget_accuracy']:.3f} (target {c['target']:.3f}) "
                         f"validation acc {c['validation_accuracy']:.3f}" + ("  <- chosen" if c.get("chosen") else ""))
        lines.append(f"read {self.bytes_read / 2**20:.2f} MiB in {self.seconds:.3f} s on {self.device}")
        if self.ledger_entry is not None:
            lines.append(f"audit ledger entry {self.ledger_entry}"
                         + ("; rows and IDs purged from disk" if self.purged else ""))
        elif self.pending is not None:
            lines.append("nothing written to the store yet: call report.commit() after saving the model")
        elif self.purged:
            lines.append("rows and IDs purged from disk")
        return "\n".join(lines)
