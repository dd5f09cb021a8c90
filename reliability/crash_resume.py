"""Crash-resume: kill -9 a batch's process at random points, re-run until done, then count.

A real `prefect server start`, the emulator and SeaweedFS run in this harness (they outlive the
killed process); each attempt is `python -m reliability.batch_child` in its own process group.
Kills are timed by what the service sees: right after new submissions (videos mid-submit and
mid-wait) and right after downloads start (videos mid-archive).

    python -m reliability.crash_resume --videos 50 --kills 6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stack import EmulatorProcess, flow_env, new_limits, prefect_api, s3_store
from wan_tasks.devstack.processes import ManagedProcess, interrupt_on_sigterm

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "wan_tasks" / "assets" / "sample.png"
PHASES = ("submit", "wait", "archive")


def write_manifest(path: Path, videos: int, tag: str) -> Path:
    rows = [
        {"id": f"v{i:03d}", "image": str(SAMPLE), "prompt": f"{tag} crash-resume {i}", "seed": i}
        for i in range(videos)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wait_for(
    phase: str,
    emu: EmulatorProcess,
    proc: ManagedProcess,
    rng: random.Random,
    timeout: float,
    max_progress: int,
) -> bool:
    """Block until the moment to kill in `phase`; False if the child finished first."""
    start = emu.stats()
    deadline = time.monotonic() + timeout
    counter = "downloads" if phase == "archive" else "submissions"
    # Let the batch make some progress first, so the kills spread over the whole run.
    progress = rng.randint(1, max_progress)
    while time.monotonic() < deadline:
        if not proc.alive():
            return False
        if emu.stats()[counter] >= start[counter] + progress:
            # "submit": at once, while the burst of submits is going out; "wait" and
            # "archive": a little later, inside the waits or the downloads.
            time.sleep(0 if phase == "submit" else rng.uniform(0.2, 1.5))
            return proc.alive()
        time.sleep(0.02)
    return proc.alive()


def run(
    videos: int,
    kills: int,
    latency: float,
    in_flight: int,
    seed: int,
    workdir: Path,
    max_progress: int = 8,
) -> dict[str, Any]:
    rng = random.Random(seed)
    with (
        prefect_api(workdir) as api,
        EmulatorProcess(latency_s=latency, concurrency=in_flight * 2, api_key="crash-key") as emu,
        s3_store(workdir) as (endpoint, _),
        flow_env(emu, endpoint),
    ):
        from bench.stack import BUCKET
        from reliability.verify import account
        from wan_tasks.api.client import WaveSpeedClient
        from wan_tasks.api.policies import PollPolicy
        from wan_tasks.flows.options import RunOptions
        from wan_tasks.integration.limits import reset_in_flight

        names = new_limits(in_flight, 6000)
        manifest = write_manifest(workdir / "crash.jsonl", videos, f"s{seed}")
        options = RunOptions(
            limits=names,
            poll=PollPolicy(first_poll_after=latency, min_interval=0.5, max_interval=2.0),
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        killed: list[dict[str, Any]] = []
        attempts = 0
        began = time.monotonic()
        while True:
            attempts += 1
            # SIGKILL is also how it is stopped: no chance to clean up, like a crash.
            with ManagedProcess(
                f"batch attempt {attempts}",
                [
                    sys.executable,
                    "-m",
                    "reliability.batch_child",
                    str(manifest),
                    options.model_dump_json(),
                ],
                log=workdir / f"attempt-{attempts}.log",
                env=env,
                cwd=REPO,
                stop_signal=signal.SIGKILL,
                stop_timeout=5.0,
            ) as proc:
                if len(killed) < kills:
                    phase = PHASES[len(killed) % len(PHASES)]
                    if _wait_for(phase, emu, proc, rng, timeout=120, max_progress=max_progress):
                        proc.stop()
                        killed.append(
                            {
                                "attempt": attempts,
                                "phase": phase,
                                "at_s": round(time.monotonic() - began, 1),
                                "stats": {k: emu.stats()[k] for k in ("submissions", "downloads")},
                            }
                        )
                        # The dead process's slots: a real server reclaims them when their
                        # leases expire; free them now rather than wait.
                        reset_in_flight(names)
                        continue
                code = proc.wait(timeout=600)
            if code == 0 or attempts > kills + 5:
                break
        elapsed = time.monotonic() - began
        with WaveSpeedClient(emu.api_key, emu.base_url) as client:
            acc = account(endpoint.boto3_client(), BUCKET, "videos/", manifest, client)
    return {
        "videos": videos,
        "kills": killed,
        "attempts": attempts,
        "last_exit_code": code,
        "elapsed_s": round(elapsed, 1),
        "prefect_server_start_s": api.startup_s,
        **acc.as_row(),
    }


def main(argv: list[str] | None = None) -> int:
    interrupt_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=50)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--max-progress",
        type=int,
        default=8,
        help="kill after 1..N new submissions or downloads (spreads kills)",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wan-crash-") as tmp:
        result = run(
            args.videos,
            args.kills,
            args.latency,
            args.in_flight,
            args.seed,
            Path(tmp),
            args.max_progress,
        )
    for kill in result["kills"]:
        print(
            f"kill -9 #{result['kills'].index(kill) + 1}: attempt {kill['attempt']}, "
            f"phase {kill['phase']}, t={kill['at_s']}s, service saw {kill['stats']}"
        )
    print(
        f"videos {result['videos']}, attempts {result['attempts']}, "
        f"{result['elapsed_s']}s; archived and verified {result['archived_verified']}, "
        f"lost {result['lost']}, corrupt {result['corrupt']}, "
        f"duplicate submissions {result['duplicate_submissions']}, "
        f"duplicate objects {result['duplicate_objects']}, "
        f"submissions {result['submissions']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = (
        result["lost"] == 0
        and result["duplicate_submissions"] == 0
        and result["corrupt"] == 0
        and result["archived_verified"] == result["videos"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
