"""Fault soak: hundreds of videos against an emulator that misbehaves on purpose, and an S3
store that throttles and restarts mid-run. Then one re-run, as an operator would do.

Faults: 429 with Retry-After, 500/502/503, slow answers past the client's timeout, submits that
create the task and drop the connection, task failures with retryable (5xxx) and permanent
(1403, 1200) codes, 404s on young outputs, downloads truncated with and without
Content-Length, history pages capped at 5 rows; S3 503 SlowDown and a full restart of the S3
server while videos are being archived.

    python -m reliability.soak --videos 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import BUCKET, EmulatorProcess, new_limits, prefect_api
from reliability.crash_resume import REPO, SAMPLE
from reliability.s3_proxy import S3FaultProxy
from wan_tasks.devstack.processes import ManagedProcess, interrupt_on_sigterm

FAULTS: dict[str, Any] = {
    "seed": 11,
    "retry_after_s": 1.0,
    "slow_s": 12.0,
    "rates": {
        "rate_limit": 0.05,
        "server_error": 0.05,
        "slow": 0.005,
        "submit_drop": 0.03,
        "task_retryable_failure": 0.05,
        "task_permanent_failure": 0.02,
        "download_expired": 0.01,
        "download_truncated": 0.03,
        # This round's classes: a body cut short with no Content-Length (looks complete).
        # (Lost answers on resubmissions come from submit_drop meeting 5xxx resubmissions;
        # download_expired hits young outputs, which must be retried, never paid again.)
        "download_truncated_unsized": 0.03,
    },
}
# History pages far smaller than asked for: reconciliation must page to the end.
HISTORY_PAGE_CAP = 5


def _child(
    manifest: Path, options_json: str, report: Path, env: dict[str, str], log: Path
) -> tuple[int, dict[str, Any]]:
    with ManagedProcess(
        "soak batch",
        [sys.executable, "-m", "reliability.batch_child", str(manifest), options_json, str(report)],
        log=log,
        env=env,
        cwd=REPO,
    ) as proc:
        code = proc.wait(timeout=3600)
    data = json.loads(report.read_text()) if report.exists() else {}
    return code, data


def run(
    videos: int, latency: float, in_flight: int, workdir: Path, restart_after_s: float
) -> dict[str, Any]:
    from wan_tasks.storage.seaweed import SeaweedFS

    with (
        prefect_api(workdir),
        EmulatorProcess(
            latency_s=latency,
            concurrency=in_flight * 2,
            api_key="soak-key",
            faults=FAULTS,
            history_page_cap=HISTORY_PAGE_CAP,
        ) as emu,
        SeaweedFS(workdir / "seaweedfs", buckets=[BUCKET]) as weed,
        S3FaultProxy(weed.endpoint.endpoint_url, throttle=0.03, seed=5) as proxy,
    ):
        from reliability.verify import account
        from wan_tasks.api.client import WaveSpeedClient
        from wan_tasks.api.policies import PollPolicy
        from wan_tasks.flows.options import RunOptions

        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(
            weed.endpoint.env(),
            AWS_ENDPOINT_URL_S3=proxy.url,
            PYTHONPATH=str(REPO),
            WAVESPEED_API_KEY=emu.api_key,
            WAVESPEED_BASE_URL=emu.base_url,
            WAN_TASKS_BUCKET=BUCKET,
        )
        names = new_limits(in_flight, 6000)
        manifest = workdir / "soak.jsonl"
        manifest.write_text(
            "".join(
                json.dumps(
                    {"id": f"v{i:04d}", "image": str(SAMPLE), "prompt": f"soak {i}", "seed": i}
                )
                + "\n"
                for i in range(videos)
            )
        )
        options = RunOptions(
            limits=names,
            max_attempts=3,
            poll=PollPolicy(first_poll_after=latency, min_interval=0.5, max_interval=2.0),
        ).model_dump_json()

        restarts: list[dict[str, float]] = []

        def restart_s3() -> None:
            time.sleep(restart_after_s)
            began = time.monotonic()
            proxy.down = True
            weed.stop()
            weed.start()  # same folder, same ports, same credentials
            proxy.down = False
            restarts.append({"at_s": restart_after_s, "down_s": round(time.monotonic() - began, 1)})

        began = time.monotonic()
        restarter = threading.Thread(target=restart_s3, daemon=True)
        restarter.start()
        code1, first = _child(manifest, options, workdir / "r1.json", env, workdir / "r1.log")
        first_s = time.monotonic() - began
        restarter.join()
        code2, second = _child(manifest, options, workdir / "r2.json", env, workdir / "r2.log")
        stats = emu.stats()
        with WaveSpeedClient(emu.api_key, emu.base_url) as client:
            acc = account(weed.endpoint.boto3_client(), BUCKET, "videos/", manifest, client)
        failures = Counter(
            o["error_type"] for o in first.get("outcomes", []) if o["status"] != "archived"
        )
        # Not archived is "lost" only if no run reported it failed with a typed reason.
        typed = {
            o["item_id"]: o["error_type"]
            for o in second.get("outcomes", [])
            if o["status"] != "archived" and o.get("error_type")
        }
        row = acc.as_row()
        row["failed_typed_final"] = dict(Counter(typed.values()))
        row["lost"] = len([i for i in acc.lost if i not in typed])
        return {
            "videos": videos,
            "first_run_s": round(first_s, 1),
            "first_run": {
                "archived": first.get("archived"),
                "failed": first.get("failed"),
                "failed_by_type": dict(failures),
                "exit": code1,
            },
            "rerun": {
                "archived": second.get("archived"),
                "failed": second.get("failed"),
                "exit": code2,
            },
            "s3_restarts": restarts,
            "s3_throttled": proxy.throttled,
            "service_faults_injected": stats["faults_injected"],
            "service_calls": {
                k: stats[k]
                for k in ("submissions", "result_polls", "uploads", "downloads", "history_queries")
            },
            **row,
        }


def main(argv: list[str] | None = None) -> int:
    interrupt_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--latency", type=float, default=1.0)
    parser.add_argument("--in-flight", type=int, default=10)
    parser.add_argument("--restart-after", type=float, default=15.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wan-soak-") as tmp:
        result = run(args.videos, args.latency, args.in_flight, Path(tmp), args.restart_after)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = result["lost"] == 0 and result["duplicate_submissions"] == 0 and not result["corrupt"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
