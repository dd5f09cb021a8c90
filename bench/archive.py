"""Archive: a 1 GiB output streamed to S3 through `S3Archiver` (the archive task's path) against
boto3's `upload_file` of the same bytes from local disk: throughput and peak memory.

    python -m bench.archive [--quick] [--size-mib 1024] [--repeat 2]

Each upload runs in a fresh child process (`--child`), which imports everything, makes one
small warm-up PUT, resets its VmHWM (`/proc/self/clear_refs`), uploads, and reports its peak
resident memory above the RSS it had just before. The archiver reads the file as a stream of
1 MiB chunks (what `iter_bytes(1 MiB)` of the download gives it), never seeking. Both use the
same S3 client configuration (`make_s3_client`) against the same SeaweedFS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import (
    MiB,
    cpu_seconds,
    emit,
    hwm_mib,
    median,
    reset_hwm,
    rss_mib,
    run_script,
    self_cpu_seconds,
    table,
)
from bench.stack import BUCKET, s3_store
from wan_tasks.devstack.processes import run_child

logger = logging.getLogger("bench.archive")

VARIANTS = {
    "boto3": "boto3 upload_file from disk (baseline)",
    "archiver": "S3Archiver, default ArchiveTarget (the flow's path)",
    "archiver-nosheet": "S3Archiver, contact_sheet=False (no local spool)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, not 1 GiB")
    parser.add_argument("--size-mib", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, Path(args.file))), flush=True)
        return
    repeat = args.repeat or 1
    size_mib = args.size_mib or (256 if args.quick else 1024)
    workdir = Path(tempfile.mkdtemp(prefix="wan-bench-archive-"))
    try:
        source = workdir / "output.bin"
        _write_random(source, size_mib * MiB)
        with s3_store(workdir) as (endpoint, weed_pid):
            results: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS}
            for i in range(repeat):
                for variant in VARIANTS:
                    weed0 = cpu_seconds(weed_pid or 0)
                    results[variant].append(_run_child(variant, source, endpoint.env()))
                    results[variant][-1]["weed_cpu_s"] = cpu_seconds(weed_pid or 0) - weed0
                    logger.info("%s #%d: %.1fs", variant, i + 1, results[variant][-1]["seconds"])
        _report(results, size_mib)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _write_random(path: Path, size: int) -> None:
    rng = random.Random(6)  # incompressible bytes: nothing can shortcut the transfer
    with path.open("wb") as fh:
        for _ in range(size // (64 * MiB)):
            fh.write(rng.randbytes(64 * MiB))
        fh.write(rng.randbytes(size % (64 * MiB)))


def _run_child(variant: str, source: Path, s3_env: dict[str, str]) -> dict[str, Any]:
    env = {**os.environ, **s3_env}
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    done = run_child(
        [sys.executable, "-m", "bench.archive", "--child", variant, "--file", str(source)],
        env=env,
        timeout=1800,
        cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"archive child {variant} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class _TimedS3:
    """Forwards to a boto3 client, adding up the seconds spent in each S3 operation."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name.startswith("_"):
            return target

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

        return timed


def _child(variant: str, source: Path) -> dict[str, Any]:
    from wan_tasks.storage.archive import ArchiveTarget, S3Archiver, make_s3_client
    from wan_tasks.storage.keys import KeyFields

    client = make_s3_client()
    client.put_object(Bucket=BUCKET, Key="warm-up", Body=b"x" * 1024)  # connections, models
    timed = _TimedS3(client)
    key = f"archive-bench/{uuid.uuid4().hex}"
    upload: Callable[[], Any]
    if variant == "boto3":

        def upload() -> Any:
            return client.upload_file(
                str(source), BUCKET, key + ".mp4", ExtraArgs={"ContentType": "video/mp4"}
            )
    else:
        target = ArchiveTarget(
            bucket=BUCKET, prefix="archive-bench", contact_sheet=variant == "archiver"
        )
        archiver = S3Archiver(timed, target)  # type: ignore[arg-type]
        fields = KeyFields(
            prediction_id=uuid.uuid4().hex,
            model="bench/model",
            created_at=datetime.now(UTC),
            seed=1,
            duration=5,
            prefix="archive-bench",
        )

        def upload() -> Any:
            with source.open("rb") as fh:
                return archiver.archive(
                    iter(lambda: fh.read(MiB), b""),
                    fields,
                    metadata={"model": "bench"},
                    sidecar={"bench": True},
                    expected_size=source.stat().st_size,
                )

    hwm_reset = reset_hwm()
    baseline = rss_mib()
    cpu0, began = self_cpu_seconds(), time.perf_counter()
    upload()
    seconds = time.perf_counter() - began
    cpu = self_cpu_seconds() - cpu0
    peak = hwm_mib()
    # For the diagnosis: what hashing the bytes alone costs here (the archiver hashes twice:
    # the whole file, and each part for its checksum).
    began = time.perf_counter()
    digest = hashlib.sha256()
    with source.open("rb") as fh:
        for chunk in iter(lambda: fh.read(MiB), b""):
            digest.update(chunk)
    sha_s = time.perf_counter() - began
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "baseline_rss_mib": baseline,
        "hwm_mib": peak,
        "peak_above_mib": peak - baseline if hwm_reset else None,
        "hwm_reset": hwm_reset,
        "s3_seconds": timed.seconds,
        "sha256_1x_s": sha_s,
        "size": source.stat().st_size,
    }


def _report(results: dict[str, list[dict[str, Any]]], size_mib: int) -> None:
    base = median([size_mib / r["seconds"] for r in results["boto3"]])
    rows = []
    for variant, runs in results.items():
        rates = [size_mib / r["seconds"] for r in runs]
        peaks = [r["peak_above_mib"] for r in runs if r["peak_above_mib"] is not None]
        s3 = runs[-1]["s3_seconds"]
        calls = (
            ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(s3.items(), key=lambda kv: -kv[1]) if v >= 0.05
            )
            or "-"
        )
        rows.append(
            [
                VARIANTS[variant],
                len(runs),
                median([r["seconds"] for r in runs]),
                median(rates),
                f"{median(rates) / base:.0%}",
                max(peaks) if peaks else "n/a",
                median([r["cpu_s"] for r in runs]),
                median([r["weed_cpu_s"] for r in runs]),
                calls,
            ]
        )
    text = table(
        [
            "variant",
            "runs",
            "seconds",
            "MiB/s",
            "vs boto3",
            "peak RSS above base MiB",
            "client CPU s",
            "SeaweedFS CPU s",
            "S3 call seconds (last run; parts overlap)",
        ],
        rows,
    )
    sha = median([r["sha256_1x_s"] for rs in results.values() for r in rs])
    text += (
        f"\n\n{size_mib} MiB of random bytes; SHA-256 of them alone takes {sha:.1f} s here. "
        "Peak = VmHWM after the upload minus VmRSS just before it (HWM reset first)."
    )
    emit(
        "archive",
        f"Archive: {size_mib} MiB streamed to S3",
        text,
        {"size_mib": size_mib, "results": results},
    )


if __name__ == "__main__":
    run_script(main)
