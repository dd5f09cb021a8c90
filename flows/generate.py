"""The flows: one video, and a batch from a manifest.

Each video goes submit -> wait -> archive. The in-flight slot (the account's concurrent-task
cap) is held from before submit until the wait ends, so it counts exactly what the service
counts; archiving happens outside it. Failures are per video: a batch archives every video it
can, reports each failure with its typed reason, and a re-run does only what is missing.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.models import BatchReport, VideoJob, VideoOutcome, archived_outcome
from flows.reporting import publish_artifacts, write_summary
from flows.settings import ArchiveOptions, RunOptions
from wan_tasks.budget import Budget, BudgetExceededError
from wan_tasks.embedded import EMULATOR_CONCURRENCY, EmbeddedServices, embedded_defaults
from wan_tasks.errors import OutputExpiredError, TaskFailedError
from wan_tasks.fingerprint import derive_seed
from wan_tasks.ledger import LedgerSettings
from wan_tasks.limits import LimitSettings, ensure_limits
from wan_tasks.manifest import ManifestItem, parse_manifest
from wan_tasks.models import I2VRequest, Prediction
from wan_tasks.runtime import default_bucket, s3_bucket_block, s3_client
from wan_tasks.storage.archive import ArchiveTarget
from wan_tasks.tasks import SubmittedVideo, archive_to_s3, submit_i2v, wait_for_prediction


class VideoFailedError(RuntimeError):
    """The video was not made or not archived; the message carries the typed reason."""


class BatchIncompleteError(RuntimeError):
    """Some videos of a batch did not land. The summary says which and why; re-run the flow to
    complete only those."""


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
        bucket=bucket, prefix=options.prefix, key_template=options.key_template,
        presign_expiry_s=options.presign_expiry_s, contact_sheet=options.contact_sheet,
        s3_block=options.s3_block,
    )


def _in_flight(limits: LimitSettings) -> AbstractContextManager[Any]:
    if not limits.in_flight:
        return nullcontext()
    from prefect.concurrency.sync import concurrency

    # strict: a missing limit must fail loudly, not throttle nothing.
    return concurrency(limits.in_flight, occupy=1, strict=True,
                       timeout_seconds=limits.acquire_timeout_s)


def produce_video(
    job: VideoJob, target: ArchiveTarget, options: RunOptions, budget: Budget
) -> VideoOutcome:
    """submit -> wait -> archive for one video.

    A plain function, not a task: tasks nested in a task share its transaction, so a failed
    or crashed parent would roll back the submit's cache record and a re-run would pay again.
    Run from the flow, each task commits its record the moment it succeeds."""
    request = derive_seed(job.request, job.variant)
    this_run = str(flow_run.id) if flow_run.id else None
    ledger = (LedgerSettings(bucket=target.bucket, prefix=options.ledger_prefix,
                             s3_block=target.s3_block) if options.ledger else None)
    attempt = new_submissions = 0
    while True:
        try:
            submitted, prediction = _submit_and_wait(request, job, attempt, options, budget,
                                                     ledger)
            new_submissions += submitted.flow_run_id == this_run
            archived = archive_to_s3(submitted, prediction, target,
                                     credentials_block=options.credentials_block)
            break
        except _Failed as failed:
            new_submissions += failed.fresh
            last: Exception = failed.cause
            # Resubmit when the service failed the job itself (5000/5003/5004), or when the
            # failure is from an earlier run (re-running is asking to try again). The attempt
            # number is part of the request key, so later runs find each attempt.
            if not (failed.cause.retryable or not failed.fresh):
                raise failed.cause from None
        except OutputExpiredError as exc:
            if not options.allow_resubmit_expired:
                raise OutputExpiredError(
                    f"{exc.message}. Set allow_resubmit_expired to pay for it again.",
                    prediction_id=exc.prediction_id,
                ) from None
            last = exc
        if new_submissions >= options.max_attempts:
            raise last
        attempt += 1
        get_run_logger().warning("%s: resubmitting as attempt %d (a new, paid task)",
                                 job.item_id or "video", attempt + 1)
    return archived_outcome(job, submitted, prediction, archived)


class _Failed(Exception):
    def __init__(self, cause: TaskFailedError, fresh: bool) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.fresh = fresh


def _submit_and_wait(
    request: I2VRequest, job: VideoJob, attempt: int, options: RunOptions, budget: Budget,
    ledger: LedgerSettings | None,
) -> tuple[SubmittedVideo, Prediction]:
    """Submit (or reconnect) and wait, holding one in-flight slot for both."""
    this_run = str(flow_run.id) if flow_run.id else None
    with _in_flight(options.limits):
        submitted = submit_i2v(
            request, variant=job.variant, attempt=attempt, item_id=job.item_id,
            credentials_block=options.credentials_block, budget=budget,
            rate_limit_name=options.limits.per_minute, ledger=ledger,
        )
        try:
            prediction = wait_for_prediction(
                submitted, timeout_s=options.wait_timeout_s, poll=options.poll,
                credentials_block=options.credentials_block,
            )
        except TaskFailedError as exc:
            raise _Failed(exc, fresh=submitted.flow_run_id == this_run) from exc
    return submitted, prediction


def _produce_or_report(
    job: VideoJob, target: ArchiveTarget, options: RunOptions, budget: Budget
) -> VideoOutcome:
    try:
        return produce_video(job, target, options, budget)
    except Exception as exc:
        return VideoOutcome(
            item_id=job.item_id, row=job.row,
            status="skipped" if isinstance(exc, BudgetExceededError) else "failed",
            prediction_id=getattr(exc, "prediction_id", None),
            error_type=type(exc).__name__, error=str(exc),
        )


def _run_jobs(jobs: list[VideoJob], target: ArchiveTarget, options: RunOptions, budget: Budget
              ) -> list[VideoOutcome]:
    """Each video in its own thread, with a copy of the flow's context so its task runs belong
    to the flow run. The in-flight limit, not the thread count, bounds work at the service."""
    if not jobs:
        return []
    workers = min(WORKERS, len(jobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wan-video") as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, _produce_or_report, job, target,
                        options, budget)
            for job in jobs
        ]
        return [f.result() for f in futures]


WORKERS = 32


@flow(name="generate-video")
def generate_video(
    request: I2VRequest,
    variant: str = "",
    archive: ArchiveOptions | None = None,
    options: RunOptions | None = None,
) -> VideoOutcome:
    """One request in, one archived video out (URIs, cost, timings)."""
    archive, options = archive or ArchiveOptions(), options or RunOptions()
    with embedded_defaults(s3=not (archive.bucket or archive.s3_block),
                           emulator=not options.credentials_block) as services:
        _limits_for_emulator(services, options)
        target = resolve_target(archive)
        job = VideoJob(request=request, variant=variant, item_id="video")
        (outcome,) = _run_jobs([job], target, options, Budget(options.budget_usd))
        publish_artifacts([outcome], title="Video", s3_block=target.s3_block)
    if outcome.status != "archived":
        raise VideoFailedError(f"{outcome.error_type}: {outcome.error}")
    return outcome


def _limits_for_emulator(services: EmbeddedServices, options: RunOptions) -> None:
    """Against the embedded emulator, create missing limits to match it; against the real
    service they must exist (`wan-video limits`), and a missing one fails the run."""
    if services.emulator_url:
        ensure_limits(EMULATOR_CONCURRENCY, 600, names=options.limits, only_missing=True)


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
) -> BatchReport:
    """Every request of a JSONL/CSV manifest, within the account's limits and the budget.

    Bad rows are reported and cost nothing; the rest still run. A JSONL summary lands next to
    the outputs. With `fail_on_item_error`, the run ends Failed when any video did not land
    (after everything else landed), so schedulers and automations notice.
    """
    archive, options = archive or ArchiveOptions(), options or RunOptions()
    log = get_run_logger()
    with embedded_defaults(s3=not (archive.bucket or archive.s3_block),
                           emulator=not options.credentials_block) as services:
        _limits_for_emulator(services, options)
        target = resolve_target(archive)
        items = load_manifest(manifest, archive.s3_block)
        jobs = [VideoJob(request=i.request, item_id=i.item_id, variant=i.variant, row=i.row)
                for i in items if i.request is not None]
        invalid = [VideoOutcome(item_id=i.item_id, status="invalid", row=i.row,
                                error_type="InvalidManifestRow", error=i.error)
                   for i in items if i.request is None]
        for bad in invalid:
            log.warning("not submitted: %s", bad.error)
        budget = Budget(options.budget_usd)
        outcomes = sorted(_run_jobs(jobs, target, options, budget) + invalid,
                          key=lambda o: (o.row or 0, o.item_id))
        report = _report(manifest, outcomes, budget.spent)
        report.summary_uri = write_summary(target, manifest, outcomes, _run_label())
        publish_artifacts(outcomes, title=f"Batch {Path(manifest).name}",
                          s3_block=target.s3_block)
    log.info("batch %s: %d archived, %d failed, %d invalid, %d skipped; new spend $%s; "
             "summary %s", manifest, report.archived, report.failed, report.invalid,
             report.skipped, report.new_spend_usd, report.summary_uri)
    if fail_on_item_error and report.archived < report.total:
        raise BatchIncompleteError(
            f"{report.total - report.archived} of {report.total} videos did not land "
            f"({report.failed} failed, {report.invalid} invalid, {report.skipped} over budget); "
            f"see {report.summary_uri}. Re-run to complete only those."
        )
    return report


def _report(manifest: str, outcomes: list[VideoOutcome], spent: Decimal) -> BatchReport:
    def count(status: str) -> int:
        return sum(1 for o in outcomes if o.status == status)

    return BatchReport(
        manifest=manifest, total=len(outcomes), archived=count("archived"),
        failed=count("failed"), invalid=count("invalid"), skipped=count("skipped"),
        cost_usd=sum((o.cost_usd for o in outcomes if o.status == "archived"), Decimal("0")),
        new_spend_usd=spent, outcomes=outcomes,
    )


def _run_label() -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{flow_run.name or 'local'}"


