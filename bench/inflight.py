"""Memory, threads and CPU per prediction held in flight by one process.

    python -m bench.inflight [--sizes 1000,3000] [--latency 60] [--baseline-sizes 1000]

N predictions are submitted (not measured), then awaited all at once, in a fresh child
process per row, three ways:

- `await_prediction`: wan-tasks's async wait task, N task runs as coroutines in one flow run
  (what a batch's lanes do since 2026-12-02);
- `wait_for_prediction` in N threads: the sync task, a thread per wait (the lanes before);
- the plain client's `wait` in N threads, no Prefect: the floor for a thread per wait, and
  the SDK's shape (its `Client.run()` blocks a thread per video).

Columns: peak RSS above the process's RSS before the waits, per prediction; the most threads
alive; CPU-s per wait of the child process and of the Prefect server. The emulator (its own
process) renders once. Inference is long enough that the waits overlap; "waiting at once"
says how many did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, emit, hwm_mib, reset_hwm, rss_mib, run_script, table
from bench.stack import EmulatorProcess, flow_env, prefect_api
from wan_tasks.devstack.processes import run_child

logger = logging.getLogger("bench.inflight")
VARIANTS = {
    "await": "await_prediction, coroutines (wan-tasks)",
    "task-threads": "wait_for_prediction, a thread each (lanes before)",
    "client-threads": "client.wait, a thread each, no Prefect (baseline)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000", help="predictions awaited at once")
    parser.add_argument("--baseline-sizes", default="1000", help="sizes also run a thread per wait")
    parser.add_argument("--latency", type=float, default=60.0, help="emulated inference, s")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.n, args.latency)), flush=True)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    baseline = {int(s) for s in args.baseline_sizes.split(",") if s}
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-inflight-"))
    try:
        with prefect_api(workdir, postgres=args.postgres) as api:
            env = {**os.environ, "PREFECT_API_URL": api.url}
            env["BENCH_PREFECT_PID"] = str(api.pid or "")
            rows = []
            for n in sizes:
                variants = list(VARIANTS) if n in baseline else ["await"]
                for variant in variants:
                    env["PREFECT_HOME"] = str(workdir / f"home-{variant}-{n}")
                    rows.append(_run_child(variant, n, args.latency, env))
                    logger.info("%s x%d done", variant, n)
            _report(rows, args.latency, api.database)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_child(variant: str, n: int, latency: float, env: dict[str, str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.inflight", "--child", variant, "--n", str(n)]
    done = run_child(
        [*command, "--latency", str(latency)],
        env=env,
        timeout=3600,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"inflight child {variant} x{n} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _child(variant: str, n: int, latency: float) -> dict[str, Any]:
    from prefect import flow

    from wan_tasks.api.models import I2VRequest
    from wan_tasks.api.policies import PollPolicy
    from wan_tasks.core.submit import SubmittedVideo, submit_once
    from wan_tasks.integration import tasks
    from wan_tasks.integration.runtime import wavespeed_client

    poll = PollPolicy(first_poll_after=latency + 0.25, min_interval=5.0, max_interval=5.0)
    pids = {"prefect server": int(os.environ.get("BENCH_PREFECT_PID") or 0)}
    with (
        EmulatorProcess(latency_s=latency, concurrency=n, render_once=True) as emu,
        flow_env(emu, None),
    ):
        client = wavespeed_client()
        image = client.upload(Path(__file__).resolve().parents[1] / "wan_tasks/assets/sample.png")
        nonce = os.urandom(4).hex()

        def submit(i: int) -> SubmittedVideo:
            request = I2VRequest(image=image, prompt=f"bench inflight {nonce} {i}", seed=i)
            return submit_once(client, request)

        with ThreadPoolExecutor(16) as pool:
            submitted = list(pool.map(submit, range(n)))
        waiting = [0, 0]  # now, most at once
        lock = threading.Lock()
        threads = [threading.active_count()]

        def began() -> None:
            with lock:
                waiting[0] += 1
                waiting[1] = max(waiting)

        def ended() -> None:
            with lock:
                waiting[0] -= 1

        @flow
        async def await_all() -> int:
            async def one(s: SubmittedVideo) -> str:
                began()
                try:
                    return (await tasks.await_prediction(s, poll=poll, notices=False)).id
                finally:
                    ended()

            return len(await asyncio.gather(*(one(s) for s in submitted)))

        @flow
        def threads_all(prefect_tasks: bool) -> int:
            def one(s: SubmittedVideo) -> str:
                began()
                try:
                    if prefect_tasks:
                        return tasks.wait_for_prediction(s, poll=poll).id
                    time.sleep(
                        max(0.0, latency + 0.25 - (time.time() - s.submitted_at.timestamp()))
                    )
                    return client.wait(s.prediction_id, poll=poll).id
                finally:
                    ended()

            import contextvars

            with ThreadPoolExecutor(n) as pool:
                return len(
                    list(pool.map(lambda s: contextvars.copy_context().run(one, s), submitted))
                )

        sampling = threading.Event()

        def sample_threads() -> None:  # the most threads alive during the waits
            while not sampling.wait(0.5):
                threads.append(threading.active_count())

        sampler = threading.Thread(target=sample_threads, daemon=True)
        sampler.start()
        meter = CpuMeter(pids)
        before = rss_mib()
        hwm_ok = reset_hwm()
        with meter.measure():
            if variant == "await":
                got = asyncio.run(await_all())
            else:
                got = threads_all(variant == "task-threads")
        sampling.set()
        sampler.join()
    return {
        "variant": variant,
        "n": n,
        "done": got,
        "wall": meter.wall,
        "rss_before_mib": before,
        "peak_rss_mib": hwm_mib() if hwm_ok else math.nan,
        "max_threads": max(threads),
        "max_waiting": waiting[1],
        "cpu": meter.spent,
    }


def _report(rows: list[dict[str, Any]], latency: float, database: str) -> None:
    out = []
    for r in rows:
        n, cpu = r["n"], r["cpu"]
        grown = r["peak_rss_mib"] - r["rss_before_mib"]
        out.append(
            [
                n,
                VARIANTS[r["variant"]],
                f"{r['done']}/{n}",
                r["max_waiting"],
                r["peak_rss_mib"],
                grown * 1024 / n,
                r["max_threads"],
                cpu.get("bench process", 0.0) / n,
                cpu.get("prefect server", 0.0) / n,
            ]
        )
    text = table(
        [
            "predictions",
            "variant",
            "done",
            "waiting at once",
            "peak RSS MiB",
            "KiB per prediction",
            "most threads",
            "CPU-s/wait: process",
            "Prefect server",
        ],
        out,
    )
    text += (
        f"\n\nEmulated inference {latency:g} s (render once), first poll aimed at it, then every "
        f"5 s; Prefect server on {database}; each row a fresh process."
    )
    emit("inflight", f"In flight in one process ({database})", text, {"rows": rows})


if __name__ == "__main__":
    run_script(main, bench_log=logging.WARNING)
