"""The store's self-description: format version, status codes, layer specs, metadata validation."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import zarr

from .._codecs import positions_codec, values_codec
from ..config import StoreConfig, kept_count
from ..errors import NotAStoreError, UnsupportedFormatError
from . import paths
from .records import META, sha256_json

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "STATUS_SKIPPED", "STATUS_RECORDED", "STATUS_NOT_STORED",
           "STATUS_PURGED", "STATUS_NONFINITE", "PURGED_ID", "MAX_BLOCK_STEPS", "LayerSpec", "new_meta", "read_meta",
           "model_fingerprint", "has_row_map", "SHARDED_VERSION", "logical_layers"]

FORMAT_NAME = "updatestore"
FORMAT_VERSION = 3
#: Format 2 adds ``steps/row``: a commit may close a shard early, so a step's layer row is looked up.
FIRST_ROW_MAP_VERSION = 2
#: Format 3 is a *sharded* store (FSDP): each parameter is stored as parts, one per rank that holds a
#: shard of it; unsharded stores are still written as format 2, which older releases read.
SHARDED_VERSION = 3

#: Step status codes in ``steps/status``.
STATUS_SKIPPED = 0  # the optimizer step did not change the parameters (e.g. AMP skipped it)
STATUS_RECORDED = 1  # the pruned update is stored in every layer's row
STATUS_NOT_STORED = 2  # samples indexed, update not stored (``watch=`` filter)
STATUS_PURGED = 3  # the update was subtracted by unlearning and its rows erased (``purge``)
STATUS_NONFINITE = 4  # the update held NaN or infinity (a diverged step): indexed, nothing stored (added in 0.2)

#: Written over purged sample IDs in ``samples/ids``; refused as a sample ID.
PURGED_ID = -(2**63)

#: At most this many steps per shard (one block of the writer).
MAX_BLOCK_STEPS = 1024


@dataclass(frozen=True)
class LayerSpec:
    """One trainable parameter tensor as the store records it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    keep: float
    k: int
    positions: str  # a name in the positions codec registry: "dense" | "bitmap" | "gaps"
    chunk_rows: int
    #: In a sharded store (format 3): ``(parameter, offset, rank)`` — this stored layer is the flat
    #: entries ``offset .. offset+numel`` of ``parameter``, recorded by ``rank``. ``None`` otherwise.
    part: tuple[str, int, int] | None = None

    @property
    def path(self) -> str:
        return paths.layer(self.name)

    @property
    def array_paths(self) -> list[str]:
        """This layer's arrays: ``values``, and ``positions`` unless the encoding stores none."""
        stored = positions_codec(self.positions).stored
        return [paths.values(self.name)] + ([paths.positions(self.name)] if stored else [])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        if self.part is None:
            del d["part"]  # stores of formats 1-2 never had the key: their metadata checksums stay valid
        else:
            d["part"] = list(self.part)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "LayerSpec":
        try:
            spec = cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]), dtype=str(d["dtype"]),
                       numel=int(d["numel"]), keep=float(d["keep"]), k=int(d["k"]),
                       positions=str(d["positions"]), chunk_rows=int(d["chunk_rows"]),
                       part=None if d.get("part") is None else (str(d["part"][0]), int(d["part"][1]), int(d["part"][2])))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise NotAStoreError(f"invalid layer entry in store metadata: {d!r} ({exc})") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        name = self.name
        # Names become Zarr node names: refuse anything that could escape layers/.
        if (not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("__")
                or any(ord(c) < 32 for c in name)):
            raise NotAStoreError(f"invalid layer name in store metadata: {name!r}")
        if math.prod(self.shape) != self.numel or self.numel < 1:
            raise NotAStoreError(f"layer {name!r}: shape {self.shape} does not match numel {self.numel}")
        if not (0 < self.keep <= 1) or not (1 <= self.k <= self.numel):
            raise NotAStoreError(f"layer {name!r}: keep {self.keep} / k {self.k} out of range")
        try:
            positions_codec(self.positions)
        except UnsupportedFormatError as exc:
            raise UnsupportedFormatError(f"layer {name!r}: {exc}") from None
        if (self.positions == "dense") != (self.k == self.numel):
            raise NotAStoreError(f"layer {name!r}: invalid positions encoding {self.positions!r}")
        if not (1 <= self.chunk_rows <= MAX_BLOCK_STEPS):
            raise NotAStoreError(f"layer {name!r}: invalid chunk_rows {self.chunk_rows}")
        if self.part is not None and (self.part[1] < 0 or self.part[2] < 0 or self.shape != (self.numel,)):
            raise NotAStoreError(f"layer {name!r}: invalid part {self.part}")

    def row_nbytes(self, value_dtype: str) -> int:
        """Uncompressed bytes of one step's row (values + positions)."""
        codec = positions_codec(self.positions)
        pos = codec.width(self.numel, self.k) * codec.dtype(self.numel).itemsize if codec.stored else 0
        return self.k * values_codec(value_dtype).storage.itemsize + pos


def has_row_map(meta: dict[str, Any]) -> bool:
    """Whether the store maps steps to layer rows (format 2); in formats 1 and 3 row = step.

    A sharded store has no row map: its ranks commit on their own clocks, and a row map
    shared by every part would need them to agree on when shards close.
    """
    return FIRST_ROW_MAP_VERSION <= meta["format_version"] < SHARDED_VERSION


def model_fingerprint(named_shapes: list[tuple[str, tuple[int, ...], str]]) -> str:
    """sha256 of the parameter names, shapes and dtypes (not the weights)."""
    text = json.dumps([[n, list(s), d] for n, s, d in named_shapes], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def new_meta(specs: list[LayerSpec], block: int, config: StoreConfig, fingerprint: str,
             library_version: str, sharding: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = {} if sharding is None else {"sharding": sharding}
    return {
        **extra,
        "format": FORMAT_NAME,
        "format_version": SHARDED_VERSION if sharding is not None else 2,
        "library_version": library_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "value_dtype": config.value_dtype,
        "block_steps": block,
        "model_fingerprint": fingerprint,
        "layers": [s.to_json() for s in specs],
        # The ledger hashes sample IDs under this per-store secret (HMAC), so a ledger handed to an
        # auditor alone cannot be enumerated over small ID spaces (FORMAT.md, "Audit ledger").
        "ledger_key": secrets.token_hex(32),
    }


def read_meta(root: zarr.Group, where: str) -> tuple[dict[str, Any], list[LayerSpec]]:
    """Validated metadata of an existing store."""
    meta = root.attrs.get(META.key)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise NotAStoreError(
            f"{where} is a Zarr group but not an update store (no '{FORMAT_NAME}' attribute); "
            "create one with UpdateStore.create(path, model)"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise UnsupportedFormatError(
            f"{where} has format version {version!r}; this library reads versions 1..{FORMAT_VERSION}. "
            "Upgrade updatestore to read it."
        )
    if root.attrs.get(META.check_key) != sha256_json(meta):
        raise NotAStoreError(
            f"{where}: the store's metadata does not match its checksum ({META.check_key}); the file "
            "zarr.json was changed or damaged. Restore it from a backup"
        )
    if meta.get("value_dtype") not in ("bfloat16", "float16", "float32"):
        raise NotAStoreError(f"{where}: invalid value_dtype {meta.get('value_dtype')!r}")
    block = meta.get("block_steps")
    if not isinstance(block, int) or not 1 <= block <= MAX_BLOCK_STEPS:
        raise NotAStoreError(f"{where}: invalid block_steps {block!r}")
    layers = meta.get("layers")
    if not isinstance(layers, list) or not layers:
        raise NotAStoreError(f"{where}: metadata lists no layers")
    specs = [LayerSpec.from_json(d) for d in layers]
    if len({s.name for s in specs}) != len(specs):
        raise NotAStoreError(f"{where}: duplicate layer names in metadata")
    for s in specs:
        if s.k != kept_count(s.keep, s.numel):
            raise NotAStoreError(f"{where}: layer {s.name!r} has k={s.k}, but keep {s.keep} of {s.numel} gives "
                                 f"{kept_count(s.keep, s.numel)}")
    if not isinstance(meta.get("arrays"), dict):
        raise NotAStoreError(f"{where}: metadata has no array checksums")
    if (version == SHARDED_VERSION) != isinstance(meta.get("sharding"), dict):
        raise NotAStoreError(f"{where}: format {version} and the metadata's 'sharding' entry disagree")
    if version == SHARDED_VERSION:
        _check_parts(meta["sharding"], specs, where)
    elif any(s.part is not None for s in specs):
        raise NotAStoreError(f"{where}: a format {version} store cannot have layer parts")
    return meta, specs


def _check_parts(sharding: dict[str, Any], specs: list[LayerSpec], where: str) -> None:
    """Every parameter of a sharded store is tiled exactly by its parts, in offset order: a gap would
    silently leave entries out of unlearning, an overlap would subtract them twice."""
    world, params = sharding.get("world"), sharding.get("params")
    if not isinstance(world, int) or world < 1 or not isinstance(params, list) or not params:
        raise NotAStoreError(f"{where}: invalid sharding entry {sharding!r}")
    parts: dict[str, list[LayerSpec]] = {}
    for s in specs:
        if s.part is None or s.part[2] >= world:
            raise NotAStoreError(f"{where}: layer {s.name!r} is not a valid part of a {world}-rank store")
        parts.setdefault(s.part[0], []).append(s)
    try:
        shapes = {str(n): (tuple(int(x) for x in shape), str(dt)) for n, shape, dt in params}
    except (TypeError, ValueError) as exc:
        raise NotAStoreError(f"{where}: invalid sharding parameters: {exc}") from None
    if set(shapes) != set(parts) or len(shapes) != len(params):
        raise NotAStoreError(f"{where}: the sharding's parameters do not match the stored parts")
    for name, (shape, _) in shapes.items():
        at = 0
        for s in parts[name]:
            if s.part[1] != at:
                raise NotAStoreError(f"{where}: parameter {name!r}: part {s.name!r} starts at {s.part[1]}, not {at}")
            at += s.numel
        if at != math.prod(shape):
            raise NotAStoreError(f"{where}: parameter {name!r}: its parts hold {at} of {math.prod(shape)} entries")


def logical_layers(meta: dict[str, Any], specs: list[LayerSpec]) -> list[LayerSpec]:
    """One spec per recorded parameter: the stored specs themselves, or, in a sharded store, each
    parameter's whole shape with ``k`` summed over its parts (not a stored array: never validated)."""
    if "sharding" not in meta:
        return list(specs)
    out = []
    for name, shape, dtype in meta["sharding"]["params"]:
        parts = [s for s in specs if s.part[0] == name]
        out.append(LayerSpec(name, tuple(shape), dtype, math.prod(shape), parts[0].keep, sum(s.k for s in parts),
                             parts[0].positions, parts[0].chunk_rows))
    return out
