"""One writer per store: a lock file beside the data, recovered when its owner died."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import StoreLockedError

__all__ = ["WriterLock", "LOCK_NAME"]

LOCK_NAME = "updatestore.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriterLock:
    """``O_CREAT | O_EXCL`` lock file holding the owner's pid, host and start time.

    A lock left by a process that no longer runs on this host is stale and taken
    over (a crash must not lock the store forever); a live owner is refused.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: its writer died
                    continue
                who = (f"process {owner.get('pid')} on {owner.get('host')} since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('since', 0)))}"
                       if owner else "another process")
                raise StoreLockedError(
                    f"store {self.path.parent} is open for writing by {who}; close that handle first, or, "
                    f"if that process is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise StoreLockedError(f"could not take the writer lock {self.path}")  # pragma: no cover

    def _owner(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
