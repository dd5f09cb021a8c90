"""A real `prefect server start` as a child process, on 127.0.0.1 and a free port.

The server gets its own PREFECT_HOME (its SQLite database lives there unless a database URL is
given), analytics off, no inherited PREFECT_* settings (no profile from ~/.prefect leaks in),
and is stopped through its `ManagedProcess`. Startup waits for /api/health; a fresh database
runs its migrations first, which on a loaded 2-core machine can take minutes, hence the long
default timeout. Nothing here imports Prefect: clients read `client_env()` before their first
`import prefect`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

from wan_tasks.devstack.processes import (
    HOST,
    ManagedProcess,
    free_port,
    port_taken,
    wait_for_http,
)
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 180.0
# For a server that records batches (the stack's; the CLI's temporary one). Prefect's
# task-run recorder writes each task-run state event in a transaction of its own by default
# (batch size 1): with three task runs a video that was ~85% of a batch's server CPU, and one
# server process fell behind at ~6-7 videos a second. In batches of 100, flushed at least
# every second (the UI shows a state at most ~1 s late), the same work costs about a quarter
# (BENCHMARKS.md, "Prefect's floor"). Official settings; users of their own server set them.
BATCH_SERVER_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}
_PORT_RETRIES = 2


def executable(name: str) -> str:
    """A console script of this environment, also when the venv is not activated."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise LocalServiceError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


def clean_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without PREFECT_* settings (and without `drop`)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in drop}


class PrefectServer:
    """`prefect server start` on a free loopback port (or one on `host`), in PREFECT_HOME
    `home`.

        with PrefectServer(tmp / "prefect") as server:
            env = {**os.environ, **server.client_env()}

    `launch()` starts the process and returns at once; `wait_until_ready()` waits for health
    (and relaunches on a fresh port if the chosen one was taken meanwhile); `start()` does
    both, as does entering the context. `stop()` (or leaving it) stops the process group.

    `env` adds server settings (PREFECT_SERVER_*); `base_env` replaces the inherited
    environment (default: this process's, minus PREFECT_*).
    """

    def __init__(
        self,
        home: Path,
        *,
        database_url: str | None = None,
        ui: bool = False,
        env: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
        log: Path | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        stop_timeout: float = 20.0,
        name: str = "prefect-server",
        host: str = HOST,
    ) -> None:
        self.home = Path(home)
        # Another address than loopback: a test host's in a network namespace (launched and
        # waited for from inside that namespace).
        self.host = host
        self.database_url = database_url
        self.ui = ui
        self.extra_env = dict(env or {})
        self.base_env = dict(base_env) if base_env is not None else None
        self.log = Path(log) if log is not None else self.home / "server.log"
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.name = name
        self.port = 0
        self.startup_s = 0.0
        self.process: ManagedProcess | None = None
        self._began = 0.0

    @property
    def url(self) -> str:
        """The server's root (the UI, when on)."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api" if self.port else ""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def client_env(self, home: Path | None = None) -> dict[str, str]:
        """The settings a client process needs for this server (and its own `home`)."""
        env = {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        if home is not None:
            env["PREFECT_HOME"] = str(home)
        return env

    def server_env(self) -> dict[str, str]:
        env = dict(self.base_env) if self.base_env is not None else clean_env()
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false",
        )
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    # -- lifecycle ------------------------------------------------------------------------

    def launch(self) -> Self:
        if self.process is not None and self.process.alive():
            raise LocalServiceError(f"{self.name} is already running (pid {self.process.pid})")
        self.home.mkdir(parents=True, exist_ok=True)
        if not self._began:
            self._began = time.perf_counter()
        self.port = free_port(self.host)
        cmd = [
            executable("prefect"),
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ui" if self.ui else "--no-ui",
            "--analytics-off",
        ]
        self.process = ManagedProcess(
            self.name, cmd, log=self.log, env=self.server_env(), stop_timeout=self.stop_timeout
        )
        return self

    def wait_until_ready(self) -> Self:
        retries = _PORT_RETRIES
        while True:
            assert self.process is not None, "launch() first"
            try:
                wait_for_http(f"{self.api_url}/health", self.process, timeout=self.startup_timeout)
                break
            except LocalServiceError:
                # The free port found can be taken before the server binds it.
                if not (retries and port_taken(self.process)):
                    raise
                retries -= 1
                logger.info("port %d was taken before %s bound it; retrying", self.port, self.name)
                self.launch()
        self.startup_s = time.perf_counter() - self._began
        logger.info(
            "%s at %s in %.1fs (pid %d)", self.name, self.api_url, self.startup_s, self.process.pid
        )
        return self

    def start(self) -> Self:
        try:
            return self.launch().wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        self._began = 0.0
        if process is not None:
            process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
