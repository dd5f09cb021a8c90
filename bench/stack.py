"""The servers a benchmark runs against, each on 127.0.0.1 and a free port, each stopped through
the handle that started it (context managers; also on errors and Ctrl-C).

- `PrefectServer`: `prefect server start` in its own process group, with its own PREFECT_HOME.
  `prefect_api()` reuses one named by $PREFECT_API_URL (as `bench.run_all` does) or starts one.
- `EmulatorProcess`: the WaveSpeed emulator in a child process (see `bench._emulator`).
- `s3_store()`: an embedded SeaweedFS with one bucket.
- `flow_env()`: the environment the flows read (WAVESPEED_*, AWS_*, WAN_TASKS_BUCKET).

Nothing here imports Prefect: a benchmark must set PREFECT_HOME and PREFECT_API_URL before the
first `import prefect`, which reads them once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from wan_tasks.integration.limits import LimitSettings
    from wan_tasks.storage.seaweed import S3Endpoint

logger = logging.getLogger("bench.stack")

BUCKET = "bench-videos"
_HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _stop_group(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM the child's process group, then SIGKILL if it lingers; always reap it."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("pid %d ignored SIGTERM for %.0fs; killing it", proc.pid, timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port (for a Prefect server that does
    not use SQLite). Needs `initdb` and `postgres` on PATH; as root it runs them as the
    `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self, *, startup_timeout: float = 60.0) -> None:
        self.startup_timeout = startup_timeout
        self.url = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @staticmethod
    def available() -> bool:
        return bool(shutil.which("initdb") and shutil.which("postgres"))

    def _as_owner(self, command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def __enter__(self) -> PostgresServer:
        self._dir = Path(tempfile.mkdtemp(prefix="wan-bench-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self._dir, "postgres", "postgres")
        data, port = self._dir / "data", free_port()
        try:
            subprocess.run(self._as_owner(["initdb", "-D", str(data), "-A", "trust", "-U",
                                           "prefect", "--no-sync"]),
                           check=True, capture_output=True, timeout=120)
            with (self._dir / "postgres.log").open("ab") as log:
                self._proc = subprocess.Popen(
                    self._as_owner(["postgres", "-D", str(data), "-h", _HOST, "-p", str(port),
                                    "-k", str(self._dir), "-c", "max_connections=200"]),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            deadline = time.monotonic() + self.startup_timeout
            while subprocess.run(["pg_isready", "-h", _HOST, "-p", str(port)],
                                 capture_output=True).returncode != 0:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start; see {self._dir}/postgres.log")
                time.sleep(0.2)
            subprocess.run(["createdb", "-h", _HOST, "-p", str(port), "-U", "prefect",
                            "prefect"], check=True, capture_output=True, timeout=60)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.url = f"postgresql+asyncpg://prefect@{_HOST}:{port}/prefect"
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:  # SIGINT: PostgreSQL's "fast" shutdown
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(20)
            _stop_group(self._proc, timeout=5)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class PrefectServer:
    """`prefect server start` (API, services, no UI) on a free loopback port; on SQLite in its
    PREFECT_HOME, or on `database_url`."""

    def __init__(self, home: Path, *, database_url: str | None = None,
                 startup_timeout: float = 180.0) -> None:
        self.home = home
        self.database_url = database_url
        self.startup_timeout = startup_timeout
        self.api_url = ""
        self.startup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __enter__(self) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        command = [str(Path(sys.executable).parent / "prefect"), "server", "start",
                   "--host", _HOST, "--port", str(port), "--no-ui", "--analytics-off"]
        began = time.perf_counter()
        with (self.home / "server.log").open("ab") as log:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        try:
            self.api_url = f"http://{_HOST}:{port}/api"
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.perf_counter() - began
        logger.info("Prefect server at %s in %.1fs", self.api_url, self.startup_s)
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prefect server exited ({self._proc.returncode}); "
                                   f"see {self.home / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server not healthy after {self.startup_timeout}s")
            time.sleep(0.2)

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            _stop_group(self._proc, timeout=20)
            self._proc = None


@dataclass(frozen=True)
class PrefectApi:
    url: str
    pid: int | None
    startup_s: float | None  # None: started by someone else, who did not say
    database: str  # "sqlite" or "postgresql"
    db_pid: int | None = None


def server_pids(api: PrefectApi) -> dict[str, int]:
    """Process groups to account CPU to, by name."""
    pids = {"prefect server": api.pid or 0}
    if api.db_pid:
        pids["postgres"] = api.db_pid
    return pids


@contextlib.contextmanager
def prefect_api(workdir: Path, *, postgres: bool = False) -> Iterator[PrefectApi]:
    """The Prefect server to use: $PREFECT_API_URL if set, else a new one for this block (on
    SQLite, or with `postgres` on a throwaway PostgreSQL).

    Also gives this process a fresh PREFECT_HOME under `workdir` (result storage, cache records
    and lock files), unless $BENCH_KEEP_PREFECT_HOME is set."""
    if "prefect" in sys.modules:
        raise RuntimeError("prefect_api() must run before prefect is imported")
    if not os.environ.get("BENCH_KEEP_PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(workdir / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    url = os.environ.get("PREFECT_API_URL")
    if url:
        pid, db_pid = os.environ.get("BENCH_PREFECT_PID"), os.environ.get("BENCH_DB_PID")
        startup = os.environ.get("BENCH_SERVER_STARTUP_S")
        yield PrefectApi(url, int(pid) if pid else None, float(startup) if startup else None,
                         os.environ.get("BENCH_PREFECT_DB", "sqlite"),
                         int(db_pid) if db_pid else None)
        return
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if postgres else None
        server = stack.enter_context(PrefectServer(workdir / "prefect-server",
                                                   database_url=pg.url if pg else None))
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            yield PrefectApi(server.api_url, server.pid, server.startup_s,
                             "postgresql" if pg else "sqlite", pg.pid if pg else None)
        finally:
            os.environ.pop("PREFECT_API_URL", None)


class EmulatorProcess:
    """The emulator in a child process. `stats()` reads its counters over HTTP."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.base_url = ""
        self.api_key = ""
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> EmulatorProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench._emulator", json.dumps(self.settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            stdout: IO[str] | None = self._proc.stdout
            assert stdout is not None
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"emulator exited ({self._proc.wait()}) before it was ready")
            info = json.loads(line)
            self.base_url, self.api_key = info["base_url"], info["api_key"]
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def stats(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.base_url}/_emulator/stats", timeout=10)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the child stops when its stdin closes
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            _stop_group(proc, timeout=10)
        finally:
            _stop_group(proc, timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()


@contextlib.contextmanager
def s3_store(workdir: Path) -> Iterator[tuple[S3Endpoint, int | None]]:
    """An embedded SeaweedFS with the bench bucket; yields (endpoint, weed pid)."""
    from wan_tasks.storage.seaweed import SeaweedFS

    with SeaweedFS(workdir / "seaweedfs", buckets=[BUCKET]) as weed:
        yield weed.endpoint, weed.pid


@contextlib.contextmanager
def flow_env(emulator: EmulatorProcess, endpoint: S3Endpoint | None) -> Iterator[None]:
    """Point the flows (and the SDK baseline) at this emulator and store, for the block
    (`endpoint` None: the AWS_* variables already set)."""
    values: dict[str, str | None] = {
        "WAVESPEED_API_KEY": emulator.api_key, "WAVESPEED_BASE_URL": emulator.base_url,
        "WAN_TASKS_BUCKET": BUCKET, "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None, **(endpoint.env() if endpoint else {}),
    }
    from wan_tasks.devstack.embedded import env_overrides

    with env_overrides(values):
        yield


def new_limits(in_flight: int, per_minute: int | None = None) -> LimitSettings:
    """Fresh, uniquely named limits on the Prefect server (benchmarks never share slots); the
    rate limit, like the flows' default, only when asked for."""
    from wan_tasks.integration.limits import LimitSettings, ensure_limits

    tag = uuid.uuid4().hex[:8]
    names = LimitSettings(in_flight=f"bench-{tag}-in-flight",
                          per_minute=f"bench-{tag}-per-minute" if per_minute else None)
    ensure_limits(in_flight, per_minute, names=names)
    return names
