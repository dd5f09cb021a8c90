"""A throwaway PostgreSQL cluster on 127.0.0.1 and a free port, for a Prefect server that does
not use SQLite.

`initdb` makes a cluster in a fresh temporary directory (trust auth, user `prefect`, no fsync),
`postgres` serves it as a `ManagedProcess` (stopped with SIGINT, PostgreSQL's "fast"
shutdown, then SIGKILL), `createdb` makes database `prefect`; the directory is removed on
stop. As root, the server programs run as the `postgres` user (PostgreSQL refuses root).

Where the programs come from is a `PostgresBinaries`: `PostgresBinaries.find()` takes them
from PATH, else from Debian's /usr/lib/postgresql/<version>/bin; another source (a wheel that
ships a server, say) only has to produce one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from wan_tasks.devstack.processes import HOST, ManagedProcess, free_port, wait_until
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

_PROGRAMS = ("initdb", "postgres", "pg_isready", "createdb")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")


@dataclass(frozen=True)
class PostgresBinaries:
    """Where initdb, postgres, pg_isready and createdb are."""

    initdb: str
    postgres: str
    pg_isready: str
    createdb: str

    @classmethod
    def in_dir(cls, bin_dir: Path) -> PostgresBinaries | None:
        paths = [bin_dir / name for name in _PROGRAMS]
        if not all(p.is_file() and os.access(p, os.X_OK) for p in paths):
            return None
        return cls(*(str(p) for p in paths))

    @classmethod
    def find(cls) -> PostgresBinaries | None:
        """From PATH, else the newest Debian install; None if there is none."""
        on_path = [shutil.which(name) for name in _PROGRAMS]
        if all(on_path):
            return cls(*(str(p) for p in on_path))
        versions = sorted(
            (d for d in _DEBIAN_ROOT.glob("*/bin") if d.parent.name.isdigit()),
            key=lambda d: int(d.parent.name),
            reverse=True,
        )
        for bin_dir in versions:
            if (found := cls.in_dir(bin_dir)) is not None:
                return found
        return None


class PostgresServer:
    """A PostgreSQL cluster for the block; `url` is an asyncpg URL for Prefect.

    with PostgresServer() as pg:
        PrefectServer(home, database_url=pg.url)
    """

    def __init__(
        self,
        *,
        binaries: PostgresBinaries | None = None,
        startup_timeout: float = 60.0,
        max_connections: int = 200,
    ) -> None:
        self.binaries = binaries
        self.startup_timeout = startup_timeout
        self.max_connections = max_connections
        self.url = ""
        self.port = 0
        self.process: ManagedProcess | None = None
        self._dir: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @staticmethod
    def available() -> bool:
        return PostgresBinaries.find() is not None

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def start(self) -> Self:
        bins = self.binaries or PostgresBinaries.find()
        if bins is None:
            raise LocalServiceError(
                "PostgreSQL not found: need initdb, postgres, pg_isready "
                f"and createdb on PATH or in {_DEBIAN_ROOT}/<version>/bin"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="wan-pg-"))
        try:
            if os.geteuid() == 0:
                shutil.chown(self._dir, "postgres", "postgres")
            data, self.port = self._dir / "data", free_port(HOST)
            done = subprocess.run(
                self._as_owner(
                    [bins.initdb, "-D", str(data), "-A", "trust", "-U", "prefect", "--no-sync"]
                ),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise LocalServiceError(
                    f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                )
            self.process = ManagedProcess(
                "postgres",
                self._as_owner(
                    [
                        bins.postgres,
                        "-D",
                        str(data),
                        "-h",
                        HOST,
                        "-p",
                        str(self.port),
                        "-k",
                        str(self._dir),
                        "-c",
                        f"max_connections={self.max_connections}",
                    ]
                ),
                log=self._dir / "postgres.log",
                stop_signal=signal.SIGINT,
                stop_timeout=25.0,
            )

            def ready() -> bool:
                return (
                    subprocess.run(
                        [bins.pg_isready, "-h", HOST, "-p", str(self.port)],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    ).returncode
                    == 0
                )

            wait_until("accepting connections", ready, self.process, timeout=self.startup_timeout)
            done = subprocess.run(
                [bins.createdb, "-h", HOST, "-p", str(self.port), "-U", "prefect", "prefect"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode != 0:
                raise LocalServiceError(f"createdb failed ({done.returncode}): {done.stderr}")
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+asyncpg://prefect@{HOST}:{self.port}/prefect"
        logger.info("PostgreSQL at %s:%d (pid %d)", HOST, self.port, self.process.pid)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        try:
            if process is not None:
                process.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            self.url = ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
