"""The servers a benchmark runs against, each on 127.0.0.1 and a free port, each stopped through
the handle that started it (context managers; also on errors and Ctrl-C). The processes are
`wan_tasks.devstack`'s; this module adds what benchmarks share:

- `bench_server()`: a `PrefectServer` (its own PREFECT_HOME, no UI, logging at WARNING).
  `prefect_api()` reuses one named by $PREFECT_API_URL (as `bench.run_all` does) or starts one.
- `EmulatorProcess`: the WaveSpeed emulator in a child process (see `bench._emulator`).
- `s3_store()`: an embedded SeaweedFS with one bucket.
- `flow_env()`: the environment the flows read (WAVESPEED_*, AWS_*, WAN_TASKS_BUCKET).

Nothing here imports Prefect: a benchmark must set PREFECT_HOME and PREFECT_API_URL before the
first `import prefect`, which reads them once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._emulator import RENDER_ONCE
from wan_tasks.devstack.emulator_process import EmulatorProcess as _EmulatorProcess
from wan_tasks.devstack.postgres import PostgresServer
from wan_tasks.devstack.prefect_server import PrefectServer

if TYPE_CHECKING:
    from wan_tasks.integration.limits import LimitSettings
    from wan_tasks.storage.seaweed import S3Endpoint

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench-videos"


def bench_server(
    home: Path, *, database_url: str | None = None, settings: dict[str, str] | None = None
) -> PrefectServer:
    """A Prefect server for benchmarks: API and services, no UI, logging at WARNING, and
    `settings` (PREFECT_SERVER_* variables) on top."""
    env = {"PREFECT_LOGGING_LEVEL": "WARNING", **(settings or {})}
    return PrefectServer(home, database_url=database_url, env=env)


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
def prefect_api(
    workdir: Path, *, postgres: bool = False, server_settings: dict[str, str] | None = None
) -> Iterator[PrefectApi]:
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
    if url and server_settings:
        raise RuntimeError("server settings are for a server started here; PREFECT_API_URL is set")
    if url:
        pid, db_pid = os.environ.get("BENCH_PREFECT_PID"), os.environ.get("BENCH_DB_PID")
        startup = os.environ.get("BENCH_SERVER_STARTUP_S")
        yield PrefectApi(
            url,
            int(pid) if pid else None,
            float(startup) if startup else None,
            os.environ.get("BENCH_PREFECT_DB", "sqlite"),
            int(db_pid) if db_pid else None,
        )
        return
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if postgres else None
        server = stack.enter_context(
            bench_server(
                workdir / "prefect-server",
                database_url=pg.url if pg else None,
                settings=server_settings,
            )
        )
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            yield PrefectApi(
                server.api_url,
                server.pid,
                server.startup_s,
                "postgresql" if pg else "sqlite",
                pg.pid if pg else None,
            )
        finally:
            os.environ.pop("PREFECT_API_URL", None)


class EmulatorProcess(_EmulatorProcess):
    """The emulator in a child process (`wan_tasks.devstack`'s, through `bench._emulator`
    for the bench option `render_once`). `stats()` reads its counters over HTTP."""

    def __init__(self, *, render_once: bool = False, **settings: Any) -> None:
        command = [sys.executable, "-m", "bench._emulator"]
        super().__init__(
            command=[*command, RENDER_ONCE] if render_once else command, cwd=ROOT, **settings
        )

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid


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
        "WAVESPEED_API_KEY": emulator.api_key,
        "WAVESPEED_BASE_URL": emulator.base_url,
        "WAN_TASKS_BUCKET": BUCKET,
        "AWS_PROFILE": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None,
        **(endpoint.env() if endpoint else {}),
    }
    from wan_tasks.devstack.embedded import env_overrides

    with env_overrides(values):
        yield


def new_limits(in_flight: int, per_minute: int | None = None) -> LimitSettings:
    """Fresh, uniquely named limits on the Prefect server (benchmarks never share slots); the
    rate limit, like the flows' default, only when asked for."""
    from wan_tasks.integration.limits import LimitSettings, ensure_limits

    tag = uuid.uuid4().hex[:8]
    names = LimitSettings(
        in_flight=f"bench-{tag}-in-flight",
        per_minute=f"bench-{tag}-per-minute" if per_minute else None,
    )
    ensure_limits(in_flight, per_minute, names=names)
    return names
