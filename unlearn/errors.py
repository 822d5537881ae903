"""Errors of the unlearning layer; they derive from ``updatestore.UpdateStoreError`` too."""

from __future__ import annotations

from updatestore import UpdateStoreError

__all__ = ["UnlearnError", "NonFiniteUpdateError"]


class UnlearnError(UpdateStoreError, RuntimeError):
    """Unlearning could not be carried out; the model is left unchanged."""


class NonFiniteUpdateError(UnlearnError, FloatingPointError):
    """The unlearning delta of a layer holds NaN or infinity; nothing was applied."""
