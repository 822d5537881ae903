"""The Zarr v3 tree of a store: the only module that knows paths, chunk shapes and codecs.

See FORMAT.md beside this file for the specification this module implements.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .config import StoreConfig
from .encoding import bitmap_nbytes, gap_dtype, value_storage_dtype
from .errors import NotAStoreError, UnsupportedFormatError
from .pruning import kept_count

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerSpec",
    "STATUS_SKIPPED",
    "STATUS_RECORDED",
    "STATUS_NOT_STORED",
    "STATUS_PURGED",
    "PURGED_ID",
    "plan_layers",
    "choose_positions",
    "block_steps_for",
    "model_fingerprint",
]

FORMAT_NAME = "updatestore"
FORMAT_VERSION = 1
#: Root attribute holding the sha256 of the canonical JSON of the metadata.
META_CHECK = "updatestore_sha256"

#: Step status codes in ``steps/status``.
STATUS_SKIPPED = 0  # the optimizer step did not change the parameters (e.g. AMP skipped it)
STATUS_RECORDED = 1  # the pruned update is stored in every layer's row
STATUS_NOT_STORED = 2  # samples indexed, update not stored (``watch=`` filter)
STATUS_PURGED = 3  # the update was subtracted by unlearning and its rows erased (``purge``)

#: Written over purged sample IDs in ``samples/ids``; refused as a sample ID.
PURGED_ID = -(2**63)

#: Inner (compressed, checksummed) chunks hold up to this many bytes of rows (128 KiB
#: compressed 4 % smaller than 32 KiB on the digits run: more context for zstd),
#: so small layers do not pay per-chunk overhead; big layers get one row per chunk.
INNER_CHUNK_BYTES = 128 * 1024
MAX_BLOCK_STEPS = 1024
#: 1-D step and sample arrays are chunked by this many elements.
VECTOR_CHUNK = 65536

#: Positions are bit-mapped when keep ≥ this; below it gap coding is smaller.
#: Measured with ``python -m benchmarks.storage --encodings`` on the digits CNN:
#: the two tie at keep 0.02; gaps win by 3 % at 0.01 and 13 % at 0.002, the
#: bitmap wins by 12 % at 0.1 and 44 % at 0.5 (see FORMAT.md).
BITMAP_MIN_KEEP = 0.02


@dataclass(frozen=True)
class LayerSpec:
    """One trainable parameter tensor as the store records it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    keep: float
    k: int
    positions: str  # "dense" | "bitmap" | "gaps"
    chunk_rows: int

    @property
    def path(self) -> str:
        return f"layers/{self.name}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: Any) -> "LayerSpec":
        try:
            spec = cls(
                name=str(d["name"]),
                shape=tuple(int(s) for s in d["shape"]),
                dtype=str(d["dtype"]),
                numel=int(d["numel"]),
                keep=float(d["keep"]),
                k=int(d["k"]),
                positions=str(d["positions"]),
                chunk_rows=int(d["chunk_rows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise NotAStoreError(f"invalid layer entry in store metadata: {d!r} ({exc})") from None
        spec.validate()
        return spec

    def validate(self) -> None:
        name = self.name
        # Names become Zarr node names: refuse anything that could escape layers/.
        if (
            not name
            or "/" in name
            or "\\" in name
            or name in (".", "..")
            or name.startswith("__")
            or any(ord(c) < 32 for c in name)
        ):
            raise NotAStoreError(f"invalid layer name in store metadata: {name!r}")
        if math.prod(self.shape) != self.numel or self.numel < 1:
            raise NotAStoreError(f"layer {name!r}: shape {self.shape} does not match numel {self.numel}")
        if not (0 < self.keep <= 1) or not (1 <= self.k <= self.numel):
            raise NotAStoreError(f"layer {name!r}: keep {self.keep} / k {self.k} out of range")
        if self.positions not in ("dense", "bitmap", "gaps") or (self.positions == "dense") != (
            self.k == self.numel
        ):
            raise NotAStoreError(f"layer {name!r}: invalid positions encoding {self.positions!r}")
        if not (1 <= self.chunk_rows <= MAX_BLOCK_STEPS):
            raise NotAStoreError(f"layer {name!r}: invalid chunk_rows {self.chunk_rows}")

    def row_nbytes(self, value_dtype: str) -> int:
        """Uncompressed bytes of one step's row (values + positions)."""
        v = self.k * value_storage_dtype(value_dtype).itemsize
        if self.positions == "bitmap":
            return v + bitmap_nbytes(self.numel)
        if self.positions == "gaps":
            return v + self.k * gap_dtype(self.numel).itemsize
        return v


def choose_positions(encoding: str, keep: float, k: int, numel: int) -> str:
    """The positions encoding of one layer (``auto`` decides by the keep ratio)."""
    if k == numel:
        return "dense"
    if encoding == "auto":
        return "bitmap" if keep >= BITMAP_MIN_KEEP else "gaps"
    return encoding


def _pow2_floor(x: float) -> int:
    return 1 if x < 2 else 2 ** int(math.floor(math.log2(x)))


def block_steps_for(row_bytes_per_step: int, buffer_bytes: int) -> int:
    """Steps per shard: as many as fit the writer's buffer, a power of two ≤ 1024."""
    return min(MAX_BLOCK_STEPS, _pow2_floor(buffer_bytes / max(1, row_bytes_per_step)))


def plan_layers(named_shapes: list[tuple[str, tuple[int, ...], str]], keep: dict[str, float],
                config: StoreConfig) -> tuple[list[LayerSpec], int]:
    """Layer specs and steps per block for parameters ``(name, shape, dtype)``."""
    provisional = []
    for name, shape, dtype in named_shapes:
        numel = math.prod(shape)
        k = kept_count(keep[name], numel)
        pos = choose_positions(config.positions, keep[name], k, numel)
        provisional.append(LayerSpec(name, tuple(shape), dtype, numel, keep[name], k, pos, 1))
    per_step = sum(s.row_nbytes(config.value_dtype) for s in provisional)
    block = block_steps_for(per_step, config.buffer_bytes)
    specs = []
    for s in provisional:
        rows = min(block, _pow2_floor(INNER_CHUNK_BYTES / max(1, s.row_nbytes(config.value_dtype))))
        specs.append(LayerSpec(s.name, s.shape, s.dtype, s.numel, s.keep, s.k, s.positions, rows))
    for s in specs:
        s.validate()
    return specs, block


def model_fingerprint(named_shapes: list[tuple[str, tuple[int, ...], str]]) -> str:
    """sha256 of the parameter names, shapes and dtypes (not the weights)."""
    text = json.dumps([[n, list(s), d] for n, s, d in named_shapes], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- tree


def _compressors(clevel: int, shuffle: str) -> list:
    # Blosc-zstd inside, then a CRC32C so a corrupted chunk is detected on read.
    return [BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle), Crc32cCodec()]


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def array_digest(arr: zarr.Array) -> str:
    """sha256 of an array's Zarr metadata without its shape (which grows) or attributes.

    Recorded at creation and checked on open, so a damaged ``zarr.json`` (a
    changed dtype, codec or fill value) is refused instead of decoding wrongly.
    """
    d = arr.metadata.to_dict()
    d.pop("shape", None)
    d.pop("attributes", None)
    return _sha256_json(d)


def create_tree(root: zarr.Group, specs: list[LayerSpec], block: int, config: StoreConfig,
                meta: dict[str, Any]) -> None:
    """Create every array of an empty store and write its metadata."""
    vdt = value_storage_dtype(config.value_dtype)
    digests: dict[str, str] = {}
    steps = root.create_group("steps")
    for name, dtype in (("status", "uint8"), ("sample_end", "int64")):
        arr = steps.create_array(name, shape=(0,), dtype=dtype, chunks=(VECTOR_CHUNK,),
                                 compressors=_compressors(config.clevel, "shuffle"), fill_value=0)
        digests[f"steps/{name}"] = array_digest(arr)
    samples = root.create_group("samples")
    arr = samples.create_array("ids", shape=(0,), dtype="int64", chunks=(VECTOR_CHUNK,),
                               compressors=_compressors(config.clevel, "shuffle"), fill_value=0)
    digests["samples/ids"] = array_digest(arr)
    index = root.create_group("index")
    for name in ("sorted_ids", "sorted_steps"):
        arr = index.create_array(name, shape=(0,), dtype="int64", chunks=(VECTOR_CHUNK * 4,),
                                 compressors=_compressors(config.clevel, "shuffle"), fill_value=0)
        digests[f"index/{name}"] = array_digest(arr)
    owners = root.create_group("owners")
    for name in ("sample_ids", "keys"):
        arr = owners.create_array(name, shape=(0,), dtype="int64", chunks=(VECTOR_CHUNK,),
                                  compressors=_compressors(config.clevel, "shuffle"), fill_value=0)
        digests[f"owners/{name}"] = array_digest(arr)
    layers = root.create_group("layers")
    for s in specs:
        g = layers.create_group(s.name, attributes={"updatestore": s.to_json()})
        arr = g.create_array("values", shape=(0, s.k), dtype=vdt, chunks=(s.chunk_rows, s.k),
                             shards=(block, s.k), compressors=_compressors(config.clevel, "shuffle"),
                             fill_value=0)
        digests[f"{s.path}/values"] = array_digest(arr)
        # Shuffle choices measured (benchmarks/storage.py --encodings): byte-shuffle
        # for bf16/fp values and gaps, none for bitmaps (bit-shuffle was 10 % larger).
        if s.positions == "bitmap":
            width, pdt, shuffle = bitmap_nbytes(s.numel), np.dtype("uint8"), "noshuffle"
        elif s.positions == "gaps":
            width, pdt, shuffle = s.k, gap_dtype(s.numel), "shuffle"
        else:
            continue
        arr = g.create_array("positions", shape=(0, width), dtype=pdt, chunks=(s.chunk_rows, width),
                             shards=(block, width), compressors=_compressors(config.clevel, shuffle),
                             fill_value=0)
        digests[f"{s.path}/positions"] = array_digest(arr)
    meta = dict(meta, arrays=digests)
    root.update_attributes({FORMAT_NAME: meta, META_CHECK: _sha256_json(meta)})  # one write
    write_counts(root, 0, 0)
    write_owner_count(root, 0)
    write_index_record(root, 0, 0)


def new_meta(specs: list[LayerSpec], block: int, config: StoreConfig, fingerprint: str,
             library_version: str) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "value_dtype": config.value_dtype,
        "block_steps": block,
        "model_fingerprint": fingerprint,
        "layers": [s.to_json() for s in specs],
    }


def read_index_record(root: zarr.Group) -> tuple[int, int] | None:
    """``(steps, samples)`` the persisted sorted index covers, or None if it is unusable."""
    try:
        attrs = dict(root["index"].attrs)
    except Exception:  # noqa: BLE001 - a damaged cache is ignored (rebuilt from the sample IDs)
        return None
    n, m = attrs.get("steps"), attrs.get("samples")
    if not isinstance(n, int) or not isinstance(m, int) or attrs.get("check") != zlib.crc32(f"index:{n}:{m}".encode()):
        return None
    return n, m


def write_index_record(root: zarr.Group, n: int, m: int) -> None:
    root["index"].update_attributes({"steps": n, "samples": m, "check": zlib.crc32(f"index:{n}:{m}".encode())})


def read_owner_count(root: zarr.Group, where: str) -> int:
    attrs = dict(root["owners"].attrs)
    n = attrs.get("count")
    if not isinstance(n, int) or n < 0 or attrs.get("check") != zlib.crc32(f"owners:{n}".encode()):
        raise NotAStoreError(f"{where}: invalid owner index record {attrs!r}")
    return n


def write_owner_count(root: zarr.Group, n: int) -> None:
    root["owners"].update_attributes({"count": n, "check": zlib.crc32(f"owners:{n}".encode())})


def read_ledger(root: zarr.Group, where: str) -> list[dict[str, Any]]:
    """The audit ledger's entries (empty when nothing was unlearned yet)."""
    if "ledger" not in root:
        return []
    attrs = dict(root["ledger"].attrs)
    entries = attrs.get("entries")
    if not isinstance(entries, list) or attrs.get("check") != _sha256_json(entries):
        raise NotAStoreError(f"{where}: the audit ledger (ledger/zarr.json) is damaged")
    return entries


def write_ledger(root: zarr.Group, entries: list[dict[str, Any]]) -> None:
    group = root["ledger"] if "ledger" in root else root.create_group("ledger")
    group.update_attributes({"entries": entries, "check": _sha256_json(entries)})  # one atomic write


def read_meta(root: zarr.Group, where: str) -> tuple[dict[str, Any], list[LayerSpec]]:
    """Validated metadata of an existing store."""
    meta = root.attrs.get(FORMAT_NAME)
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
    if root.attrs.get(META_CHECK) != _sha256_json(meta):
        raise NotAStoreError(
            f"{where}: the store's metadata does not match its checksum ({META_CHECK}); the file "
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
    return meta, specs


def open_arrays(root: zarr.Group, meta: dict[str, Any], specs: list[LayerSpec], num_steps: int,
                num_samples: int, where: str) -> dict[str, zarr.Array]:
    """Every array of the store, each checked against the metadata it was created with."""
    wanted = ["steps/status", "steps/sample_end", "samples/ids", "owners/sample_ids", "owners/keys",
              "index/sorted_ids", "index/sorted_steps"]
    for s in specs:
        wanted.append(f"{s.path}/values")
        if s.positions != "dense":
            wanted.append(f"{s.path}/positions")
    if sorted(wanted) != sorted(meta["arrays"]):
        raise NotAStoreError(f"{where}: the metadata's array list does not match its layers")
    out = {}
    for path in wanted:
        try:
            arr = root[path]
        except Exception as exc:  # missing node, unreadable or invalid zarr.json
            raise NotAStoreError(f"{where}: array {path!r} is missing or damaged: {exc}") from exc
        if not isinstance(arr, zarr.Array) or array_digest(arr) != meta["arrays"][path]:
            raise NotAStoreError(
                f"{where}: array {path!r} does not match the metadata it was created with "
                "(its zarr.json was changed or damaged)"
            )
        need = (num_samples if path == "samples/ids" else
                0 if path.startswith(("owners/", "index/")) else num_steps)
        if arr.shape[0] < need:
            raise NotAStoreError(f"{where}: array {path!r} holds {arr.shape[0]} rows but {need} are committed")
        out[path] = arr
    return out


def _counts_check(n: int, m: int) -> int:
    return zlib.crc32(f"updatestore:{n}:{m}".encode())


def read_counts(root: zarr.Group, where: str) -> tuple[int, int]:
    """Committed ``(num_steps, num_samples)``: the commit record readers trust."""
    try:
        attrs = dict(root["steps"].attrs)
    except Exception as exc:
        raise NotAStoreError(f"{where}: the commit record (steps/zarr.json) is missing or damaged: {exc}") from exc
    n, m, check = attrs.get("num_steps"), attrs.get("num_samples"), attrs.get("check")
    if (not isinstance(n, int) or not isinstance(m, int) or isinstance(n, bool) or n < 0 or m < 0
            or check != _counts_check(n, m)):
        raise NotAStoreError(f"{where}: invalid commit record num_steps={n!r} num_samples={m!r}")
    return n, m


def write_counts(root: zarr.Group, num_steps: int, num_samples: int) -> None:
    # One small JSON document, written atomically by the store: the commit point. Not
    # attrs.update(), which writes the file once per key (a crash between them tears it).
    root["steps"].update_attributes({"num_steps": num_steps, "num_samples": num_samples,
                                "check": _counts_check(num_steps, num_samples)})
