"""Workers: one batch fanned out over a process work pool with 1, 2 and 3 workers, against the
SDK pool and one process, measured in the same run.

    python -m bench.workers [--videos 600] [--shard-size 200] [--in-flight 50] [--latency 1]
                            [--workers 1,2,3] [--sqlite]

One Prefect server (PostgreSQL unless --sqlite), one SeaweedFS, one emulator (each distinct
input rendered once), a process work pool with a deployment of `generate-batch` from this
checkout. Rows: the SDK pool (`in_flight` threads, this process); `generate_batch` run through
the deployment with fan-out off (one flow-run process); the same batch fanned out into shards
of `shard_size` with 1, 2, 3 `prefect worker start` processes polling the pool. Each row is a
fresh batch (new prompts) with its own in-flight limit of `in_flight`, so every row has the
same account. Makespan is from `run_deployment` to the parent's final state, process starts
included; CPU is every process's (workers and their flow-run processes, the Prefect server
and its database, SeaweedFS, the emulator) over the row.

On one machine, the workers share its cores: what this shows is the fan-out's own cost and
that the limit holds; videos per second across machines scale with the cores they bring
(BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, emit, run_script, table
from bench.stack import BUCKET, ROOT, EmulatorProcess, flow_env, prefect_api, s3_store
from deployments.pool import deploy_generate_batch

logger = logging.getLogger("bench.workers")
POOL = NAME = "bench-workers"
DEPLOYMENT = f"generate-batch/{NAME}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--latency", type=float, default=1.0, help="emulated inference, s")
    parser.add_argument("--workers", default="1,2,3", help="comma-separated worker counts")
    parser.add_argument("--sqlite", action="store_true", help="Prefect server on SQLite")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    counts = [int(n) for n in args.workers.split(",") if n]
    workdir = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        with contextlib.ExitStack() as stack:
            api = stack.enter_context(prefect_api(workdir, postgres=not args.sqlite))
            endpoint, weed_pid = stack.enter_context(s3_store(workdir))
            emu = stack.enter_context(
                EmulatorProcess(
                    latency_s=args.latency, concurrency=args.in_flight, render_once=True
                )
            )
            stack.enter_context(flow_env(emu, endpoint))
            pids = {"prefect server": api.pid or 0, "seaweedfs": weed_pid or 0, "emulator": emu.pid}
            if api.db_pid:
                pids["postgres"] = api.db_pid
            deploy_generate_batch(POOL, NAME, ROOT)
            rows = [_sdk_row(args, emu, pids)]
            rows.append(_flow_row(args, emu, pids, workdir, workers=1, fan_out=False))
            for n in counts:
                rows.append(_flow_row(args, emu, pids, workdir, workers=n, fan_out=True))
            _report(rows, args, api.database)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _sdk_row(
    args: argparse.Namespace, emu: EmulatorProcess, pids: dict[str, int]
) -> dict[str, Any]:
    from bench.baseline import sdk_client, sdk_pool
    from wan_tasks.storage.archive import make_s3_client

    prompts = [f"bench workers sdk {uuid.uuid4().hex[:8]} {i}" for i in range(args.videos)]
    before = emu.stats()
    meter = CpuMeter(pids)
    with meter.measure():
        done = sdk_pool(
            sdk_client(emu.api_key, emu.base_url), make_s3_client(), prompts, threads=args.in_flight
        )
    return _row("official SDK pool (baseline)", meter, len(done), emu, before, args)


@contextlib.contextmanager
def _workers(n: int, workdir: Path) -> Iterator[list[Any]]:
    """`n` process workers on the pool, online; stopped through their handles."""
    from prefect.client.orchestration import get_client

    from wan_tasks.devstack.prefect_server import executable
    from wan_tasks.devstack.processes import ManagedProcess

    env = {
        **os.environ,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "WAN_TASKS_NO_EMBEDDED": "1",
        "WAN_TASKS_HOME": str(workdir / "wan-home"),
    }
    tag = uuid.uuid4().hex[:6]
    started: list[ManagedProcess] = []
    try:
        for i in range(n):
            name = f"bench-{tag}-{i}"
            cmd = [executable("prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
            started.append(
                ManagedProcess(
                    f"worker {name}",
                    [*cmd, "--name", name],
                    log=workdir / f"{name}.log",
                    env=env,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while True:
                online = {
                    w.name for w in client.read_workers_for_work_pool(POOL) if w.status == "ONLINE"
                }
                if sum(f"bench-{tag}-{i}" in online for i in range(n)) == n:
                    break
                for worker in started:
                    if not worker.alive():
                        raise worker.failure("exited")
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not come online")
                time.sleep(0.5)
        yield started
    finally:
        for worker in started:
            worker.stop()


def _flow_row(
    args: argparse.Namespace,
    emu: EmulatorProcess,
    pids: dict[str, int],
    workdir: Path,
    *,
    workers: int,
    fan_out: bool,
) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment

    from bench.flowrun import write_manifest
    from bench.stack import new_limits

    nonce = uuid.uuid4().hex[:8]
    prompts = [f"bench workers {nonce} {i}" for i in range(args.videos)]
    manifest = write_manifest(workdir / f"workers-{nonce}.jsonl", prompts)
    limits = new_limits(args.in_flight)
    params = {
        "manifest": manifest,
        "archive": {"contact_sheet": False, "prefix": f"workers-{nonce}"},
        "options": {
            "limits": limits.model_dump(mode="json"),
            "poll": {"first_poll_after": args.latency + 0.25},
        },
        "fan_out": {"enabled": fan_out, "shard_size": args.shard_size, "poll_interval_s": 1.0},
    }
    with _workers(workers, workdir) as started:
        worker_pids = {f"worker {i}": w.pid for i, w in enumerate(started)}
        before = emu.stats()
        meter = CpuMeter({**pids, **worker_pids})
        with meter.measure(), get_client(sync_client=True) as client:
            run = run_deployment(DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
            assert isinstance(run, FlowRun)
            while True:
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    break
                for worker in started:
                    if not worker.alive():
                        raise worker.failure("exited")
                time.sleep(0.5)
        if not run.state or not run.state.is_completed():
            raise RuntimeError(f"batch ended {run.state_name}; see {workdir}/*.log")
    archived = _archived(nonce)
    name = f"fan-out, {workers} worker{'s' * (workers > 1)}" if fan_out else "one flow-run process"
    return _row(name, meter, archived, emu, before, args)


def _archived(nonce: str) -> int:
    """This row's MP4s in the bucket (its archive prefix is its own)."""
    from wan_tasks.storage.archive import make_s3_client

    pages = make_s3_client().get_paginator("list_objects_v2")
    return sum(
        1
        for page in pages.paginate(Bucket=BUCKET, Prefix=f"workers-{nonce}/")
        for o in page.get("Contents", [])
        if o["Key"].endswith(".mp4")
    )


def _row(
    name: str,
    meter: CpuMeter,
    archived: int,
    emu: EmulatorProcess,
    before: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    stats = emu.stats()
    return {
        "name": name,
        "makespan": meter.wall,
        "archived": archived,
        "submissions": stats["submissions"] - before["submissions"],
        "max_in_flight": stats["max_in_flight"],
        "cpu": meter.spent,
        "cpu_total": sum(meter.spent.values()),
        "videos": args.videos,
    }


def _report(rows: list[dict[str, Any]], args: argparse.Namespace, database: str) -> None:
    sdk = rows[0]["makespan"]
    lines = []
    for row in rows:
        lines.append(
            [
                row["name"],
                f"{row['makespan']:.1f}",
                f"{args.videos / row['makespan']:.1f}",
                f"{100 * sdk / row['makespan']:.0f}%",
                f"{row['cpu_total'] / args.videos:.3f}",
                f"{row['submissions']}/{args.videos}",
                str(row["archived"]),
            ]
        )
    text = table(
        [
            "variant",
            "makespan s",
            "videos/s",
            "of SDK pool",
            "CPU-s/video all in",
            "submits",
            "archived",
        ],
        lines,
    )
    text += (
        f"\n\n{args.videos} videos, {args.in_flight} in flight, {args.latency:g} s inference, "
        f"shards of {args.shard_size}; Prefect server on {database}. Most tasks in flight at the "
        f"emulator over the run: {max(r['max_in_flight'] for r in rows)}."
    )
    emit("workers", "Fan-out over 1, 2 and 3 workers", text, {"rows": rows, **vars(args)})


if __name__ == "__main__":
    run_script(main)
