"""Locks of dead processes must not block the next run (Prefect's own file locks never expire)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

from wan_tasks.integration.locking import CrashSafeFileLockManager

TAKE_AND_DIE = (
    "import os, sys; from pathlib import Path; "
    "from wan_tasks.integration.locking import CrashSafeFileLockManager as M; "
    "assert M(Path(sys.argv[1])).acquire_lock('submit-key', 'holder-a'); os._exit(0)"
)


def _die_holding_lock(folder: Path) -> None:
    subprocess.run([sys.executable, "-c", TAKE_AND_DIE, str(folder)], check=True)
    assert (folder / "submit-key.lock").exists()


def test_lock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    _die_holding_lock(tmp_path)
    assert CrashSafeFileLockManager(tmp_path).acquire_lock("submit-key", "b", acquire_timeout=2)


def test_prefects_own_manager_would_wait_forever(tmp_path: Path) -> None:
    # Why the crash-safe manager exists; if Prefect fixes this, this test says so.
    _die_holding_lock(tmp_path)
    assert not FileSystemLockManager(tmp_path).acquire_lock("submit-key", "b", acquire_timeout=1)


def test_lock_of_a_live_holder_is_respected(tmp_path: Path) -> None:
    first = CrashSafeFileLockManager(tmp_path)
    assert first.acquire_lock("k", "a")
    assert not CrashSafeFileLockManager(tmp_path).acquire_lock("k", "b", acquire_timeout=0.5)
    first.release_lock("k", "a")
    assert CrashSafeFileLockManager(tmp_path).acquire_lock("k", "b", acquire_timeout=0.5)
