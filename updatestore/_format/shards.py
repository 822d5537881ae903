"""A direct reader and writer of the standard Zarr v3 sharding layout that layer arrays use (FORMAT.md).

zarr-python reads a shard through its generic codec pipeline: coroutines per inner chunk and
an event-loop hop per call. Profiled on 100 steps of a 4.3M-parameter MLP, that pipeline
cost more than the bytes and the arithmetic together. The layout is fixed and simple — a
shard file holds inner chunks (Blosc → CRC32C) and ends with an index of ``n`` little-endian
``(offset, nbytes)`` uint64 pairs plus its CRC32C — so the hot path reads it directly: whole
shards (or runs of wanted chunks) in one request each through the store's own byte-range API,
every CRC32C checked, Blosc decompressed by the calling thread and the pool together (it releases
the GIL; ``_pool.map_shared``). A local store's files are read with ``pread`` the same way instead
of through zarr's event loop (100 steps of that MLP: 26 → 11 ms for its 82 MiB from the page
cache), and the bytes counted as zarr's reads are.

The writer is the same idea in reverse (profiled: zarr-python's pipeline took ≈ 140 ms a step to
write the rows of an 11M-parameter CNN, most of it per-chunk coroutines): every commit writes whole
shards from their first row, so each shard file is assembled here — inner chunks compressed with
the array's own Blosc settings on the writer's thread and the pool, each followed by its CRC32C, then the index —
and put with one request.

Any array whose codecs are not exactly the ones the format writes is refused, never guessed.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .._pool import map_shared
from ..errors import UnsupportedFormatError

__all__ = ["ShardLayout", "ShardError", "read_rows", "write_shards"]


class ShardError(ValueError):
    """A shard file or inner chunk is damaged (the reader names the store and layer)."""

_EMPTY = 2**64 - 1
#: Wanted chunks closer than this in a shard file are fetched in one range request.
_MERGE_GAP = 1 << 16


@dataclass(frozen=True)
class ShardLayout:
    """Where the rows of one 2-D layer array live: shards of ``shard_rows`` rows, inner chunks of
    ``chunk_rows`` full-width rows, one file per shard at ``key(shard)``."""

    path: str
    length: int
    width: int
    dtype: np.dtype
    shard_rows: int
    chunk_rows: int

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def index_nbytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_rows * self.width * self.dtype.itemsize

    #: the array's Blosc settings (``numcodecs`` config), to write chunks exactly as zarr would
    blosc_config: tuple = ()

    def key(self, shard: int) -> str:
        return f"{self.path}/c/{shard}/0"

    @classmethod
    def of(cls, arr: zarr.Array) -> "ShardLayout":
        """The layout of ``arr``; ``UnsupportedFormatError`` unless it is exactly what FORMAT.md defines."""
        md = arr.metadata
        codecs = md.codecs
        ok = (len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) and len(arr.shape) == 2
              and getattr(md.chunk_key_encoding, "separator", None) == "/"
              and getattr(md.chunk_key_encoding, "name", None) == "default")
        if ok:
            sh = codecs[0]
            inner = sh.codecs
            ok = (len(inner) == 3 and isinstance(inner[0], BytesCodec) and isinstance(inner[1], BloscCodec)
                  and isinstance(inner[2], Crc32cCodec) and len(sh.index_codecs) == 2
                  and isinstance(sh.index_codecs[0], BytesCodec) and isinstance(sh.index_codecs[1], Crc32cCodec)
                  and sh.index_location.value == "end" and _little(sh.index_codecs[0]) and _little(inner[0])
                  and md.chunk_grid.chunk_shape[1] == arr.shape[1] == sh.chunk_shape[1]
                  and md.chunk_grid.chunk_shape[0] % sh.chunk_shape[0] == 0)
        if not ok:
            raise UnsupportedFormatError(f"array {arr.path} is not laid out as FORMAT.md defines "
                                         "(sharding_indexed of bytes/blosc/crc32c, index at the end)")
        sh = codecs[0]
        bl = sh.codecs[1]
        config = (("cname", bl.cname.name), ("clevel", int(bl.clevel)), ("shuffle", bl.shuffle.name),
                  ("blocksize", int(bl.blocksize)), ("typesize", int(bl.typesize or np.dtype(arr.dtype).itemsize)))
        return cls(arr.path, int(arr.shape[0]), int(arr.shape[1]), np.dtype(arr.dtype),
                   int(md.chunk_grid.chunk_shape[0]), int(sh.chunk_shape[0]), config)


def _little(codec: BytesCodec) -> bool:
    # zarr leaves the endianness of 1-byte types unset
    return codec.endian is None or getattr(codec.endian, "value", codec.endian) == "little"


def _check_crc(data: np.ndarray, what: str) -> np.ndarray:
    if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ShardError(f"{what}: CRC32C mismatch (the file is damaged); restore it from a backup")
    return data[:-4]


def _parse_index(raw: np.ndarray, lay: ShardLayout, size: int | None, key: str) -> np.ndarray:
    idx = np.frombuffer(_check_crc(raw, f"shard index of {key}"), dtype="<u8").reshape(-1, 2)
    used = idx[:, 0] != _EMPTY
    if len(idx) != lay.chunks_per_shard or (used & (idx[:, 1] < 20)).any() or (
            size is not None and (used & (idx[:, 0] + idx[:, 1] > size - lay.index_nbytes)).any()):
        raise ShardError(f"shard index of {key} does not match the array's layout; restore it from a backup")
    return idx


def _decompress(data: np.ndarray, lay: ShardLayout, what: str, into: np.ndarray | None = None) -> np.ndarray:
    """One inner chunk's rows, decompressed into ``into`` (C-contiguous, ``chunk_nbytes``) if given."""
    body = _check_crc(data, what)
    # The Blosc header (16 bytes: version, flags, typesize, then uint32 nbytes, blocksize, cbytes)
    # is checked before decompressing: a forged one must not make us allocate what it claims.
    head = body[:16].tobytes()
    nbytes, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
    if len(head) < 16 or cbytes != len(body) or nbytes != lay.chunk_nbytes:
        raise ShardError(f"{what}: not a Blosc chunk of the {lay.chunk_nbytes} bytes the layout says")
    out = np.empty(lay.chunk_nbytes, dtype=np.uint8) if into is None else into.reshape(-1).view(np.uint8)
    try:
        blosc.decompress(body, out)
    except Exception as exc:
        raise ShardError(f"{what}: cannot be decompressed ({exc})") from None
    return out.view(lay.dtype).reshape(lay.chunk_rows, lay.width)


def _whole(lay: ShardLayout, chunks: np.ndarray) -> bool:
    # Nearly all of the shard wanted: one request for all of it. At "half" (as before), a block of
    # steps straddling shards fetched whole shards of rows it did not want, and the next block
    # fetched them again (more bytes than the store held, and 2× the peak memory at 1000 steps).
    return 10 * len(chunks) >= 9 * lay.chunks_per_shard


def _runs(idx: np.ndarray, chunks: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """Wanted inner chunks as runs of ``(offset, nbytes, chunk)``, merged when closer than ``_MERGE_GAP``."""
    wanted = sorted((int(idx[c, 0]), int(idx[c, 1]), int(c)) for c in chunks if idx[c, 0] != _EMPTY)
    runs: list[list[tuple[int, int, int]]] = []
    for w in wanted:
        if runs and w[0] - (runs[-1][-1][0] + runs[-1][-1][1]) <= _MERGE_GAP:
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def _pieces(runs, datas, key: str) -> dict[int, np.ndarray]:
    out = {}
    for run, data in zip(runs, datas):
        data = data if data is not None else np.empty(0, np.uint8)
        for off, n, c in run:
            piece = data[off - run[0][0]: off - run[0][0] + n]
            if len(piece) != n:
                raise ShardError(f"{key}: truncated (inner chunk {c} ends past the file); restore it from a backup")
            out[c] = piece
    return out


def _from_whole(raw: np.ndarray, lay: ShardLayout, chunks: np.ndarray, key: str) -> dict[int, np.ndarray]:
    idx = _parse_index(raw[len(raw) - lay.index_nbytes:], lay, len(raw), key)
    return {int(c): raw[int(idx[c, 0]): int(idx[c, 0] + idx[c, 1])] for c in chunks if idx[c, 0] != _EMPTY}


async def _fetch(store, lay: ShardLayout, shard: int, chunks: np.ndarray) -> dict[int, np.ndarray] | None:
    """Raw inner chunks ``chunks`` of one shard (absent ones left out); ``None`` if there is no shard file."""
    key = lay.key(shard)
    proto = default_buffer_prototype()
    if _whole(lay, chunks):
        buf = await store.get(key, proto)
        return None if buf is None else _from_whole(buf.as_numpy_array(), lay, chunks, key)
    buf = await store.get(key, proto, SuffixByteRequest(lay.index_nbytes))
    if buf is None:
        return None
    runs = _runs(_parse_index(buf.as_numpy_array(), lay, None, key), chunks)
    bufs = await asyncio.gather(*(store.get(key, proto, RangeByteRequest(r[0][0], r[-1][0] + r[-1][1]))
                                  for r in runs))
    return _pieces(runs, [None if b is None else b.as_numpy_array() for b in bufs], key)


def _pread(fd: int, start: int, stop: int) -> np.ndarray:
    """Bytes ``[start, stop)`` of an open file (fewer at its end), read into a fresh buffer."""
    buf = np.empty(max(0, stop - start), np.uint8)
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [memoryview(buf)[got:]], start + got)
        if n == 0:
            break
        got += n
    return buf[:got]


def _fetch_local(root: Path, lay: ShardLayout, shard: int, chunks: np.ndarray) -> tuple[dict[int, np.ndarray] | None, int]:
    """``_fetch`` for a local store's file, and the bytes it read."""
    key = lay.key(shard)
    try:
        fd = os.open(root / key, os.O_RDONLY)
    except FileNotFoundError:
        return None, 0
    try:
        size = os.fstat(fd).st_size
        if _whole(lay, chunks):
            raw = _pread(fd, 0, size)
            if len(raw) != size:
                raise ShardError(f"{key}: changed size while it was read; read it again")
            return _from_whole(raw, lay, chunks, key), size
        tail = _pread(fd, max(0, size - lay.index_nbytes), size)
        runs = _runs(_parse_index(tail, lay, None, key), chunks)
        datas = [_pread(fd, r[0][0], r[-1][0] + r[-1][1]) for r in runs]
        return _pieces(runs, datas, key), len(tail) + sum(len(d) for d in datas)
    finally:
        os.close(fd)


def read_rows(store, layouts: list[ShardLayout], rows: np.ndarray,
              root: Path | None = None) -> list[np.ndarray | BaseException]:
    """Rows ``rows`` (sorted, below every layout's length) of each array, decoded: one
    ``(len(rows), width)`` array per layout, or the exception that reading it raised.

    ``root``: the directory of ``store`` when it is a local one; its files are then read with
    ``pread`` and the bytes added to ``store.bytes_read`` (the byte-counting wrapper's count).

    Rows in absent shards or absent inner chunks are zeros (Zarr's fill value); the caller
    checks that recorded rows' shards exist (FORMAT.md "Chunks that must exist").
    """
    shard_of = rows // np.array([lay.shard_rows for lay in layouts])[:, None] if layouts else None
    jobs = []  # (layout index, shard, inner chunk ids)
    for i, lay in enumerate(layouts):
        for shard in np.unique(shard_of[i]):
            local = rows[shard_of[i] == shard] - shard * lay.shard_rows
            jobs.append((i, int(shard), np.unique(local // lay.chunk_rows)))

    if root is not None and jobs:  # pread on this thread and the pool: no event-loop hop per file
        got = map_shared(_capture(lambda job: _fetch_local(root, layouts[job[0]], job[1], job[2]), True), jobs)
        fetched = [g if isinstance(g, BaseException) else g[0] for g in got]
        if hasattr(store, "bytes_read"):  # the byte-counting wrapper: count them as its reads
            store.bytes_read += sum(g[1] for g in got if not isinstance(g, BaseException))
    else:
        async def fetch_all():
            return await asyncio.gather(*(_fetch(store, layouts[i], s, c) for i, s, c in jobs), return_exceptions=True)

        fetched = sync(fetch_all()) if jobs else []
    # Not zero-filled: every row is written by its chunk's decompression or zeroed below. Zeroing
    # the outputs first cost 54 ms of 450 (100 steps of benchmarks/readpath.py's MLP), on the
    # thread that reads the next block while this one is summed.
    outs: list[np.ndarray | BaseException] = [np.empty((len(rows), lay.width), lay.dtype) for lay in layouts]
    filled = [np.zeros(len(rows), dtype=bool) for _ in layouts]
    tasks = []
    for (i, shard, _), got in zip(jobs, fetched):
        if isinstance(got, BaseException):
            outs[i] = got
        elif got:
            tasks.extend((i, shard, c, data) for c, data in got.items())

    def decode(task) -> None:
        i, shard, c, data = task
        lay, out = layouts[i], outs[i]
        if isinstance(out, BaseException):
            return
        first = shard * lay.shard_rows + c * lay.chunk_rows
        lo, hi = np.searchsorted(rows, [first, first + lay.chunk_rows])
        what = f"{lay.key(shard)} inner chunk {c}"
        if hi - lo == lay.chunk_rows:  # every row of the chunk wanted (always, for one-row chunks):
            _decompress(data, lay, what, out[lo:hi])  # straight into place, no temporary and no copy
        else:
            chunk = _decompress(data, lay, what)
            out[lo:hi] = chunk[rows[lo:hi] - first]
        filled[i][lo:hi] = True  # tasks of one array cover disjoint rows

    for task, err in zip(tasks, map_shared(_capture(decode), tasks)):
        if err is not None and not isinstance(outs[task[0]], BaseException):
            outs[task[0]] = err
    for out, done in zip(outs, filled):
        if not isinstance(out, BaseException) and not done.all():
            out[~done] = 0  # rows in absent shards or inner chunks: Zarr's fill value
    return outs


def _capture(fn, result: bool = False):
    """``fn`` returning the exception it raised (reported per array, so the caller names the layer)
    instead of raising; on success ``fn``'s result if ``result`` else None."""
    def run(task):
        try:
            out = fn(task)
        except Exception as exc:
            return exc
        return out if result else None
    return run


_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _compressor(lay: ShardLayout):
    from numcodecs import Blosc

    c = dict(lay.blosc_config)
    return Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=_SHUFFLE[c["shuffle"]], blocksize=c["blocksize"],
                 typesize=c["typesize"])


def _with_crc(data: bytes) -> bytes:
    return data + google_crc32c.value(data).to_bytes(4, "little")


def write_shards(store, items: list[tuple[ShardLayout, int, np.ndarray]], *, parallel: bool = True) -> None:
    """Write each ``(layout, first_row, rows)``: ``rows`` (``n × width``, ``first_row`` a shard's first
    row, ``n`` ≤ its rows) become that whole shard file. Every inner chunk holding one of the rows is
    written (zeros too, as with ``write_empty_chunks``; the last padded with zeros), later ones are
    absent. Compression runs on the calling thread and the pool (``parallel``; else on the calling
    thread only); the puts go out together."""
    jobs = []  # (item, chunk index, bytes to compress)
    for i, (lay, first, rows) in enumerate(items):
        if first % lay.shard_rows or len(rows) > lay.shard_rows or rows.shape[1:] != (lay.width,):
            raise ValueError(f"{lay.path}: rows {first}..{first + len(rows)} are not the start of a shard")
        data = np.ascontiguousarray(rows, dtype=lay.dtype)
        for c in range(-(-len(rows) // lay.chunk_rows)):
            part = data[c * lay.chunk_rows: (c + 1) * lay.chunk_rows]
            if len(part) < lay.chunk_rows:  # the fill value beyond the last row
                part = np.concatenate([part, np.zeros((lay.chunk_rows - len(part), lay.width), lay.dtype)])
            jobs.append((i, c, part))
    compressors = [_compressor(lay) for lay, _, _ in items]
    compress = lambda job: _with_crc(compressors[job[0]].encode(job[2].view(np.uint8).reshape(-1)))  # noqa: E731
    blobs = map_shared(compress, jobs) if parallel else [compress(job) for job in jobs]
    files: list[list[bytes]] = [[] for _ in items]
    index = [np.full((lay.chunks_per_shard, 2), _EMPTY, dtype="<u8") for lay, _, _ in items]
    offsets = [0] * len(items)
    for (i, c, _), blob in zip(jobs, blobs):
        index[i][c] = (offsets[i], len(blob))
        offsets[i] += len(blob)
        files[i].append(blob)
    proto = default_buffer_prototype()

    async def put_all() -> None:
        await asyncio.gather(*(
            store.set(lay.key(first // lay.shard_rows),
                      proto.buffer.from_bytes(b"".join(files[i]) + _with_crc(index[i].tobytes())))
            for i, (lay, first, _) in enumerate(items)))

    if items:
        sync(put_all())
