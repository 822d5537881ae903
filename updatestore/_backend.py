"""Where a store lives: a local path, a ``.zip``, a URL or a Zarr Store → one Zarr store, byte counting, the lock."""

from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Any

import zarr
import zarr.errors
from zarr.storage import FsspecStore, LocalStore, WrapperStore, ZipStore

from ._lock import WriterLock
from .errors import ConfigError, NotAStoreError, StoreExistsError, StoreNotFoundError

__all__ = ["PathLike", "CountingStore", "RECORD_KEYS", "set_durable", "fsync_written", "resolve", "local_root", "take_lock", "prepare_new", "check_exists", "open_root", "refuse_symlinks"]

PathLike = str | os.PathLike | zarr.abc.store.Store

#: The records (group attributes) that vouch for data: the commit points of every write path.
RECORD_KEYS = frozenset(f"{g}/zarr.json" for g in ("steps", "owners", "index", "ledger", "lineage"))


class CountingStore(WrapperStore):
    """Counts the bytes zarr reads and writes through it (bytes read by unlearning; write amplification)."""

    def __init__(self, store: zarr.abc.store.Store) -> None:
        super().__init__(store)
        self.bytes_read = 0
        self.bytes_written = 0
        self.unsynced: set[str] | None = None  # keys written since the last fsync, when durability is on

    async def set(self, key, value):  # type: ignore[no-untyped-def]
        self.bytes_written += len(value)
        # With durability on, every record write is a commit: what it vouches for is fsynced
        # first, then the record itself (purge, ledger, rollback, owners, index alike).
        record = self.unsynced is not None and key in RECORD_KEYS
        if record:
            fsync_written(self)
        await self._store.set(key, value)
        if self.unsynced is not None:
            self.unsynced.add(key)
        if record:
            fsync_written(self)

    async def delete(self, key):  # type: ignore[no-untyped-def]
        await self._store.delete(key)
        if self.unsynced is not None:  # the directory entry's removal must be made durable too
            self.unsynced.add(key)

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await self._store.get(key, prototype, byte_range)
        if buf is not None:
            self.bytes_read += len(buf)
        return buf

    async def get_partial_values(self, prototype, key_ranges):  # type: ignore[no-untyped-def]
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        self.bytes_read += sum(len(b) for b in bufs if b is not None)
        return bufs


def set_durable(store: CountingStore, fsync: Any) -> None:
    """Turn durability on (``fsync=True``) for everything written through ``store``: see ``CountingStore.set``."""
    if not isinstance(fsync, bool):
        raise ConfigError(f"fsync must be True or False, got {fsync!r}")
    store.unsynced = set() if fsync else None


def fsync_written(store: zarr.abc.store.Store) -> None:
    """fsync every file written through ``store`` since the last call, then their directories.

    Zarr's local store writes through a temporary file and a rename but never fsyncs, so
    without this a power loss can lose or tear what a commit record vouches for. A no-op
    for other backends (object stores acknowledge a PUT once it is durable) and when
    durability is off.
    """
    root = local_root(store)
    if root is None or not isinstance(store, CountingStore) or store.unsynced is None:
        return
    keys, store.unsynced = store.unsynced, set()
    dirs = set()
    for key in keys:
        path = root / key
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # deleted (an empty chunk, or a shrink's chunks outside the shape, which
            parent = path.parent   # may never have existed): the nearest directory that exists holds it
            while parent != root and not parent.is_dir():
                parent = parent.parent
            dirs.add(parent)
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(path.parent)
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resolve(path: PathLike, *, read_only: bool,
            storage_options: dict[str, Any] | None = None) -> tuple[zarr.abc.store.Store, str]:
    """A Zarr store for a local path, a ``.zip`` file (read-only), a URL, or a Store as is;
    and the text that names it in messages."""
    if isinstance(path, zarr.abc.store.Store):
        return path, repr(path)
    text = str(os.fspath(path))
    if "://" in text and not text.startswith(LOCAL_SCHEMES):
        try:
            store = FsspecStore.from_url(text, storage_options=storage_options, read_only=read_only)
        except ImportError as exc:
            raise ConfigError(f"{text}: this URL needs fsspec and its backend ({exc}); e.g. pip install s3fs") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{text} is not a URL zarr can open: {exc}") from None
        if _is_local_fs(store):  # any fsspec local filesystem: the local store, with its lock and checks
            return LocalStore(store.path, read_only=read_only), text
        return store, text
    for scheme in LOCAL_SCHEMES:
        text = text.removeprefix(scheme)
    p = Path(text)
    if p.suffix == ".zip":
        if not read_only:
            raise ConfigError(f"{p}: zip stores are read-only here (a zip cannot replace the commit record in "
                              "place); record into a directory and zip it when it is finished")
        if not p.is_file():
            raise StoreNotFoundError(f"no update store at {p}: the file does not exist")
        return ZipStore(p, mode="r"), str(p)
    return LocalStore(p, read_only=read_only), str(p)


#: URL schemes that name a local path: opened as zarr's LocalStore (lock, symlink checks, fsync).
LOCAL_SCHEMES = ("file://", "local://")


def _is_local_fs(store: FsspecStore) -> bool:
    try:
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:  # pragma: no cover
        return False
    fs = getattr(store, "fs", None)
    fs = getattr(fs, "sync_fs", fs)  # zarr wraps a synchronous filesystem in AsyncFileSystemWrapper
    return isinstance(fs, LocalFileSystem)


def local_root(store: zarr.abc.store.Store) -> Path | None:
    """The directory of a local store (unwrapping a CountingStore), else None."""
    inner = store._store if isinstance(store, CountingStore) else store
    return inner.root if isinstance(inner, LocalStore) else None


def take_lock(store: zarr.abc.store.Store, owner: object) -> WriterLock | None:
    """Take the one-writer lock of a local store; released when ``owner`` is collected, at the latest."""
    root = local_root(store)
    if root is None:
        return None
    lock = WriterLock(root)
    lock.acquire()
    weakref.finalize(owner, lock.release)
    return lock


def prepare_new(store: zarr.abc.store.Store, where: str, overwrite: bool) -> bool:
    """Make room for a new store; returns whether zarr must still overwrite (non-local stores)."""
    root = local_root(store)
    if root is None or not root.exists():
        return overwrite
    if not overwrite and (root.is_file() or any(root.iterdir())):
        raise StoreExistsError(f"{where} already exists and is not empty; choose a new path, "
                               "open it with UpdateStore.open(path, 'r+'), or pass overwrite=True")
    if overwrite and root.is_file():
        raise StoreExistsError(f"{where} is a file, not an update store; overwrite=True replaces only an update "
                               "store. Choose another path")
    if overwrite and any(root.iterdir()):
        if not is_update_store(root):
            raise StoreExistsError(
                f"{where} is not empty and is not an update store (no zarr.json with update-store metadata); "
                "overwrite=True replaces only an update store. Choose another path, or delete it yourself")
        probe = WriterLock(root)  # never overwrite a store someone is writing
        probe.acquire()
        probe.release()
        shutil.rmtree(root)
    return False


def is_update_store(root: Path) -> bool:
    """Whether directory ``root`` holds an update store's root metadata (checked before deleting it)."""
    try:
        meta = json.loads((root / "zarr.json").read_text())
        return meta.get("attributes", {}).get("updatestore", {}).get("format") == "updatestore"
    except (OSError, ValueError, AttributeError):
        return False


def check_exists(store: zarr.abc.store.Store, where: str) -> None:
    """For a local store: the directory exists and holds a Zarr group, or a clear error."""
    root = local_root(store)
    if root is not None and not root.exists():
        raise StoreNotFoundError(f"no update store at {where}: the path does not exist; "
                                 "create one with UpdateStore.create(path, model)")
    if root is not None and not (root / "zarr.json").is_file():
        raise NotAStoreError(f"{where} is not an update store (no zarr.json in it); "
                             "check the path, or create one with UpdateStore.create(path, model)")
    if root is not None:
        refuse_symlinks(root, where)


def refuse_symlinks(root: Path, where: str) -> None:
    """A store never holds symbolic links: one could make reads come from another run's data, or a
    purge or ledger write land outside the store. (The store's own directory may be a link.)"""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink():
                raise NotAStoreError(f"{where}: {path.relative_to(root)} is a symbolic link (to "
                                     f"{os.readlink(path)}); a store holds none. Replace it with the data itself")


def open_root(store: zarr.abc.store.Store, where: str, mode: str) -> zarr.Group:
    """The store's root group through a byte-counting wrapper (``mode``: zarr's "r", "r+", "w", "w-")."""
    try:
        return zarr.open_group(CountingStore(store), mode=mode, zarr_format=3)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as exc:
        raise StoreExistsError(f"{where} already holds Zarr data; pass overwrite=True to replace it") from exc
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreNotFoundError(f"no update store at {where}") from exc
    except (ValueError, TypeError, KeyError) as exc:
        raise NotAStoreError(f"{where} is not a readable update store: {exc}") from exc
