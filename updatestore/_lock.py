"""One writer per store: an OS lock (``flock``) on a lock file beside the data.

The kernel releases the lock when its holder exits, however it exits, so there is no
stale lock to detect and no takeover to race: liveness is never guessed from a pid
(which another PID namespace on the same host could reuse). The file itself is never
deleted (deleting it would let a second writer lock a new file while the first holds
the old one); it holds the current holder's pid, host and start time for messages.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from .errors import StoreLockedError

__all__ = ["WriterLock", "LOCK_NAME"]

LOCK_NAME = "updatestore.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<store>/updatestore.lock``, held until :meth:`release`.

    Filesystems without ``flock`` (some network or FUSE mounts) give a clear
    ``StoreLockedError`` rather than an unprotected writer.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            raise StoreLockedError(f"cannot lock {self.path}: this platform has no fcntl.flock")
        if self.path.is_symlink():
            raise StoreLockedError(f"{self.path} is a symbolic link; refusing to follow it for the writer lock")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise StoreLockedError(f"cannot open the writer lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = self._owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"cannot lock {self.path}: {exc.strerror} (the filesystem does not support flock); "
                    "record into a store on a local filesystem") from None
            who = (f"process {owner.get('pid')} on {owner.get('host')} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('since', 0)))}"
                   if owner else "another process")
            raise StoreLockedError(
                f"store {self.path.parent} is open for writing by {who}; close that handle first (the lock is "
                f"released when that process exits; do not delete {self.path})") from None
        # Ours now: say who holds it (for the message another writer gets).
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self._fd = fd
        self.held = True

    @staticmethod
    def _owner(fd: int) -> dict | None:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"null")
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held and self._fd is not None:
            fd, self._fd = self._fd, None
            self.held = False
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor releases the flock
