"""The submit task's lock manager: chosen by the settings, crash-safe on one host or many.

`TASK_LOCKS` is what the submit task's cache policy holds. It picks the manager named by
`WAN_TASKS_LOCK_MANAGER` when a lock is taken (not when `wan_tasks` is imported, so a worker's
environment decides): `file` (the default) is `CrashSafeFileLockManager` under
`$PREFECT_HOME/wan-tasks-locks`, which serialises identical submits on one host; `redis` is
`redis_locking.RenewingRedisLockManager` on `WAN_TASKS_REDIS_URL`, which serialises them
across every host that shares that Redis (install `wan-tasks[redis]`).

A file lock manager whose locks do not outlive their process:

Prefect's FileSystemLockManager writes lock files with no expiry for task transactions. A
process killed inside a SERIALIZABLE transaction (kill -9, OOM, a lost machine) leaves its lock
file behind, and every later run of the same task waits on it forever. Measured here: a batch
killed during submit hung on its re-run until the lock files were removed by hand.

This manager stamps each lock with its host and pid and treats a lock whose process is gone as
free; locks from other hosts (a shared folder) fall back to a hold timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any

from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager

from wan_tasks import settings
from wan_tasks.core.ledger import process_alive
from wan_tasks.errors import ConfigurationError

logger = logging.getLogger(__name__)

DEFAULT_HOLD_TIMEOUT_S = 900.0


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
        return info.get("host") == self._host and isinstance(pid, int) and not process_alive(pid)

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


# -- the manager the settings name -----------------------------------------------------------

REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "rediss+sentinel://", "unix://")


def locks_dir() -> Path:
    """Where the file lock manager keeps its locks: `$PREFECT_HOME/wan-tasks-locks`."""
    from prefect.settings import get_current_settings

    path = Path(get_current_settings().home) / "wan-tasks-locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _redis_manager(url: str) -> LockManager:
    if not url.lower().startswith(REDIS_SCHEMES):
        scheme = url.partition("://")[0] if "://" in url else "no scheme"
        raise ConfigurationError(
            f"WAN_TASKS_REDIS_URL must start with one of {', '.join(REDIS_SCHEMES)} "
            f"(it starts with {scheme[:20]!r})"
        )
    try:
        from wan_tasks.integration.redis_locking import RenewingRedisLockManager
    except ImportError as exc:
        raise ConfigurationError(
            f"WAN_TASKS_LOCK_MANAGER=redis needs prefect-redis ({exc.name} is not installed): "
            "pip install 'wan-tasks[redis]'"
        ) from None
    manager = RenewingRedisLockManager(url)
    logger.info("submit locks: Redis at %s", manager.location)
    from prefect.settings import get_current_settings

    if not get_current_settings().results.default_storage_block:
        # The lock makes a second host wait; what it then reads is the first host's cached
        # result, which it can only find in storage both share.
        logger.warning(
            "WAN_TASKS_LOCK_MANAGER=redis serialises submits across hosts, but Prefect keeps "
            "task results (the submit cache) on this host's disk: set "
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK to an S3 block (e.g. s3-bucket/NAME) on "
            "every worker so the others find them"
        )
    return manager


class SettingsLockManager:
    """A Prefect lock manager that hands each call to the one the settings choose now.

    A lock is released (and its holder asked about) by the manager that took it, even if the
    settings changed in between. Managers are made once per configuration and kept.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._managers: dict[tuple[str, str], LockManager] = {}
        self._taken: dict[tuple[str, str], LockManager] = {}  # (key, holder) -> its manager

    def current(self) -> LockManager:
        """The manager the settings name (made on first use)."""
        config = settings.current()
        if config.lock_manager == "redis":
            if config.redis_url is None:
                raise ConfigurationError(
                    "WAN_TASKS_LOCK_MANAGER=redis needs WAN_TASKS_REDIS_URL "
                    "(redis://[:PASSWORD@]HOST:PORT/DB)"
                )
            url = config.redis_url.get_secret_value()
            # Keyed by a digest: the table never holds the URL (and its password) as a key.
            ident = ("redis", hashlib.sha256(url.encode()).hexdigest())
            with self._mutex:
                found = self._managers.get(ident)
            if found is None:
                found = _redis_manager(url)
        else:
            path = locks_dir()
            ident = ("file", str(path))
            with self._mutex:
                found = self._managers.get(ident)
            if found is None:
                found = CrashSafeFileLockManager(path)
        with self._mutex:
            return self._managers.setdefault(ident, found)

    def _taker(self, key: str, holder: str) -> LockManager:
        with self._mutex:
            taker = self._taken.get((key, holder))
        return taker if taker is not None else self.current()

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        manager = self.current()
        got = manager.acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if got:
            with self._mutex:
                self._taken[(key, holder)] = manager
        return got

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        manager = self.current()
        got = await manager.aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if got:
            with self._mutex:
                self._taken[(key, holder)] = manager
        return got

    def release_lock(self, key: str, holder: str) -> None:
        manager = self._taker(key, holder)
        manager.release_lock(key, holder)
        with self._mutex:
            self._taken.pop((key, holder), None)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.current().wait_for_lock(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await self.current().await_for_lock(key, timeout)

    def is_locked(self, key: str) -> bool:
        return self.current().is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._taker(key, holder).is_lock_holder(key, holder)

    def __repr__(self) -> str:
        return "TASK_LOCKS (the lock manager WAN_TASKS_LOCK_MANAGER names)"

    def __reduce__(self) -> str:
        return "TASK_LOCKS"  # pickled by reference: the receiving process reads its settings


TASK_LOCKS = SettingsLockManager()
