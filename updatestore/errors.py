"""The package's errors: one base class, specific subclasses.

Each subclass also inherits the builtin exception it refines, so code written
as ``except ValueError`` or ``except FileNotFoundError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "UpdateStoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "NotAStoreError",
    "UnsupportedFormatError",
    "ConfigError",
    "ModelMismatchError",
    "ReadOnlyStoreError",
    "RecorderError",
    "SampleIdError",
    "WriterError",
    "CorruptStoreError",
    "StepError",
    "StoreLockedError",
    "StoreBehindCheckpointError",
    "OtherRankError",
    "StoreChangedError",
]


class UpdateStoreError(Exception):
    """Base class of every error raised by ``updatestore`` and ``unlearn``."""


class StoreNotFoundError(UpdateStoreError, FileNotFoundError):
    """No store exists at the given path."""


class StoreExistsError(UpdateStoreError, FileExistsError):
    """``create`` was asked to write where something already exists."""


class NotAStoreError(UpdateStoreError, ValueError):
    """The path exists but does not hold an update store, or its metadata is invalid."""


class UnsupportedFormatError(NotAStoreError):
    """The store was written in a format version this library cannot read."""


class ConfigError(UpdateStoreError, ValueError):
    """An option (keep ratio, value dtype, encoding, ...) is invalid."""


class ModelMismatchError(UpdateStoreError, ValueError):
    """The model's parameters do not match the ones the store was recorded for."""


class ReadOnlyStoreError(UpdateStoreError, PermissionError):
    """A write was attempted on a store opened read-only."""


class RecorderError(UpdateStoreError, RuntimeError):
    """The recorder was used incorrectly (double attach, step without sample IDs, ...)."""


class SampleIdError(UpdateStoreError, TypeError):
    """Sample IDs are not a 1-D collection of integers."""


class WriterError(UpdateStoreError, RuntimeError):
    """The background writer failed; the original exception is chained as ``__cause__``."""


class CorruptStoreError(UpdateStoreError, ValueError):
    """Stored data failed its checksum or does not decode; names the layer and steps."""


class StepError(UpdateStoreError, IndexError):
    """Steps are not integers, or not within the store's committed steps."""


class StoreLockedError(UpdateStoreError, BlockingIOError):
    """Another live process (or handle) is writing to the store."""


class StoreBehindCheckpointError(UpdateStoreError, RuntimeError):
    """A model checkpoint is newer than the store: steps the model received were never committed."""


class OtherRankError(UpdateStoreError, RuntimeError):
    """Under torch.distributed, a collective step (create, attach, checkpoint, close, unlearning)
    failed on another rank; that rank raised the cause, this one changed nothing more."""


class StoreChangedError(UpdateStoreError, RuntimeError):
    """Another process changed committed data in place (a purge, a rollback) while a read-only handle
    read it inside ``store.pinned()``: what was read may mix two states and must not be used."""
