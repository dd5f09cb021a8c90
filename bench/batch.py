"""Batch makespan: N videos (100), in-flight limit K (10), emulated inference L (10 s); the
ideal is ceil(N/K) * L. Baseline: the official SDK driven by a pool of K threads. Then the
re-run of the finished batch (all cached: 0 submissions) and the service calls per video.

    python -m bench.batch [--quick] [--videos N] [--in-flight K] [--latency L] [--real-render]

Variants, each against a fresh emulator (its concurrency cap = K): the SDK pool; generate_batch
with the default PollPolicy; generate_batch with the first poll just after L; then
generate_batch again on the finished (tuned) manifest. Every variant has its own prompts.

The emulator renders each distinct duration once (`render_once`, as bench.growth does): a real
render costs ~0.9 CPU-s a video here, on the two cores the system under test runs on, where
the service renders on its own machines. `--real-render` renders every video (the figures
in BENCHMARKS.md above its section "A lane's cycle ..." of 2026-12-07 were measured that way).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, emit, median, p90, run_script, table
from bench.flowrun import top_endpoints
from bench.sampling import Watch
from bench.stack import (
    EmulatorProcess,
    flow_env,
    new_limits,
    prefect_api,
    s3_store,
    server_pids,
)

logger = logging.getLogger("bench.batch")


@dataclass
class Row:
    name: str
    makespan: float
    videos: int
    stats: dict[str, int]
    mean_in_flight: float
    cpu: str
    lateness: list[float] = field(default_factory=list)
    submit_s: list[float] = field(default_factory=list)
    retries: tuple[int, float] = (0, 0.0)
    ok: int = 0
    api_calls: dict[str, int] = field(default_factory=dict)
    api_locked: dict[str, int] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 videos instead of 100")
    parser.add_argument("--videos", type=int)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--latency", type=float, default=10.0, help="emulated inference, s")
    parser.add_argument(
        "--latency-jitter",
        type=float,
        default=0.0,
        help="each task's inference drawn from latency +- this (the emulator's "
        "latency_jitter_s); done->seen is then not reported",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run the Prefect server on PostgreSQL instead of SQLite",
    )
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK baseline")
    parser.add_argument(
        "--real-render",
        action="store_true",
        help="render every video in the emulator (its CPU then competes with what is measured)",
    )
    parser.add_argument(
        "--no-default", action="store_true", help="skip the default-PollPolicy variant"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.25,
        help="the tuned variant's first poll: this long after the inference",
    )
    parser.add_argument(
        "--no-tuned",
        action="store_true",
        help="skip the tuned-PollPolicy variant (the re-run then follows the default one)",
    )
    args = parser.parse_args(argv)
    videos = args.videos or (20 if args.quick else 100)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-batch-"))
    try:
        with (
            prefect_api(workdir, postgres=args.postgres) as api,
            s3_store(workdir) as (endpoint, weed_pid),
        ):
            pids = {"seaweedfs": weed_pid or 0, **server_pids(api)}
            run(
                workdir,
                videos,
                args.in_flight,
                args.latency,
                endpoint,
                pids,
                api.database,
                sdk=not args.no_sdk,
                default=not args.no_default,
                tuned=not args.no_tuned,
                margin=args.margin,
                render_once=not args.real_render,
                jitter=args.latency_jitter,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(
    workdir: Path,
    videos: int,
    in_flight: int,
    latency: float,
    endpoint: Any,
    pids: dict[str, int],
    database: str,
    *,
    sdk: bool = True,
    default: bool = True,
    tuned: bool = True,
    margin: float = 0.25,
    jitter: float = 0.0,
    render_once: bool = True,
) -> None:
    from wan_tasks.api.policies import PollPolicy

    nonce = uuid.uuid4().hex[:8]
    settings: dict[str, Any] = {
        "latency_s": latency,
        "concurrency": in_flight,
        "render_once": render_once,
    }
    if jitter:
        settings["latency_jitter_s"] = jitter
    rows = [_sdk_row(settings, endpoint, pids, videos, nonce)] if sdk else []
    fast = PollPolicy(first_poll_after=latency + margin, first_poll_margin=margin)
    label = f"first_poll_after={latency + margin:g}s"
    if default:  # the re-run follows the last generate_batch variant
        rows += _flow_rows(
            workdir,
            "default",
            "generate_batch, default PollPolicy",
            PollPolicy(),
            settings,
            endpoint,
            pids,
            videos,
            nonce,
            rerun=not tuned,
        )
    if tuned:
        rows += _flow_rows(
            workdir,
            "tuned",
            f"generate_batch, {label}",
            fast,
            settings,
            endpoint,
            pids,
            videos,
            nonce,
            rerun=True,
        )
    ideal = math.ceil(videos / in_flight) * latency
    _report(
        rows, videos, in_flight, latency, ideal, database, jitter=jitter, render_once=render_once
    )


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    out = {
        k: int(after[k]) - int(before[k])
        for k in ("submissions", "result_polls", "uploads", "downloads")
    }
    out["max_in_flight"] = int(after["max_in_flight"])
    return out


def _sdk_row(
    settings: dict[str, Any], endpoint: Any, pids: dict[str, int], videos: int, nonce: str
) -> Row:
    """The official SDK driven by a pool of K threads."""
    from bench.baseline import sdk_client, sdk_pool

    latency, in_flight = settings["latency_s"], settings["concurrency"]
    with EmulatorProcess(**settings) as emu, flow_env(emu, endpoint):
        sdk, s3 = sdk_client(emu.api_key, emu.base_url), endpoint.boto3_client()
        prompts = [f"bench batch {nonce} sdk {i}" for i in range(videos)]
        meter, watch = CpuMeter({**pids, "emulator": emu.pid}), Watch(emu)
        before = emu.stats()
        with meter.measure(), watch.running():
            done = sdk_pool(sdk, s3, prompts, threads=in_flight)
        row = Row(
            f"official SDK, {in_flight} threads (baseline)",
            meter.wall,
            videos,
            _delta(before, emu.stats()),
            watch.mean_in_flight,
            meter.summary(),
            # With jitter each task's own inference time is not known here.
            lateness=[]
            if settings.get("latency_jitter_s")
            else [d.seconds - latency for d in done],
            ok=len(done),
        )
    logger.info("sdk: %.1fs", row.makespan)
    return row


def _flow_rows(
    workdir: Path,
    tag: str,
    name: str,
    policy: Any,
    settings: dict[str, Any],
    endpoint: Any,
    pids: dict[str, int],
    videos: int,
    nonce: str,
    *,
    rerun: bool = False,
) -> list[Row]:
    """generate_batch on a fresh manifest; with `rerun`, once more on the finished batch."""
    from bench.flowrun import PrefectRetries, call_flow, diff_counts, read_spans, write_manifest
    from wan_tasks.flows.generate import generate_batch
    from wan_tasks.flows.options import RunOptions

    retries = PrefectRetries.install()
    latency, in_flight = settings["latency_s"], settings["concurrency"]
    rows = []
    with EmulatorProcess(**settings) as emu, flow_env(emu, endpoint):
        options = RunOptions(limits=new_limits(in_flight), poll=policy)
        manifest = write_manifest(
            workdir / f"{tag}.jsonl", [f"bench batch {nonce} {tag} {i}" for i in range(videos)]
        )
        for again in (False, True) if rerun else (False,):
            meter, watch = CpuMeter({**pids, "emulator": emu.pid}), Watch(emu)
            before, r0, (c0, l0) = emu.stats(), retries.snapshot(), retries.counts()
            with meter.measure(), watch.running():
                call = call_flow(generate_batch, manifest, options=options)
            r1, (c1, l1) = retries.snapshot(), retries.counts()
            row = Row(
                f"re-run of the finished batch ({name})" if again else name,
                meter.wall,
                videos,
                _delta(before, emu.stats()),
                watch.mean_in_flight,
                meter.summary(),
                retries=(r1[0] - r0[0], r1[1] - r0[1]),
                ok=call.result.archived,
                api_calls=diff_counts(c0, c1),
                api_locked=diff_counts(l0, l1),
            )
            if not again:
                pairs = read_spans(call.flow_run_id, settle_s=3).waits_after_submit()
                if not settings.get("latency_jitter_s"):
                    row.lateness = [w.end - s.end - latency for s, w in pairs]
                row.submit_s = [s.end - s.start for s, _ in pairs]
            rows.append(row)
            logger.info("%s: %.1fs, %d archived", row.name, row.makespan, row.ok)
    return rows


def _report(
    rows: list[Row],
    videos: int,
    in_flight: int,
    latency: float,
    ideal: float,
    database: str,
    *,
    jitter: float = 0.0,
    render_once: bool = True,
) -> None:
    table_rows = []
    for r in rows:
        per = {k: v / videos for k, v in r.stats.items() if k != "max_in_flight"}
        fresh = r.stats["submissions"] > 0  # a re-run makes nothing: no ideal, no in-flight
        over = f"{(r.makespan / ideal - 1) * 100:+.1f}%" if fresh else "-"
        table_rows.append(
            [
                r.name,
                f"{r.ok}/{videos}",
                r.makespan,
                over,
                f"{per['submissions']:.2f}",
                f"{per['result_polls']:.2f}",
                f"{per['uploads']:.2f}",
                f"{per['downloads']:.2f}",
                f"{r.mean_in_flight:.1f} (max {r.stats['max_in_flight']})" if fresh else "-",
                f"{median(r.lateness):.2f} / {p90(r.lateness):.2f}" if r.lateness else "-",
                f"{median(r.submit_s):.2f}" if r.submit_s else "-",
                f"{r.retries[0]} ({r.retries[1]:.0f} s)" if "SDK" not in r.name else "-",
            ]
        )
    text = table(
        [
            "variant",
            "archived",
            "makespan s",
            "vs ideal",
            "submits/video",
            "polls/video",
            "uploads/video",
            "downloads/video",
            "mean in flight",
            "done->seen median/p90 s",
            "submit task s",
            "Prefect API retries",
        ],
        table_rows,
    )
    text += (
        f"\n\n{videos} videos, in-flight limit {in_flight}, emulated inference "
        f"{latency:g} s{f' +- {jitter:g} s (uniform; the ideal from the mean)' if jitter else ''}"
        f": ideal {ideal:.0f} s. Prefect server on {database}. The emulator "
        + ("renders each duration once. " if render_once else "renders every video. ")
        + '"done->seen": from the end of inference to '
        "the end of the wait (SDK: job time minus inference, so it includes the image "
        'upload, download and S3 put). "mean in flight": tasks at the service, sampled '
        "every 0.5 s from the first submission.\n\nCPU per variant:\n\n"
        + "\n".join(f"- {r.name}: {r.cpu}" for r in rows)
        + "\n\nPrefect API requests per video from the flow process (most frequent), and "
        "the 503 answers (SQLite busy) among them:\n\n"
        + "\n".join(
            f"- {r.name}: {sum(r.api_calls.values()) / videos:.1f} requests/video "
            f"({top_endpoints(r.api_calls, videos)}); 503s/video: "
            f"{top_endpoints(r.api_locked, videos)}"
            for r in rows
            if r.api_calls
        )
    )
    emit(
        "batch",
        f"Batch makespan, re-run, service calls per video ({database})",
        text,
        {
            "videos": videos,
            "database": database,
            "in_flight": in_flight,
            "latency_s": latency,
            "latency_jitter_s": jitter,
            "render_once": render_once,
            "ideal_s": ideal,
            "rows": [r.__dict__ for r in rows],
        },
    )


if __name__ == "__main__":
    run_script(main)
