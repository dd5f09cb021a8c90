"""Growth: makespan, memory and CPU per video at 10, 100 and 1000 videos, for generate_batch and
for the SDK baseline, with a short emulated inference (1 s) and a high in-flight limit (50).

    python -m bench.growth [--quick] [--sizes 10,100,1000] [--latency 1] [--in-flight 50]
                           [--real-render]

Each size and variant runs in a fresh child process (so its peak RSS is its own) with a
fresh PREFECT_HOME, against one Prefect server and one SeaweedFS. The emulator renders each
distinct duration once (`render_once`, see bench/_emulator.py): rendering 1000 real MP4s
costs ~0.4 CPU-s each on this machine and would measure the emulator; `--real-render` turns
that off.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    CpuMeter,
    cpu_seconds,
    emit,
    hwm_mib,
    reset_hwm,
    rss_mib,
    run_script,
    table,
)
from bench.stack import BUCKET, EmulatorProcess, flow_env, prefect_api, s3_store
from wan_tasks.devstack.processes import run_child

logger = logging.getLogger("bench.growth")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10 and 30 only")
    parser.add_argument("--sizes", help="comma-separated batch sizes (default 10,100,1000)")
    parser.add_argument("--latency", type=float, default=1.0, help="emulated inference, s")
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--real-render", action="store_true")
    parser.add_argument(
        "--contact-sheets",
        action="store_true",
        help="archive a contact sheet per video (the flows' default; the SDK baseline makes "
        "none, so the comparison leaves them off: a sheet decodes the whole MP4)",
    )
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK baseline")
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the Prefect floor (three no-op task runs a video, bench/floor.py)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run the Prefect server on PostgreSQL instead of SQLite",
    )
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        type=_setting,
        metavar="NAME=VALUE",
        help="a setting for the Prefect server this starts (repeatable), e.g. "
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE=100",
    )
    parser.add_argument("--child", choices=("flow", "sdk", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("--videos", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(
            json.dumps(
                _child(
                    args.child,
                    args.videos,
                    args.latency,
                    args.in_flight,
                    not args.real_render,
                    contact_sheets=args.contact_sheets,
                )
            ),
            flush=True,
        )
        return
    sizes = [int(s) for s in (args.sizes or ("10,30" if args.quick else "10,100,1000")).split(",")]
    settings = dict(kv.split("=", 1) for kv in args.server_setting)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-growth-"))
    try:
        with (
            prefect_api(
                workdir,
                postgres=args.postgres,
                server_settings=settings,
            ) as api,
            s3_store(workdir) as (endpoint, weed_pid),
        ):
            env = {
                **os.environ,
                **endpoint.env(),
                "PREFECT_API_URL": api.url,
                "BENCH_PREFECT_DB": api.database,
                "BENCH_PREFECT_PID": str(api.pid or ""),
                "BENCH_DB_PID": str(api.db_pid or ""),
            }
            rows: list[dict[str, Any]] = []
            for size in sizes:
                variants = [
                    v
                    for v, skip in (("sdk", args.no_sdk), ("floor", args.no_floor), ("flow", False))
                    if not skip
                ]
                for variant in variants:
                    env["PREFECT_HOME"] = str(workdir / f"home-{variant}-{size}")
                    weed0 = cpu_seconds(weed_pid or 0)
                    result = _run_child(variant, size, args, env)
                    result["cpu"]["seaweedfs"] = cpu_seconds(weed_pid or 0) - weed0
                    result["server_rss_mib"] = rss_mib(api.pid) if api.pid else math.nan
                    rows.append(result)
                    logger.info("%s x%d: %.1fs", variant, size, result["makespan"])
            _report(
                rows, args.latency, args.in_flight, not args.real_render, api.database, settings
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _setting(text: str) -> str:
    name, eq, _ = text.partition("=")
    if not eq or not name.startswith("PREFECT_SERVER_"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected PREFECT_SERVER_...=VALUE")
    return text


def _run_child(
    variant: str, videos: int, args: argparse.Namespace, env: dict[str, str]
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.growth",
        "--child",
        variant,
        "--videos",
        str(videos),
        "--latency",
        str(args.latency),
        "--in-flight",
        str(args.in_flight),
    ]
    if args.real_render:
        command.append("--real-render")
    if args.contact_sheets:
        command.append("--contact-sheets")
    done = run_child(
        command,
        env=env,
        timeout=3600,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"growth child {variant} x{videos} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _child(
    variant: str,
    videos: int,
    latency: float,
    in_flight: int,
    render_once: bool,
    *,
    contact_sheets: bool = False,
) -> dict[str, Any]:
    from bench.baseline import sdk_client, sdk_pool
    from bench.flowrun import PrefectRetries, call_flow, read_spans, write_manifest
    from bench.stack import new_limits
    from wan_tasks.api.policies import PollPolicy
    from wan_tasks.flows.generate import generate_batch
    from wan_tasks.flows.options import ArchiveOptions, RunOptions

    nonce = uuid.uuid4().hex[:8]
    retries = PrefectRetries.install()
    pids = {"prefect server": int(os.environ.get("BENCH_PREFECT_PID") or 0)}
    if os.environ.get("BENCH_DB_PID"):
        pids["postgres"] = int(os.environ["BENCH_DB_PID"])
    with (
        EmulatorProcess(latency_s=latency, concurrency=in_flight, render_once=render_once) as emu,
        flow_env(emu, None),
    ):
        prompts = [f"bench growth {nonce} {variant} {i}" for i in range(videos)]
        meter = CpuMeter({**pids, "emulator": emu.pid})
        if variant == "flow":
            options = RunOptions(
                limits=new_limits(in_flight), poll=PollPolicy(first_poll_after=latency + 0.25)
            )
            manifest = write_manifest(
                Path(os.environ["PREFECT_HOME"]).parent / f"growth-{videos}.jsonl", prompts
            )
        elif variant == "floor":
            from bench.floor import floor_batch
        else:
            sdk = sdk_client(emu.api_key, emu.base_url)
            s3 = _s3()
        baseline = rss_mib()
        hwm_ok = reset_hwm()
        steps: dict[str, float] = {}
        with meter.measure():
            if variant == "flow":
                call = call_flow(
                    generate_batch,
                    manifest,
                    archive=ArchiveOptions(contact_sheet=contact_sheets),
                    options=options,
                )
                archived = call.result.archived
            elif variant == "floor":
                call = call_flow(floor_batch, nonce, videos, in_flight, latency)
                archived = call.result
            else:
                archived = len(sdk_pool(sdk, s3, prompts, threads=in_flight))
        backlog: dict[str, float] = {}
        if variant != "sdk":
            # The server records task runs from events, behind the run on a busy machine:
            # what it spends catching up is part of the run's cost.
            backlog = _server_backlog(CpuMeter(pids), call.flow_run_id, 3 * videos)
        if variant == "flow":
            steps = _step_seconds(read_spans(call.flow_run_id))
        stats = emu.stats()
    calls, locked = retries.counts()
    return {
        "variant": variant,
        "videos": videos,
        "archived": archived,
        "makespan": meter.wall,
        "baseline_rss_mib": baseline,
        "peak_rss_mib": hwm_mib() if hwm_ok else math.nan,
        "cpu": meter.spent,
        "server_backlog_cpu": backlog,
        "retries": retries.snapshot(),
        "submissions": stats["submissions"],
        "polls": stats["result_polls"],
        "steps": steps,
        # Prefect API calls of this process by endpoint, and the 503s ("database is locked")
        "api_calls": calls,
        "api_locked": locked,
        "contact_sheets": contact_sheets,
    }


def _server_backlog(
    meter: CpuMeter, flow_run_id: Any, task_runs: int, timeout_s: float = 600.0
) -> dict[str, float]:
    """The servers' CPU (Prefect's, PostgreSQL's) from the run's end until the Prefect server
    has recorded all `task_runs` as completed, and how long that took."""
    import time

    import httpx

    query = {
        "flow_runs": {"id": {"any_": [str(flow_run_id)]}},
        "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    url = f"{os.environ['PREFECT_API_URL']}/task_runs/count"
    recorded = 0
    with meter.measure(), httpx.Client(timeout=httpx.Timeout(30.0)) as http:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            answer = http.post(url, json=query)
            if answer.status_code == 200:  # a busy SQLite server answers 503: ask again
                recorded = int(answer.json())
                if recorded >= task_runs:
                    break
            time.sleep(0.5)
    if recorded < task_runs:
        logger.warning(
            "the server recorded %d of %d task runs within %.0f s: its CPU in the row "
            "includes that wait",
            recorded,
            task_runs,
            timeout_s,
        )
    spent = {k: v for k, v in meter.spent.items() if k in ("prefect server", "postgres")}
    return {**spent, "seconds": meter.wall, "recorded": recorded}


def _step_seconds(spans: Any) -> dict[str, float]:
    """Mean wall seconds of each task (submit, wait, archive) from its task runs: where a
    video's time in its lane goes (the slot is held from before the submit to the wait's
    end)."""
    out = {}
    for name in ("submit-i2v", "wait-for-prediction", "archive-to-s3"):
        took = [t.end - t.start for t in spans.named(name) if t.end == t.end]  # not NaN
        if took:
            out[name] = sum(took) / len(took)
    # Task runs reach the server as events: on a loaded server the last ones may not have
    # landed when these are read (the means are over those that had).
    out["recorded"] = sum(1 for t in spans.tasks if t.end == t.end)
    return out


def _steps(row: dict[str, Any]) -> str:
    steps = row.get("steps") or {}
    if not steps:
        return "-"
    names = ("submit-i2v", "wait-for-prediction", "archive-to-s3")
    each = " / ".join(f"{steps.get(n, math.nan):.2f}" for n in names)
    return f"{each} ({steps.get('recorded', 0):.0f} of {3 * row['videos']} task runs)"


def _s3() -> Any:
    from wan_tasks.storage.archive import make_s3_client

    return make_s3_client()


def _server_cpu(row: dict[str, Any]) -> float:
    """The Prefect server's and its database's CPU during the run and until it had recorded
    the run's task runs."""
    names = ("prefect server", "postgres")
    during = sum(float(row["cpu"].get(k, 0.0)) for k in names)
    return during + sum(float(row.get("server_backlog_cpu", {}).get(k, 0.0)) for k in names)


def _report(
    rows: list[dict[str, Any]],
    latency: float,
    in_flight: int,
    render_once: bool,
    database: str,
    settings: dict[str, str],
) -> None:
    names = {
        "sdk": "official SDK pool (baseline)",
        "floor": "Prefect floor: 3 no-op task runs a video",
        "flow": "generate_batch",
    }
    out = []
    for r in rows:
        ideal = math.ceil(r["videos"] / in_flight) * latency
        n = r["videos"]
        cpu = r["cpu"]
        out.append(
            [
                n,
                names[r["variant"]],
                f"{r['archived']}/{n}",
                r["makespan"],
                ideal,
                r["makespan"] / n,
                r["peak_rss_mib"] - r["baseline_rss_mib"],
                r["peak_rss_mib"],
                cpu.get("bench process", 0.0) / n,
                _server_cpu(r) / n,
                (cpu.get("bench process", 0.0) + _server_cpu(r)) / n,
                cpu.get("emulator", 0.0) / n,
                "-" if r["variant"] == "sdk" else f"{r['retries'][0]} ({r['retries'][1]:.0f} s)",
                r["server_rss_mib"] if r["variant"] != "sdk" else "-",
                _steps(r),
            ]
        )
    text = table(
        [
            "videos",
            "variant",
            "archived",
            "makespan s",
            "ideal s",
            "s per video",
            "peak RSS above start MiB",
            "peak RSS MiB",
            "CPU-s/video: client",
            "Prefect server (+ database, + backlog)",
            "client + server",
            "emulator",
            "Prefect API retries",
            "server RSS after MiB",
            "mean s: submit / wait / archive",
        ],
        out,
    )
    text += (
        f"\n\nEmulated inference {latency:g} s, in-flight limit {in_flight} (the SDK: as "
        f"many threads), Prefect server on {database}"
        + (f" with {', '.join(f'{k}={v}' for k, v in settings.items())}. " if settings else ". ")
        + (
            "The emulator rendered one MP4 per duration and served it for every task "
            "(bench option render_once): "
            if render_once
            else "Real rendering: "
        )
        + 'see BENCHMARKS.md. Each row is a fresh process; "client" is that process '
        "(the flow run, or the SDK threads); the server's CPU includes its database and what it "
        "spent after the run recording the run's task runs (they reach it as events). The "
        "Prefect floor (bench/floor.py) runs three no-op tasks a video with the flows' task "
        "settings (cache keys, SERIALIZABLE submit, persisted results, retries) on the same "
        "lanes: what keeping the three steps as Prefect tasks costs by itself. Contact sheets: "
        + (
            "on (the flows' default)."
            if any(r.get("contact_sheets") for r in rows)
            else "off (the SDK baseline makes none; each decodes the whole MP4, ~0.04 CPU-s)."
        )
    )
    sizes = ", ".join(str(r["videos"]) for r in rows if r["variant"] == "flow")
    emit(
        "growth",
        f"Growth: {sizes} videos ({database})",
        text,
        {
            "latency_s": latency,
            "in_flight": in_flight,
            "render_once": render_once,
            "server_settings": settings,
            "bucket": BUCKET,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    run_script(main)
