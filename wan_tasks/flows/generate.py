"""The flows: one video, and a batch from a manifest.

Each video goes submit -> wait -> archive (`wan_tasks.flows.produce`: in-flight slots held by lanes,
archiving outside them). Failures are per video: a batch archives every video it can,
reports each failure with its typed reason, and a re-run does only what is missing.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.context import SyncClientContext
from prefect.runtime import flow_run
from prefect.states import Cancelled

from wan_tasks.api.models import I2VRequest
from wan_tasks.core.budget import Budget
from wan_tasks.core.manifest import ManifestItem, parse_manifest
from wan_tasks.devstack.embedded import EMULATOR_CONCURRENCY, EmbeddedServices, embedded_defaults
from wan_tasks.errors import BatchIncompleteError, VideoFailedError
from wan_tasks.flows.fanout import (
    FanOutOptions,
    Produced,
    ShardReport,
    ShardSpec,
    digest_context,
    plan_shards,
    run_shards,
    shard_jobs,
    write_shard_report,
)
from wan_tasks.flows.models import BatchReport, VideoJob, VideoOutcome
from wan_tasks.flows.options import ArchiveOptions, RunOptions
from wan_tasks.flows.produce import Producer
from wan_tasks.flows.reporting import publish_artifacts, write_summary
from wan_tasks.integration.limits import ensure_limits
from wan_tasks.integration.runtime import default_bucket, s3_bucket_block, s3_client
from wan_tasks.storage.archive import ArchiveTarget


def resolve_target(options: ArchiveOptions) -> ArchiveTarget:
    if options.s3_block:
        bucket, _ = s3_bucket_block(options.s3_block)
        bucket = options.bucket or bucket
    else:
        bucket = options.bucket or default_bucket() or ""
    if not bucket:
        raise ValueError(
            "archive.bucket: no bucket. Pass one, set WAN_TASKS_BUCKET, or leave both unset "
            "outside a configured environment to use the embedded store."
        )
    return ArchiveTarget(
        bucket=bucket,
        prefix=options.prefix,
        key_template=options.key_template,
        presign_expiry_s=options.presign_expiry_s,
        contact_sheet=options.contact_sheet,
        s3_block=options.s3_block,
    )


# generate_video is an async shell over synchronous work run in a thread (with the flow's
# context): Prefect 3.9 joins a sync flow run's heartbeat thread when the run ends, and that
# thread sleeps in 1 s steps, adding 0.5-1 s to every run; an async run does not wait for it.
# generate_batch stays sync (a plain call for its users), and pays that once per batch. The
# thread gets a sync Prefect client for its task runs to share: without one each made its
# own, ~6x the CPU of a task run in a sync flow (BENCHMARKS.md).
# From synchronous code: `asyncio.run(generate_video(...))`.


@flow(name="generate-video")
async def generate_video(
    request: I2VRequest,
    variant: str = "",
    archive: ArchiveOptions | None = None,
    options: RunOptions | None = None,
) -> VideoOutcome:
    """One request in, one archived video out (URIs, cost, timings)."""
    return await asyncio.to_thread(_generate_video, request, variant, archive, options)


def _generate_video(
    request: I2VRequest, variant: str, archive: ArchiveOptions | None, options: RunOptions | None
) -> VideoOutcome:
    archive, options = archive or ArchiveOptions(), options or RunOptions()
    # One Prefect client for this thread and the lanes' threads: the async flow's engine keeps
    # only an async one, so every sync task run, limit read and artifact here made its own,
    # each loading the CA bundle (25-50 ms of CPU before the submit, BENCHMARKS.md).
    with (
        SyncClientContext.get_or_create(),
        embedded_defaults(
            s3=not (archive.bucket or archive.s3_block), emulator=not options.credentials_block
        ) as services,
    ):
        _limits_for_emulator(services, options)
        target = resolve_target(archive)
        job = VideoJob(request=request, variant=variant, item_id="video")
        (outcome,) = Producer(target, options, Budget(options.budget_usd)).run([job])
        publish_artifacts(
            [outcome],
            title="Video",
            target=target,
            key=options.artifact_key,
            embedded_store=services.s3_endpoint,
        )
    if outcome.status != "archived":
        raise VideoFailedError(f"{outcome.error_type}: {outcome.error}")
    return outcome


def _limits_for_emulator(services: EmbeddedServices, options: RunOptions) -> None:
    """Against the embedded emulator, create missing limits to match it; against the real
    service they must exist (`wan-video limits`), and a missing one fails the run."""
    if services.emulator_url:
        ensure_limits(
            EMULATOR_CONCURRENCY,
            600 if options.limits.per_minute else None,
            names=options.limits,
            only_missing=True,
        )


def load_manifest(location: str, s3_block: str | None = None) -> list[ManifestItem]:
    """A manifest from a local path or an s3:// URI."""
    if location.startswith("s3://"):
        bucket, _, key = location.removeprefix("s3://").partition("/")
        if not bucket or not key:
            raise ValueError(f"manifest: {location!r} is not s3://bucket/key")
        body = s3_client(s3_block).get_object(Bucket=bucket, Key=key)["Body"].read()
        return parse_manifest(body, name=key)
    path = Path(location).expanduser()
    if not path.is_file():
        raise ValueError(f"manifest: no file at {location!r}")
    return parse_manifest(path.read_bytes(), name=path.name, base_dir=path.parent.resolve())


@flow(name="generate-batch")
def generate_batch(
    manifest: str,
    archive: ArchiveOptions | None = None,
    options: RunOptions | None = None,
    fail_on_item_error: bool = True,
    fan_out: FanOutOptions | None = None,
    shard: ShardSpec | None = None,
) -> BatchReport:
    """Every request of a JSONL/CSV manifest, within the account's limits and the budget.

    Bad rows are reported and cost nothing; the rest still run. A JSONL summary lands next to
    the outputs. With `fail_on_item_error`, the run ends Failed when any video did not land
    (after everything else landed), so schedulers and automations notice. Run from a
    deployment, a batch larger than `fan_out.shard_size` is spread over the work pool as
    child runs of `shard_size` videos each (`wan_tasks.flows.fanout`); `shard` is set only
    on those children.
    """
    archive, options = archive or ArchiveOptions(), options or RunOptions()
    fan_out = fan_out or FanOutOptions()
    log = get_run_logger()
    with embedded_defaults(
        s3=not (archive.bucket or archive.s3_block), emulator=not options.credentials_block
    ) as services:
        _limits_for_emulator(services, options)
        target = resolve_target(archive)
        items = load_manifest(manifest, archive.s3_block)
        jobs = [
            VideoJob(request=i.request, item_id=i.item_id, variant=i.variant, row=i.row)
            for i in items
            if i.request is not None
        ]
        invalid = [
            VideoOutcome(
                item_id=i.item_id,
                status="invalid",
                row=i.row,
                error_type="InvalidManifestRow",
                error=i.error,
            )
            for i in items
            if i.request is None
        ]
        for bad in invalid if shard is None else ():
            log.warning("not submitted: %s", bad.error)
        context = digest_context(target, _service_id(options)) if jobs else ""
        if shard is not None:  # a child of a fanned-out batch: its part only
            jobs, invalid = shard_jobs(jobs, shard, context), []
        plan = None
        if shard is None and jobs:
            plan = plan_shards(fan_out, jobs, embedded=services.any, context=context)
        if plan:
            produced = run_shards(
                *plan,
                jobs,
                manifest=manifest,
                archive=archive,
                options=options,
                fail_on_item_error=fail_on_item_error,
                target=target,
                poll_interval_s=fan_out.poll_interval_s,
            )
        else:
            produced = _produce(target, options, manifest, jobs)
        outcomes = sorted(produced.outcomes + invalid, key=lambda o: (o.row or 0, o.item_id))
        report = _report(manifest, outcomes, produced.spent)
        report.refund_expected_usd = produced.refund_expected
        report.rate_limit_wait_s = round(produced.rate_limit_wait_s, 3)
        if shard is not None:
            # The parent reads this and reports the batch; no summary or artifacts per shard.
            report.summary_uri = write_shard_report(
                target,
                manifest,
                ShardReport(
                    shard=shard,
                    flow_run_id=str(flow_run.id) if flow_run.id else None,
                    outcomes=outcomes,
                    new_spend_usd=report.new_spend_usd,
                    refund_expected_usd=report.refund_expected_usd,
                    rate_limit_wait_s=report.rate_limit_wait_s,
                    cancelled=produced.cancelled,
                ),
            )
        else:
            report.summary_uri = write_summary(target, manifest, outcomes, _run_label())
            publish_artifacts(
                outcomes,
                title=f"Batch {Path(manifest).name}",
                target=target,
                key=options.artifact_key,
                embedded_store=services.s3_endpoint,
                refund_expected=report.refund_expected_usd,
            )
    log.info(
        "batch %s%s: %d archived, %d failed, %d invalid, %d skipped; new spend $%s; summary %s",
        manifest,
        f" shard {shard.label}" if shard else "",
        report.archived,
        report.failed,
        report.invalid,
        report.skipped,
        report.new_spend_usd,
        report.summary_uri,
    )
    if report.refund_expected_usd:
        log.info(
            "of the new spend, $%s paid for tasks the service failed: it refunds failed tasks "
            "(within about 3 h); the budget counts them as spent until then",
            report.refund_expected_usd,
        )
    if produced.cancelled:
        # The run ends Cancelled, as asked, with its report (what landed, what was kept in
        # flight, what was never started) in the summary; a re-run completes the rest.
        return Cancelled(  # type: ignore[return-value]
            message=f"cancelled: {report.archived} of {report.total} videos archived; "
            f"see {report.summary_uri}. Re-run to complete the rest."
        )
    if fail_on_item_error and report.archived < report.total:
        error = BatchIncompleteError(
            f"{report.total - report.archived} of {report.total} videos did not land "
            f"({report.failed} failed, {report.invalid} invalid, {report.skipped} over budget); "
            f"see {report.summary_uri}. Re-run to complete only those."
        )
        error.report = report  # type: ignore[attr-defined]  # the CLI prints it from the state
        raise error
    return report


def _produce(
    target: ArchiveTarget, options: RunOptions, manifest: str, jobs: list[VideoJob]
) -> Produced:
    """The videos made in this process, by its lanes."""
    budget = Budget(options.budget_usd)
    waited = _rate_limited_wait(options) if jobs else 0.0
    producer = Producer(target, options, budget, batch=_batch_name(manifest))
    outcomes = producer.run(jobs)
    return Produced(
        outcomes=outcomes,
        spent=budget.spent,
        refund_expected=producer.refund_expected,
        rate_limit_wait_s=_rate_limited_wait(options) - waited if jobs else 0.0,
        cancelled=producer.cancelled,
    )


def _service_id(options: RunOptions) -> str:
    from wan_tasks.integration.runtime import wavespeed_client

    return wavespeed_client(options.credentials_block).service_id


def _report(manifest: str, outcomes: list[VideoOutcome], spent: Decimal) -> BatchReport:
    def count(status: str) -> int:
        return sum(1 for o in outcomes if o.status == status)

    return BatchReport(
        manifest=manifest,
        total=len(outcomes),
        archived=count("archived"),
        failed=count("failed"),
        invalid=count("invalid"),
        skipped=count("skipped"),
        cost_usd=sum((o.cost_usd for o in outcomes if o.status == "archived"), Decimal("0")),
        new_spend_usd=spent,
        outcomes=outcomes,
    )


def _batch_name(manifest: str) -> str:
    """The manifest's file name, for tags: `prompts.jsonl` of a path or an s3:// URI."""
    return manifest.rstrip("/").rsplit("/", 1)[-1] or manifest


def _rate_limited_wait(options: RunOptions) -> float:
    """What the process's shared client has slept on 429s so far (other flows running in
    this process at the same time add theirs)."""
    from wan_tasks.integration.runtime import wavespeed_client

    return wavespeed_client(options.credentials_block).rate_limited_wait_s


def _run_label() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{flow_run.name or 'local'}"
