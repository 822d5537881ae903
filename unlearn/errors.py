"""Errors of the unlearning layer; they derive from ``updatestore.UpdateStoreError`` too."""

from __future__ import annotations

from updatestore import UpdateStoreError

__all__ = ["UnlearnError", "NonFiniteUpdateError", "UnknownModelError"]


class UnlearnError(UpdateStoreError, RuntimeError):
    """Unlearning could not be carried out; the model is left unchanged."""


class NonFiniteUpdateError(UnlearnError, FloatingPointError):
    """The unlearning delta of a layer holds NaN or infinity; nothing was applied."""


class UnknownModelError(UnlearnError, ValueError):
    """The model's weights match no state the store recorded and no earlier unlearning's result."""
