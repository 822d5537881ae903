"""Creating and opening the arrays of a store: shard and chunk shapes, compressors, digests."""

from __future__ import annotations

import math
from typing import Any

import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .._codecs import choose_positions, positions_codec, values_codec
from ..config import StoreConfig, kept_count, resolve_keep
from ..errors import ConfigError, CorruptStoreError, NotAStoreError
from . import paths
from .meta import MAX_BLOCK_STEPS, LayerSpec, has_row_map, model_fingerprint, new_meta
from .records import COUNTS, INDEX_RECORD, META, OWNER_COUNT, part_record, sha256_json

__all__ = ["plan_store", "dense_array", "truncate", "resize_all", "erase_beyond", "committed_rows", "count_chunks", "require_chunks", "missing_chunks", "plan_layers", "block_steps_for", "create_tree", "open_arrays", "array_digest", "MAX_BLOCK_STEPS"]

#: Inner (compressed, checksummed) chunks hold up to this many bytes of rows (128 KiB
#: compressed 4 % smaller than 32 KiB on the digits run: more context for zstd),
#: so small layers do not pay per-chunk overhead; big layers get one row per chunk.
INNER_CHUNK_BYTES = 128 * 1024
#: 1-D step and sample arrays are chunked by this many elements.
VECTOR_CHUNK = 65536


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


def plan_store(named_shapes: list[tuple[str, tuple[int, ...], str]], config: StoreConfig,
               library_version: str, parts: dict[str, list[tuple[int, int, int]]] | None = None,
               world: int = 1) -> tuple[list[LayerSpec], int, dict[str, Any]]:
    """Layer specs, steps per block and metadata of a new store for parameters ``(name, shape, dtype)``.

    ``parts`` (a sharded store, format 3): per parameter, its ``(rank, offset, numel)`` flat ranges in
    offset order; each becomes a stored layer ``<name>@<rank>`` pruned on its own (FORMAT.md, "Parts").
    """
    if not named_shapes:
        raise ConfigError("the model has no trainable parameters to record")
    keep = resolve_keep(config.keep, [n for n, *_ in named_shapes])
    if parts is None:
        specs, block = plan_layers(named_shapes, keep, config)
        sharding = None
    else:
        where = {}
        stored = []
        for name, _, dtype in named_shapes:
            for rank, offset, numel in parts[name]:
                where[f"{name}@{rank}"] = (name, offset, rank)
                stored.append((f"{name}@{rank}", (numel,), dtype))
        flat, block = plan_layers(stored, {n: keep[where[n][0]] for n, *_ in stored}, config)
        specs = [LayerSpec(**{**s.__dict__, "part": where[s.name]}) for s in flat]
        for s in specs:
            s.validate()
        sharding = {"world": world, "params": [[n, list(shape), dt] for n, shape, dt in named_shapes]}
    meta = new_meta(specs, block, config, model_fingerprint(named_shapes), library_version, sharding)
    # Since 0.2 every chunk a committed step needs is written, zeros included, so that a missing
    # one is corruption rather than "all zeros" (readers of older stores check what they can).
    return specs, block, dict(meta, chunks_always_written=True)


def dense_array(root: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` for writing: chunks that hold only zeros are written too, so that a
    committed step's chunks always exist and a deleted one is detected instead of read as zeros."""
    return root[path].with_config({"write_empty_chunks": True})


def truncate(arr: zarr.Array, start: int) -> None:
    """Erase rows ``start..`` (committed or left by an interrupted writer) and shrink the array to ``start``."""
    if arr.shape[0] > start:
        arr[start:] = 0
        arr.resize((start,) + arr.shape[1:])


def resize_all(resizes: list[tuple[zarr.Array, tuple[int, ...]]], delete_outside: bool = True) -> None:
    """Resize several arrays (in place) at once: their zarr.json writes run concurrently.
    ``delete_outside=False``: the caller knows no chunk lies past the new shapes (none is looked for)."""
    if not resizes:
        return
    import asyncio

    from zarr.core.sync import sync

    async def run() -> None:
        await asyncio.gather(*(arr.async_array.resize(shape, delete_outside) for arr, shape in resizes))

    sync(run())


def committed_rows(root: zarr.Group, n: int, row_map: bool) -> int:
    """Layer rows in use by the first ``n`` steps: ``n`` in format 1, else one past step ``n-1``'s row."""
    if not row_map or n == 0:
        return n
    row = int(root[paths.ROWS][n - 1])
    if row < n - 1:  # rows strictly increase from 0, so row(n-1) >= n-1
        raise CorruptStoreError(f"{paths.ROWS}[{n - 1}] = {row} is impossible for {n} committed steps")
    return row + 1


def erase_beyond(root: zarr.Group, specs: list[LayerSpec] | tuple[LayerSpec, ...], n: int, m: int,
                 rows: int) -> None:
    """Erase every step past ``n`` (layer rows past ``rows``) and every sample ID past ``m`` (what no
    commit record vouches for: rolled-back steps, or what an interrupted writer left) and shrink the
    arrays to them."""
    for spec in specs:
        for path in spec.array_paths:
            truncate(root[path], rows)
    vectors = [(paths.STATUS, n), (paths.SAMPLE_END, n), (paths.SAMPLE_IDS, m)]
    if paths.ROWS in root:  # format 2
        vectors.append((paths.ROWS, n))
    for path, count in vectors:
        truncate(root[path], count)


def count_chunks(arr: zarr.Array) -> int:
    """How many chunk objects (shards, for a sharded array) the array has in the store: one listing."""
    from zarr.core.sync import sync

    first = arr.metadata.encode_chunk_key((0,) * arr.ndim)  # "c/0" with the default v3 encoding
    prefix = f"{arr.path}/{first.rpartition('/')[0]}/" if "/" in first else f"{arr.path}/"

    async def count() -> int:
        return sum([1 async for _ in arr.store.list_prefix(prefix)])

    return sync(count())


def require_chunks(arr: zarr.Array, count: int, where: str, *, presence: bool = True) -> None:
    """The chunks of a 1-D array that hold its first ``count`` elements exist, or ``CorruptStoreError``.

    Counts come from the store: one listing first bounds the work by what is on disk, so a forged
    count fails before anything is sized by it; then (``presence``) each needed chunk is checked,
    since Zarr would read a missing one as zeros.
    """
    chunks = -(-count // arr.chunks[0])
    present = count_chunks(arr)
    if chunks > present + 64:  # far more than exists: a forged count
        raise CorruptStoreError(
            f"store {where}: {count} elements of {arr.path} are committed, which needs {chunks} chunk(s), but only "
            f"{present} exist (a forged record or deleted chunks); restore from a backup")
    lost = missing_chunks(arr, [(i,) for i in range(chunks)]) if presence else []
    if lost:
        a, b = lost[0][0] * arr.chunks[0], min(count, (lost[0][0] + 1) * arr.chunks[0])
        raise CorruptStoreError(f"store {where}: {arr.path} is missing chunk(s) {[c[0] for c in lost]} "
                                f"(elements {a}..{b - 1} of {count} committed); restore them from a backup")


def missing_chunks(arr: zarr.Array, coords: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Which of the chunks (shards, for a sharded array) at ``coords`` have no object in the store.

    Zarr reads a missing chunk as the fill value, so a deleted chunk would otherwise read as zeros.
    """
    if not coords:
        return []
    import asyncio

    from zarr.core.sync import sync

    keys = [f"{arr.path}/{arr.metadata.encode_chunk_key(c)}" for c in coords]

    async def check() -> list[bool]:
        return await asyncio.gather(*(arr.store.exists(k) for k in keys))

    return [c for c, ok in zip(coords, sync(check())) if not ok]


def _compressors(clevel: int, shuffle: str, cname: str = "zstd", blocksize: int = 0) -> list:
    # Blosc inside, then a CRC32C so a corrupted chunk is detected on read.
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize), Crc32cCodec()]


#: Kept values' Blosc (cname, shuffle, blocksize) per ``StoreConfig.codec``. Measured on keep-0.1 bf16
#: rows of the 4.2M-entry layer of ``benchmarks/readpath.py``, one thread: zstd-1 with byte-shuffle in
#: one 512 KiB block stored 3 % less than in Blosc's own (small) blocks and decompressed 1.25× faster
#: (0.71 vs 0.56 GB/s); lz4 on bit-shuffled values decompressed at 2.2 GB/s and compressed 3× faster,
#: for 9 % more bytes there (more at keep 0.01 and 1.0: see StoreConfig). Positions are zstd in both:
#: lz4 stored bitmaps 37 % larger. Large bfloat16 chunks of bitmap layers are bit-shuffled instead (``values_blosc``).
VALUES_BLOSC = {"zstd": dict(cname="zstd", shuffle="shuffle", blocksize=1 << 19),
                "lz4": dict(cname="lz4", shuffle="bitshuffle", blocksize=0)}

#: bfloat16 value chunks at least this large are bit-shuffled under zstd (``values_blosc``).
BITSHUFFLE_MIN = 1 << 16


def even_blocks(nbytes: int, target: int = 1 << 19) -> int:
    """A Blosc block size near ``target`` that cuts ``nbytes`` into equal blocks of whole 16-byte
    groups, so what is left over is under 16 bytes a block.

    Blosc bit-shuffles a block only if it holds a multiple of 8 items; a last, partial block
    (what ``nbytes`` leaves over a fixed block size) is compressed unshuffled. With 512 KiB
    blocks, 37 % of a 4.2M-entry layer's 839 KB row was left so, and it stored 6 % larger.

    >>> even_blocks(838862)
    419424
    """
    n = -(-nbytes // target)
    return max(16, nbytes // n // 16 * 16)


def values_blosc(codec: str, value_dtype: str, chunk_bytes: int, positions: str) -> dict[str, Any]:
    """Blosc settings of a layer's ``values`` array whose inner chunks hold ``chunk_bytes``.

    Under zstd, bfloat16 chunks of ≥ 64 KiB of a bitmap layer (top-k rows at keep ≳ 0.03) are
    bit-shuffled in even blocks: on the keep-0.1 rows of ``benchmarks/readpath.py``'s 4.2M-parameter
    MLP (100 steps, one thread) they stored 1 % fewer bytes than byte-shuffled ones, compressed 1.7×
    and decompressed 1.8× faster (700 vs 410, 1458 vs 807 MB/s); the 11M CNN's store at keep 0.1
    1 % smaller (``benchmarks/storage.py``). Dense rows (keep 1.0) stored 13 % more bit-shuffled on
    that CNN, and smaller chunks (a digits CNN's layers) 3 % more: they stay byte-shuffled.
    """
    if codec == "zstd" and value_dtype == "bfloat16" and positions == "bitmap" and chunk_bytes >= BITSHUFFLE_MIN:
        return dict(cname="zstd", shuffle="bitshuffle", blocksize=even_blocks(chunk_bytes))
    return VALUES_BLOSC[codec]


def array_digest(arr: zarr.Array) -> str:
    """sha256 of an array's Zarr metadata without its shape (which grows) or attributes.

    Recorded at creation and checked on open, so a damaged ``zarr.json`` (a
    changed dtype, codec or fill value) is refused instead of decoding wrongly.
    """
    d = arr.metadata.to_dict()
    d.pop("shape", None)
    d.pop("attributes", None)
    return sha256_json(d)


def _array_paths(specs: list[LayerSpec], meta: dict[str, Any]) -> list[str]:
    return list(paths.vectors(has_row_map(meta))) + [p for s in specs for p in s.array_paths]


def create_tree(root: zarr.Group, specs: list[LayerSpec], block: int, config: StoreConfig,
                meta: dict[str, Any]) -> None:
    """Create every array of an empty store, then write its metadata and empty records."""
    digests: dict[str, str] = {}

    def vector(path: str, dtype: str, chunk: int) -> None:
        arr = root.create_array(path, shape=(0,), dtype=dtype, chunks=(chunk,),
                                compressors=_compressors(config.clevel, "shuffle"), fill_value=0)
        digests[path] = array_digest(arr)

    for group in (paths.STEPS, paths.SAMPLES, paths.INDEX, paths.OWNERS, paths.LAYERS):
        root.create_group(group)
    vector(paths.STATUS, "uint8", VECTOR_CHUNK)
    vector(paths.SAMPLE_END, "int64", VECTOR_CHUNK)
    if has_row_map(meta):
        vector(paths.ROWS, "int64", VECTOR_CHUNK)
    vector(paths.SAMPLE_IDS, "int64", VECTOR_CHUNK)
    vector(paths.SORTED_IDS, "int64", VECTOR_CHUNK * 4)
    vector(paths.SORTED_STEPS, "int64", VECTOR_CHUNK * 4)
    vector(paths.OWNER_SAMPLES, "int64", VECTOR_CHUNK)
    vector(paths.OWNER_KEYS, "int64", VECTOR_CHUNK)
    vdt = values_codec(config.value_dtype).storage
    for s in specs:
        g = root.create_group(s.path, attributes={"updatestore": s.to_json()})
        blosc = values_blosc(config.codec, config.value_dtype, s.chunk_rows * s.k * vdt.itemsize, s.positions)
        arr = g.create_array("values", shape=(0, s.k), dtype=vdt, chunks=(s.chunk_rows, s.k),
                             shards=(block, s.k), compressors=_compressors(config.clevel, **blosc), fill_value=0)
        digests[paths.values(s.name)] = array_digest(arr)
        codec = positions_codec(s.positions)
        if not codec.stored:
            continue
        width = codec.width(s.numel, s.k)
        arr = g.create_array("positions", shape=(0, width), dtype=codec.dtype(s.numel), chunks=(s.chunk_rows, width),
                             shards=(block, width), compressors=_compressors(config.clevel, codec.shuffle, blocksize=codec.blocksize),
                             fill_value=0)
        digests[paths.positions(s.name)] = array_digest(arr)
    META.write(root, dict(meta, arrays=digests))  # one write
    COUNTS.write(root, 0, 0)
    OWNER_COUNT.write(root, 0)
    INDEX_RECORD.write(root, 0, 0)
    if "sharding" in meta:
        root.create_group(paths.PARTS)
        for rank in range(meta["sharding"]["world"]):
            root.create_group(f"{paths.PARTS}/{rank}")
            part_record(rank).write(root, 0)


def open_arrays(root: zarr.Group, meta: dict[str, Any], specs: list[LayerSpec], num_steps: int,
                num_samples: int, where: str) -> dict[str, zarr.Array]:
    """Every array of the store, each checked against the metadata it was created with."""
    wanted = _array_paths(specs, meta)
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
        # (format 2's layer arrays are checked against the row map when read)
        need = (num_samples if path == paths.SAMPLE_IDS else
                0 if path.startswith((paths.OWNERS + "/", paths.INDEX + "/")) else
                0 if path.startswith(paths.LAYERS + "/") and has_row_map(meta) else num_steps)
        if arr.shape[0] < need:
            raise NotAStoreError(f"{where}: array {path!r} holds {arr.shape[0]} rows but {need} are committed")
        out[path] = arr
    return out
