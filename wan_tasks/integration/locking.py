"""A file lock manager whose locks do not outlive their process.

Prefect's FileSystemLockManager writes lock files with no expiry for task transactions. A
process killed inside a SERIALIZABLE transaction (kill -9, OOM, a lost machine) leaves its lock
file behind, and every later run of the same task waits on it forever. Measured here: a batch
killed during submit hung on its re-run until the lock files were removed by hand.

This manager stamps each lock with its host and pid and treats a lock whose process is gone as
free; locks from other hosts (a shared folder) fall back to a hold timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager

logger = logging.getLogger(__name__)

DEFAULT_HOLD_TIMEOUT_S = 900.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class CrashSafeFileLockManager(FileSystemLockManager):
    def __init__(
        self, lock_files_directory: Path, hold_timeout: float = DEFAULT_HOLD_TIMEOUT_S
    ) -> None:
        super().__init__(lock_files_directory)
        self.hold_timeout = hold_timeout
        self._host = socket.gethostname()

    def _stamp(self, key: str) -> None:
        path = self._lock_path_for_key(key)
        try:
            info = json.loads(path.read_bytes())
            info.update(host=self._host, pid=os.getpid())
            # Replaced atomically: a waiter reading the lock file while it is rewritten must
            # see the old content or the new, never an empty file (Prefect fails its task on
            # "EOF while parsing" otherwise; seen with identical concurrent submits).
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_bytes(json.dumps(info).encode())
            os.replace(tmp, path)
        except (OSError, ValueError):
            pass  # the lock still works; it just cannot be broken early

    def _holder_is_dead(self, key: str) -> bool:
        try:
            info = json.loads(self._lock_path_for_key(key).read_bytes())
        except (OSError, ValueError):
            return False
        pid = info.get("pid")
        return info.get("host") == self._host and isinstance(pid, int) and not _alive(pid)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        if self._holder_is_dead(key):
            logger.warning("breaking lock %s: its process died without releasing it", key[:24])
            self._lock_path_for_key(key).unlink(missing_ok=True)
            self._locks.pop(key, None)
            return False
        return True

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        got = super().acquire_lock(
            key,
            holder,
            acquire_timeout,
            hold_timeout if hold_timeout is not None else self.hold_timeout,
        )
        if got:
            self._stamp(key)
        return got

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        got = await super().aacquire_lock(
            key,
            holder,
            acquire_timeout,
            hold_timeout if hold_timeout is not None else self.hold_timeout,
        )
        if got:
            self._stamp(key)
        return got

    def __eq__(self, other: Any) -> bool:  # cache policies compare lock managers
        return (
            isinstance(other, CrashSafeFileLockManager)
            and other.lock_files_directory == self.lock_files_directory
        )

    def __hash__(self) -> int:
        return hash(self.lock_files_directory)
