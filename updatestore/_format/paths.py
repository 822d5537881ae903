"""Node paths of a store's Zarr tree (FORMAT.md, "Tree")."""

from __future__ import annotations

__all__ = ["STEPS", "STATUS", "SAMPLE_END", "SAMPLES", "SAMPLE_IDS", "INDEX", "SORTED_IDS", "SORTED_STEPS",
           "OWNERS", "OWNER_SAMPLES", "OWNER_KEYS", "LEDGER", "LINEAGE", "LAYERS", "layer", "values", "positions",
           "VECTORS", "NON_LAYER_GROUPS", "ROWS", "vectors", "PARTS"]

STEPS = "steps"  # its attributes hold the commit record
STATUS = "steps/status"
SAMPLE_END = "steps/sample_end"
ROWS = "steps/row"  # format 2: the layer row holding each step's update
SAMPLES = "samples"
SAMPLE_IDS = "samples/ids"
INDEX = "index"  # the persisted sorted sample index, a cache of samples/ids
SORTED_IDS = "index/sorted_ids"
SORTED_STEPS = "index/sorted_steps"
OWNERS = "owners"
OWNER_SAMPLES = "owners/sample_ids"
OWNER_KEYS = "owners/keys"
LEDGER = "ledger"
LINEAGE = "lineage"  # checkpoint, close and rollback events (added in 0.2; optional)
LAYERS = "layers"
PARTS = "parts"  # format 3: one group per rank, attributes = its part record

#: Every 1-D array, in the order the metadata's array list was first written.
VECTORS = (STATUS, SAMPLE_END, SAMPLE_IDS, OWNER_SAMPLES, OWNER_KEYS, SORTED_IDS, SORTED_STEPS)


def vectors(row_map: bool) -> tuple[str, ...]:
    """Every 1-D array of a store, with or without the row map (format 2)."""
    return VECTORS + ((ROWS,) if row_map else ())


#: Groups holding the step table, sample index and owner table (footprint's index figure).
NON_LAYER_GROUPS = (STEPS, SAMPLES, INDEX, OWNERS)


def layer(name: str) -> str:
    return f"{LAYERS}/{name}"


def values(name: str) -> str:
    return f"{LAYERS}/{name}/values"


def positions(name: str) -> str:
    return f"{LAYERS}/{name}/positions"
