"""The on-disk format (FORMAT.md): the only package that knows node paths, shapes and records."""

from ..errors import NotAStoreError, UpdateStoreError
from .meta import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PURGED_ID,
    STATUS_NONFINITE,
    STATUS_NOT_STORED,
    STATUS_PURGED,
    STATUS_RECORDED,
    STATUS_SKIPPED,
    LayerSpec,
    has_row_map,
    logical_layers,
    SHARDED_VERSION,
    model_fingerprint,
    new_meta,
    read_meta,
)
from .records import part_record, COUNTS, INDEX_RECORD, LEDGER, LEDGER_COUNT, LINEAGE, OWNER_COUNT, bump_generation, read_counts, read_state
from .tree import MAX_BLOCK_STEPS, committed_rows, count_chunks, create_tree, require_chunks, dense_array, erase_beyond, missing_chunks, truncate, open_arrays, plan_layers, plan_store, resize_all


def check_store(root, where: str) -> tuple[dict, list[LayerSpec], int, int]:
    """Metadata, layer specs and committed counts of an existing store, every array checked
    against the metadata it was created with; ``NotAStoreError`` (or a subclass) otherwise."""
    try:
        meta, specs = read_meta(root, where)
        steps, samples = read_counts(root, where)
        open_arrays(root, meta, specs, steps, samples, where)
    except UpdateStoreError:
        raise
    except Exception as exc:  # damaged JSON or metadata that zarr cannot parse
        raise NotAStoreError(f"{where} cannot be opened as an update store: {exc}") from exc
    return meta, specs, steps, samples

__all__ = [
    "check_store", "logical_layers", "SHARDED_VERSION", "part_record", "FORMAT_NAME", "FORMAT_VERSION", "PURGED_ID", "STATUS_SKIPPED", "STATUS_RECORDED", "STATUS_NOT_STORED", "STATUS_NONFINITE",
    "STATUS_PURGED", "LayerSpec", "has_row_map", "committed_rows", "count_chunks", "require_chunks", "model_fingerprint", "new_meta", "read_meta", "COUNTS", "INDEX_RECORD",
    "LEDGER", "LEDGER_COUNT", "LINEAGE", "OWNER_COUNT", "bump_generation", "read_counts", "read_state", "MAX_BLOCK_STEPS", "create_tree", "dense_array", "erase_beyond", "missing_chunks", "truncate", "open_arrays", "plan_layers", "plan_store", "resize_all",
]
