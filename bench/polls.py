"""Service calls per video for a long task: submissions, result polls and uploads per video when
inference takes 60 s. Target: 1 submission and at most 6 polls (the SDK polls every second).

    python -m bench.polls [--latency 60] [--videos 3]

One emulator; three variants run side by side (they wait, they do not compete for CPU): the
SDK (`run(poll_interval=1)`), generate_batch with the default PollPolicy (nothing seen yet, so
unaimed), and generate_batch with the first poll set just after the inference time; then a
later generate_batch with the default policy, as a new process: its first polls are aimed
from the account's history (the first three variants' tasks). Polls are counted per prediction
by the emulator. Also prints the default policy's poll times for such a task (pure arithmetic,
no jitter), which is what the measured counts follow.
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import emit, median, run_script, table
from bench.stack import EmulatorProcess, flow_env, new_limits, prefect_api, s3_store

logger = logging.getLogger("bench.polls")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="same as the full run")
    parser.add_argument("--latency", type=float, default=60.0, help="emulated inference, s")
    parser.add_argument("--videos", type=int, default=3, help="videos per variant")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-polls-"))
    try:
        with (
            prefect_api(workdir) as _api,
            s3_store(workdir) as (endpoint, _weed),
            EmulatorProcess(latency_s=args.latency, concurrency=3 * args.videos) as emu,
            flow_env(emu, endpoint),
        ):
            run(workdir, args.videos, args.latency, emu, endpoint)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def schedule(policy: Any, inference: float, *, before_fix: bool = False) -> list[float]:
    """Poll times (s after submit) of one unaimed wait under `policy`, jitter off, for a task
    done `inference` s after its submit: the delays go on from `min_interval` after the first
    poll. `before_fix`: as wait_for_prediction did before commit 9528ba6, starting the delays
    afresh after the first poll, so the first delay after a miss was `first_poll_after`."""
    delays = policy.model_copy(update={"jitter": 0.0}).delays(random.Random(0))
    now = policy.first_poll_after
    if not before_fix:
        delays.next()  # the first delay was the sleep before the first poll
    times = [now]
    while now < inference:
        now += delays.next()
        times.append(now)
    return times


def sdk_schedule(inference: float, interval: float = 1.0) -> list[float]:
    times = [0.0]
    while times[-1] < inference:
        times.append(times[-1] + interval)
    return times


def schedule_table(inferences: list[float]) -> str:
    """Polls and detection delay per inference time: the default policy unaimed (no inference
    times seen yet), as before the fix, aimed from what was seen, and the SDK."""
    from wan_tasks.api.policies import PollPolicy

    rows = []
    for t in inferences:
        now = schedule(PollPolicy(), t)
        before = schedule(PollPolicy(), t, before_fix=True)
        aimed = schedule(PollPolicy(first_poll_after=t + 0.25), t)
        sdk = sdk_schedule(t)
        rows.append([f"{t:g}", *(f"{len(s)} / {s[-1] - t:.1f}" for s in (now, before, aimed, sdk))])
    return table(
        [
            "inference s",
            "default, unaimed: polls / late s",
            "unaimed, before the fix",
            "aimed from seen times (+0.25 s)",
            "SDK, 1 s: polls / late s",
        ],
        rows,
    )


def run(workdir: Path, videos: int, latency: float, emu: EmulatorProcess, endpoint: Any) -> None:
    from bench.baseline import sdk_client, sdk_pool
    from bench.flowrun import call_flow, read_spans, write_manifest
    from wan_tasks.api.policies import PollPolicy
    from wan_tasks.flows.generate import generate_batch
    from wan_tasks.flows.options import RunOptions

    nonce = uuid.uuid4().hex[:8]
    tuned = PollPolicy(first_poll_after=latency + 0.25)
    sdk, s3 = sdk_client(emu.api_key, emu.base_url), endpoint.boto3_client()

    def flow_variant(tag: str, policy: PollPolicy) -> tuple[list[str], list[float]]:
        options = RunOptions(limits=new_limits(videos), poll=policy)
        manifest = write_manifest(
            workdir / f"{tag}.jsonl", [f"bench polls {nonce} {tag} {i}" for i in range(videos)]
        )
        call = call_flow(generate_batch, manifest, options=options)
        pairs = read_spans(call.flow_run_id, settle_s=3).waits_after_submit()
        return (
            [o.prediction_id or "" for o in call.result.outcomes],
            [w.end - s.end - latency for s, w in pairs],
        )

    def sdk_variant() -> tuple[list[str], list[float]]:
        done = sdk_pool(
            sdk, s3, [f"bench polls {nonce} sdk {i}" for i in range(videos)], threads=videos
        )
        return [d.prediction_id for d in done], [d.seconds - latency for d in done]

    before = emu.stats()
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="variant") as pool:
        futures = {
            "official SDK, poll_interval=1 s (baseline)": pool.submit(sdk_variant),
            "generate_batch, default PollPolicy": pool.submit(
                flow_variant, "default", PollPolicy()
            ),
            f"generate_batch, first_poll_after={latency + 0.25:g}s": pool.submit(
                flow_variant, "tuned", tuned
            ),
        }
        outcomes = {name: f.result() for name, f in futures.items()}
    # A later run in a new process: its first polls are aimed from the account's history.
    import wan_tasks.integration.tasks as tasks
    from wan_tasks.core.inference_times import InferenceTimes

    tasks.INFERENCE_TIMES = InferenceTimes()
    outcomes["generate_batch, default PollPolicy, a later run (aimed from history)"] = flow_variant(
        "later", PollPolicy()
    )
    after = emu.stats()
    polls: dict[str, int] = after["polls_by_prediction"]
    rows = []
    for name, (ids, late) in outcomes.items():
        counts = [polls.get(i, 0) for i in ids]
        rows.append(
            [
                name,
                f"{len(ids) / videos:.0f}",
                f"{median(counts):.0f}",
                f"{min(counts)}-{max(counts)}",
                f"{median(late):.2f} / {max(late):.2f}",
            ]
        )
    total_uploads = after["uploads"] - before["uploads"]
    text = table(
        [
            "variant",
            "submits/video",
            "polls/video median",
            "polls range",
            "done->seen median / max s",
        ],
        rows,
    )
    default_times = schedule(PollPolicy(), latency)
    text += (
        f"\n\n{videos} videos per variant, emulated inference {latency:g} s; uploads over "
        f"all variants: {total_uploads} for {4 * videos} videos. Default PollPolicy "
        f"unaimed (nothing seen yet), jitter off: polls at "
        f"{', '.join(f'{t:.1f}' for t in default_times)} s after submit "
        f"({len(default_times)} polls; the task done at {latency:g} s is seen "
        f'{default_times[-1] - latency:.1f} s late). "done->seen": end of inference to '
        "end of the wait (SDK: job time minus inference).\n\nThe same arithmetic (no I/O, "
        "jitter off) for other inference times:\n\n"
    )
    text += schedule_table([5, 9.5, 10.5, 15, 30, 59, 60, 61, 120])
    emit(
        "polls",
        f"Service calls per video, {latency:g} s inference",
        text,
        {
            "latency_s": latency,
            "videos": videos,
            "polls": {name: [polls.get(i, 0) for i in ids] for name, (ids, _) in outcomes.items()},
            "default_schedule": default_times,
        },
    )


if __name__ == "__main__":
    run_script(main)
