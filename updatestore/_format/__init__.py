"""The on-disk format (FORMAT.md): the only package that knows node paths, shapes and records."""

from .meta import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PURGED_ID,
    STATUS_NOT_STORED,
    STATUS_PURGED,
    STATUS_RECORDED,
    STATUS_SKIPPED,
    LayerSpec,
    model_fingerprint,
    new_meta,
    read_meta,
)
from .records import COUNTS, INDEX_RECORD, LEDGER, OWNER_COUNT, read_counts
from .tree import MAX_BLOCK_STEPS, create_tree, open_arrays, plan_layers

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "PURGED_ID", "STATUS_SKIPPED", "STATUS_RECORDED", "STATUS_NOT_STORED",
    "STATUS_PURGED", "LayerSpec", "model_fingerprint", "new_meta", "read_meta", "COUNTS", "INDEX_RECORD",
    "LEDGER", "OWNER_COUNT", "read_counts", "MAX_BLOCK_STEPS", "create_tree", "open_arrays", "plan_layers",
]
