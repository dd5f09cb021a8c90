"""Overhead per video: one `generate_video` (submit, wait, archive of a 480p MP4) against a
running Prefect server, minus the emulated inference time; baseline: the official SDK's
`run()` plus a boto3 upload doing the same job, measured in the same run, interleaved.

    python -m bench.overhead [--quick] [--videos N] [--latency S]

Variants: the SDK baseline; the flow with the default PollPolicy; the flow with a PollPolicy
whose first poll is set just after the expected inference time (`--latency` + 0.25 s). One
warm-up of each (reported as "cold"), then N rounds. Each video has a fresh prompt, so
nothing is served from the cache.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import CpuMeter, emit, median, p90, run_script, table
from bench.stack import (
    EmulatorProcess,
    PrefectApi,
    flow_env,
    new_limits,
    prefect_api,
    s3_store,
    server_pids,
)

logger = logging.getLogger("bench.overhead")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 4")
    parser.add_argument("--videos", type=int, help="measured rounds (after one warm-up)")
    parser.add_argument("--latency", type=float, default=10.0, help="emulated inference, s")
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="run the Prefect server on PostgreSQL instead of SQLite",
    )
    parser.add_argument("--no-sdk", action="store_true", help="skip the SDK baseline")
    args = parser.parse_args(argv)
    rounds = args.videos or (2 if args.quick else 4)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-overhead-"))
    try:
        with (
            prefect_api(workdir, postgres=args.postgres) as api,
            s3_store(workdir) as (endpoint, weed_pid),
            EmulatorProcess(latency_s=args.latency, concurrency=3) as emu,
            flow_env(emu, endpoint),
        ):
            measure(
                rounds,
                args.latency,
                emu,
                endpoint,
                api,
                {"emulator": emu.pid, "seaweedfs": weed_pid or 0, **server_pids(api)},
                sdk=not args.no_sdk,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(
    rounds: int,
    latency: float,
    emu: EmulatorProcess,
    endpoint: Any,
    api: PrefectApi,
    pids: dict[str, int],
    *,
    sdk: bool = True,
) -> None:
    from bench.baseline import sdk_client, sdk_job
    from bench.flowrun import (
        PrefectRetries,
        call_flow,
        diff_counts,
        read_spans,
        request,
        top_endpoints,
    )
    from wan_tasks.api.policies import PollPolicy
    from wan_tasks.flows.generate import generate_video
    from wan_tasks.flows.options import RunOptions

    nonce = uuid.uuid4().hex[:8]
    limits = new_limits(3)
    default = RunOptions(limits=limits)
    tuned_policy = PollPolicy(first_poll_after=latency + 0.25)
    tuned = RunOptions(limits=limits, poll=tuned_policy)
    client, s3 = sdk_client(emu.api_key, emu.base_url), endpoint.boto3_client()

    walls: dict[str, list[float]] = {"sdk": [], "default": [], "tuned": []}
    if not sdk:
        del walls["sdk"]
    cold: dict[str, float] = {}
    runs: dict[str, list[Any]] = {"default": [], "tuned": []}
    retries = PrefectRetries.install()
    retried: dict[str, list[tuple[int, float]]] = {"sdk": [], "default": [], "tuned": []}
    requests: dict[str, tuple[dict[str, int], dict[str, int]]] = {}

    def one(variant: str, i: int) -> float:
        prompt = f"bench overhead {nonce} {variant} {i}"
        if variant == "sdk":
            return float(sdk_job(client, s3, prompt, seed=i).seconds)
        options = default if variant == "default" else tuned
        (n0, s0), (c0, l0) = retries.snapshot(), retries.counts()
        call = call_flow(generate_video, request(prompt, i), options=options)
        (n1, s1), (c1, l1) = retries.snapshot(), retries.counts()
        if i > 0:
            runs[variant].append(call)
            retried[variant].append((n1 - n0, s1 - s0))
            calls, locked = requests.setdefault(variant, ({}, {}))
            for total, new in ((calls, diff_counts(c0, c1)), (locked, diff_counts(l0, l1))):
                for k, v in new.items():
                    total[k] = total.get(k, 0) + v
        return call.seconds

    meter = CpuMeter(pids)
    before = emu.stats()
    with meter.measure():
        for variant in walls:
            cold[variant] = one(variant, 0)
        order = list(walls)
        for i in range(1, rounds + 1):
            turn = i % len(order)
            for variant in order[turn:] + order[:turn]:  # rotate the order each round
                walls[variant].append(one(variant, i))
                logger.info("%s #%d: %.2fs", variant, i, walls[variant][-1])
    after = emu.stats()

    time.sleep(3)  # task run states reach the server as events
    phases = {
        v: _phases(
            [read_spans(c.flow_run_id, settle_s=0) for c in calls],
            [c.started for c in calls],
            [c.started + c.seconds for c in calls],
            latency,
        )
        for v, calls in runs.items()
    }
    base = median([w - latency for w in walls["sdk"]]) if sdk else float("nan")
    names = {
        "sdk": "official SDK run() + boto3 put_object (baseline)",
        "default": "generate_video, default PollPolicy",
        "tuned": f"generate_video, first_poll_after={latency + 0.25:g}s",
    }
    rows = []
    for variant, values in walls.items():
        over = [w - latency for w in values]
        added = "-" if variant == "sdk" or not sdk else f"{median(over) - base:+.2f}"
        rows.append(
            [
                names[variant],
                len(values),
                median(values),
                median(over),
                p90(over),
                max(over),
                added,
                cold[variant] - latency,
                _retry_cell(retried[variant]),
            ]
        )
    text = table(
        [
            "variant",
            "n",
            "wall median s",
            "overhead median s",
            "overhead p90 s",
            "overhead max s",
            "added vs SDK s",
            "cold overhead s",
            "Prefect API retries/video (s slept)",
        ],
        rows,
    )
    phase_rows = [[names[v], *(f"{p[k]:.2f}" for k in PHASE_KEYS)] for v, p in phases.items()]
    text += "\n\nWhere a flow's overhead goes (medians, s; from the Prefect API's run times):\n\n"
    text += table(["variant", *PHASE_LABELS], phase_rows)
    text += "\n\nPrefect API requests per video (most frequent) and 503s among them:\n\n"
    text += "\n".join(
        f"- {names[v]}: {sum(c.values()) / rounds:.1f} requests/video "
        f"({top_endpoints(c, rounds)}); 503s/video: {top_endpoints(lk, rounds)}"
        for v, (c, lk) in requests.items()
    )
    polls = after["result_polls"] - before["result_polls"]
    subs = after["submissions"] - before["submissions"]
    text += (
        f"\n\nEmulated inference {latency:g} s; Prefect server on {api.database}. Service "
        f"calls over all runs: {subs} submissions, {polls} result polls. CPU: "
        f"{meter.summary()}."
    )
    if api.startup_s is not None:
        text += f" Prefect server start (excluded): {api.startup_s:.1f} s."
    emit(
        "overhead",
        f"Overhead per video ({api.database})",
        text,
        {
            "latency_s": latency,
            "rounds": rounds,
            "walls": walls,
            "cold": cold,
            "phases": phases,
            "server_startup_s": api.startup_s,
            "cpu": meter.spent,
            "database": api.database,
            "prefect_retries": retried,
            "retries_by_status": retries.by_status,
        },
    )


def _retry_cell(values: list[tuple[int, float]]) -> str:
    if not values:
        return "-"
    calls = sum(n for n, _ in values) / len(values)
    slept = sum(s for _, s in values) / len(values)
    return f"{calls:.1f} ({slept:.1f})"


PHASE_KEYS = (
    "call_to_start",
    "setup",
    "submit",
    "lateness",
    "gap",
    "archive",
    "finish",
    "end_to_return",
)
PHASE_LABELS = (
    "call->flow start",
    "flow start->submit",
    "submit task",
    "wait past inference",
    "wait->archive",
    "archive task",
    "archive->flow end",
    "flow end->return",
)


def _phases(
    spans: list[Any], called: list[float], returned: list[float], latency: float
) -> dict[str, float]:
    parts: dict[str, list[float]] = {k: [] for k in PHASE_KEYS}
    for run, t0, t1 in zip(spans, called, returned, strict=True):
        submit, wait = run.first("submit-i2v"), run.first("wait-for-prediction")
        archive = run.first("archive-to-s3")
        if not (submit and wait and archive):
            continue
        parts["call_to_start"].append(run.start - t0)
        parts["setup"].append(submit.start - run.start)
        parts["submit"].append(submit.end - submit.start)
        # The inference clock starts at the submit POST, inside the submit task.
        parts["lateness"].append(wait.end - submit.end - latency)
        parts["gap"].append(archive.start - wait.end)
        parts["archive"].append(archive.end - archive.start)
        parts["finish"].append(run.end - archive.end)
        parts["end_to_return"].append(t1 - run.end)
    return {k: median(v) for k, v in parts.items()}


if __name__ == "__main__":
    run_script(main)
