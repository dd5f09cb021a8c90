"""How the video steps compose with the rest of a content pipeline.

Upstream: a step that has a list of shots writes them as a JSONL manifest to S3 and hands the
manifest to the `generate-batch/on-demand` deployment with `run_deployment(...)`; a worker runs
the batch. `hand_off` is the reusable part; `request_videos` is an example upstream flow.

Downstream: `catalog_video` runs once per archived video, started by the deployment trigger on
the `wan.video.archived` event in prefect.yaml (the `catalog-video/on-archived` deployment).
The archive task emits that event for every video of every run, also for one found already
archived by a re-run, so a downstream step must be idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from wan_tasks.integration.runtime import default_bucket, s3_bucket_block, s3_client

ON_DEMAND = "generate-batch/on-demand"


def write_manifest(
    rows: Iterable[Mapping[str, Any]],
    key: str,
    bucket: str | None = None,
    s3_block: str | None = None,
) -> str:
    """Put rows (`id`, `image`, `prompt`, ...) as a JSONL manifest at s3://bucket/key: the
    environment's S3 and WAN_TASKS_BUCKET, or a saved prefect-aws S3Bucket block's."""
    if s3_block:
        block_bucket, s3 = s3_bucket_block(s3_block)
        bucket = bucket or block_bucket
    else:
        s3 = s3_client()
    bucket = bucket or default_bucket()
    if not bucket:
        raise ValueError("no bucket: pass one, set WAN_TASKS_BUCKET or name an S3 block")
    body = "".join(json.dumps(dict(row), sort_keys=True) + "\n" for row in rows)
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode(), ContentType="application/x-ndjson")
    return f"s3://{bucket}/{key}"


def hand_off(
    manifest: str,
    *,
    deployment: str = ON_DEMAND,
    prefix: str | None = None,
    budget_usd: Decimal | str | None = None,
    options: Mapping[str, Any] | None = None,
    wait: bool = True,
    timeout_s: float | None = None,
    idempotency_key: str | None = None,
) -> FlowRun:
    """Start a `generate_batch` deployment on a manifest; return its flow run.

    Parameters are JSON, as the worker receives them. `options` are `RunOptions` fields
    (e.g. `poll`, `limits`); `budget_usd` caps new spend for this run. With `wait=False` it
    returns once the run is scheduled; a worker picks it up. Called inside a flow, the batch
    shows up as that flow's subflow. The same `idempotency_key` returns the run already
    created instead of starting another (for an upstream step that may be retried).
    """
    run_options = dict(options or {})
    if budget_usd is not None:
        run_options["budget_usd"] = str(budget_usd)
    parameters: dict[str, Any] = {"manifest": manifest}
    if prefix is not None:
        parameters["archive"] = {"prefix": prefix}
    if run_options:
        parameters["options"] = run_options
    run = run_deployment(
        deployment,
        parameters=parameters,
        timeout=timeout_s if wait else 0,
        idempotency_key=idempotency_key,
    )
    # Called from sync code it runs synchronously; the declared type also allows a coroutine.
    assert isinstance(run, FlowRun)
    return run


@flow(name="request-videos")
def request_videos(
    shots: list[dict[str, Any]],
    name: str,
    prefix: str = "videos/requested",
    budget_usd: Decimal | None = None,
    options: dict[str, Any] | None = None,
) -> str:
    """Example upstream step: write the shots as a manifest and run the batch on a worker
    (`options`: RunOptions fields for it). Fails when the batch did not complete, so the
    pipeline stops here rather than publishing a partial set."""
    manifest = write_manifest(shots, f"manifests/{name}.jsonl")
    # A retry of this flow run finds the batch it already started.
    run = hand_off(
        manifest,
        prefix=prefix,
        budget_usd=budget_usd,
        options=options,
        idempotency_key=f"{flow_run.id}:{manifest}",
    )
    state = run.state
    if state is None or not state.is_completed():
        raise RuntimeError(
            f"batch run {run.name} for {manifest} ended "
            f"{state.name if state else 'without a state'}"
        )
    get_run_logger().info("batch run %s completed for %s", run.name, manifest)
    return str(run.id)


@flow(name="catalog-video")
def catalog_video(s3_uri: str, sidecar_uri: str = "", sha256: str = "") -> dict[str, Any]:
    """Example downstream step, one run per `wan.video.archived` event: check the object is
    there with the checksum the event announced, and read its sidecar manifest. Replace the
    body with your step (publish, transcode, notify); keep it idempotent."""
    bucket, _, key = s3_uri.removeprefix("s3://").partition("/")
    s3 = s3_client()
    head = s3.head_object(Bucket=bucket, Key=key)
    stored = head.get("Metadata", {}).get("sha256", "")
    if sha256 and stored != sha256:
        raise ValueError(f"{s3_uri}: sha256 {stored!r} is not the announced {sha256!r}")
    sidecar: dict[str, Any] = {}
    if sidecar_uri:
        m_bucket, _, m_key = sidecar_uri.removeprefix("s3://").partition("/")
        sidecar = json.loads(s3.get_object(Bucket=m_bucket, Key=m_key)["Body"].read())
    get_run_logger().info(
        "catalogued %s (%d bytes, prediction %s)",
        s3_uri,
        head["ContentLength"],
        sidecar.get("prediction_id", "?"),
    )
    return {
        "s3_uri": s3_uri,
        "size": head["ContentLength"],
        "sha256": stored,
        "prediction_id": sidecar.get("prediction_id"),
        "item_id": sidecar.get("item_id"),
    }
