"""The baseline: the same job done with the official `wavespeed` SDK and plain boto3.

Upload the image (`Client.upload`, the SDK's presigned flow), `Client.run()` (submit, then a
poll every `poll_interval`, 1 s by default), download the MP4, one boto3 `put_object`. No
caching, no checksums, no manifest, no contact sheet: what a user would write by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import SAMPLE
from bench.stack import BUCKET

MODEL = "wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast"


@dataclass(frozen=True)
class SdkResult:
    prediction_id: str
    seconds: float
    size: int


def sdk_client(api_key: str, base_url: str) -> Any:
    from wavespeed import Client

    # max_retries=0: the SDK's task-level retries would resubmit (pay again) on failures.
    return Client(api_key=api_key, base_url=base_url, max_retries=0)


def sdk_job(
    client: Any,
    s3: Any,
    prompt: str,
    seed: int,
    *,
    image: Path = SAMPLE,
    poll_interval: float = 1.0,
) -> SdkResult:
    began = time.perf_counter()
    image_url = client.upload(str(image))
    result = client.run(
        MODEL,
        {"image": image_url, "prompt": prompt, "duration": 5, "seed": seed},
        timeout=1800,
        poll_interval=poll_interval,
    )
    (url,) = result["outputs"]
    body = httpx.get(url, timeout=60).raise_for_status().content
    prediction_id = url.rsplit("/", 1)[-1].removesuffix(".mp4")
    s3.put_object(Bucket=BUCKET, Key=f"sdk/{prediction_id}.mp4", Body=body, ContentType="video/mp4")
    return SdkResult(prediction_id, time.perf_counter() - began, len(body))


def sdk_pool(
    client: Any,
    s3: Any,
    prompts: Sequence[str],
    *,
    threads: int,
    poll_interval: float = 1.0,
    on_done: Callable[[SdkResult], None] | None = None,
) -> list[SdkResult]:
    """Every prompt through `sdk_job`, `threads` at a time (the pool bounds work in flight)."""

    def one(i: int) -> SdkResult:
        done = sdk_job(client, s3, prompts[i], seed=i, poll_interval=poll_interval)
        if on_done:
            on_done(done)
        return done

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sdk") as pool:
        return list(pool.map(one, range(len(prompts))))
