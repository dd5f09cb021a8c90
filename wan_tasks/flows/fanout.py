"""Fan-out of a large batch over the work pool: shards of one manifest as child flow runs.

This module owns the fan-out parameters (`FanOutOptions`), the split of a manifest's videos
into shards (`ShardSpec`, contiguous and content-addressed), the shard reports in the archive
bucket, and the parent's side: deciding whether to fan out, starting the children with
`run_deployment`, waiting for them, cancelling them when the parent is cancelled, and turning
their reports into the one list of per-video outcomes that `generate_batch` reports.

- Children run the same `generate-batch` flow (by default the parent's own deployment), with
  the manifest location, the parent's archive and run options and a `shard` (a row range
  plus the digest of its content): no new deployment to create, and parameters never hold a
  secret. Each child's lanes take slots from the same global in-flight limit.
- The handoff is a JSON report per child run in the archive bucket, at
  `{prefix}/batches/{manifest}/shards/{digest}/{flow_run_id}.json`: every worker can already
  write there (it archives there), while a flow-run result would need result storage shared
  by all workers. The key names the run, so a report left by an earlier run (or a concurrent
  one) is never taken for this run's; the digest names the content, so a re-run finds the
  shards that fully landed and starts only the others (whose children then skip, through
  the per-video ledger, the videos that did land). A landed shard is taken from its report,
  not checked object by object: delete its reports to have it run (and checked) again.
- The parent holds no in-flight slot: it only polls the children's states (for as long as
  they take, as `run_deployment` does). Its batch budget is split over the shards it
  starts, in proportion to their videos. Children read the manifest themselves, so it must
  be an s3:// URI or a path that is the same on every worker (the deployments' checkout).
- Cancelling the parent cancels the children: they are linked as subflows (`as_subflow`, so
  the server's cancellation service would also reach them, within its loop), and the parent
  itself moves every unfinished child to Cancelling as soon as it sees its own cancellation
  (a termination signal from its worker, or its state read while polling).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wan_tasks.core.identity import derive_seed, normalised_body
from wan_tasks.errors import ConfigurationError, ManifestError, RunIncompleteError
from wan_tasks.flows.models import VideoJob, VideoOutcome
from wan_tasks.flows.options import ArchiveOptions, RunOptions
from wan_tasks.integration.runtime import s3_client
from wan_tasks.storage.archive import ArchiveTarget
from wan_tasks.storage.keys import sanitise_prefix, sanitise_segment

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun, State

logger = logging.getLogger(__name__)

DIGEST_VERSION = "wan-shard-v1"
BATCH_FLOW = "generate-batch"
# The largest shard a default worker process runs well: a few hundred lanes (threads) and
# ~0.2 CPU-s of orchestration a video. A Gold account (3,000 in flight) fills its limit
# with about six of them.
DEFAULT_SHARD_SIZE = 500


class FanOutOptions(BaseModel):
    """Whether and how a batch is spread over the work pool as child flow runs."""

    model_config = ConfigDict(extra="forbid")

    enabled: Literal["auto"] | bool = Field(
        "auto",
        description="'auto': fan out when run from a deployment, with shared services, and "
        "the batch has more videos than shard_size; true: always (an error says why it "
        "cannot); false: one process",
    )
    shard_size: int = Field(
        DEFAULT_SHARD_SIZE, ge=1, le=100_000, description="videos per child flow run, at most"
    )
    deployment: str | None = Field(
        None,
        min_length=1,
        description="'generate-batch/<name>' to run the shards on; empty: this run's own "
        "deployment (which must have no concurrency limit: its children would queue behind it)",
    )
    poll_interval_s: float = Field(
        5.0, gt=0, le=300, description="how often the parent reads its children's states"
    )


class ShardSpec(BaseModel):
    """One child's part of a batch: the manifest's valid videos [start, stop), in manifest
    order, and the digest of their content (checked by the child, which reads the manifest
    itself). Set by the parent run; leave it empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int = Field(ge=0)
    count: int = Field(ge=1)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _ordered(self) -> ShardSpec:
        if self.stop <= self.start:
            raise ValueError(f"shard: stop ({self.stop}) must be above start ({self.start})")
        if self.index >= self.count:
            raise ValueError(f"shard: index ({self.index}) must be below count ({self.count})")
        return self

    @property
    def label(self) -> str:
        return f"{self.index + 1}/{self.count}"


class ShardReport(BaseModel):
    """What one child run made of its shard: written by the child, read by the parent."""

    shard: ShardSpec
    flow_run_id: str | None
    outcomes: list[VideoOutcome]
    new_spend_usd: Decimal = Decimal("0")
    refund_expected_usd: Decimal = Decimal("0")
    rate_limit_wait_s: float = 0.0
    cancelled: bool = False

    def landed(self, item_ids: Sequence[str]) -> bool:
        """Every video of the shard archived (and the report is about exactly them)."""
        return sorted(o.item_id for o in self.outcomes) == sorted(item_ids) and all(
            o.status == "archived" for o in self.outcomes
        )


@dataclass
class Produced:
    """The videos of a batch as made here or by the children, for `generate_batch`'s report."""

    outcomes: list[VideoOutcome]
    spent: Decimal = Decimal("0")
    refund_expected: Decimal = Decimal("0")
    rate_limit_wait_s: float = 0.0
    cancelled: bool = False
    shard_runs: list[str] = field(default_factory=list)


# -- splitting ------------------------------------------------------------------------------


def digest_context(target: ArchiveTarget, service_id: str) -> str:
    """What else makes a shard's report valid for a run: the service and account it was paid
    on (an emulator dry run never stands in for the real service) and the object layout."""
    return json.dumps({"service": service_id, "key_template": target.key_template})


def shard_digest(jobs: Sequence[VideoJob], context: str) -> str:
    """The content of a run of jobs: ids, variants and request bodies with local images by
    content hash, so two machines with the checkout at different paths agree."""
    rows = [
        [job.item_id, job.variant, normalised_body(derive_seed(job.request, job.variant))]
        for job in jobs
    ]
    text = json.dumps([DIGEST_VERSION, context, rows], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def split(jobs: Sequence[VideoJob], shard_size: int, context: str) -> list[ShardSpec]:
    """Contiguous shards of at most `shard_size` videos, as even as possible (1,001 videos
    at 500: 334, 334 and 333, not 500, 500 and 1)."""
    if shard_size < 1:
        raise ValueError(f"fan_out.shard_size: must be at least 1, got {shard_size}")
    if not jobs:
        return []
    count = math.ceil(len(jobs) / shard_size)
    base, extra = divmod(len(jobs), count)
    specs, start = [], 0
    for index in range(count):
        stop = start + base + (1 if index < extra else 0)
        specs.append(
            ShardSpec(
                index=index,
                count=count,
                start=start,
                stop=stop,
                digest=shard_digest(jobs[start:stop], context),
            )
        )
        start = stop
    return specs


def shard_jobs(jobs: Sequence[VideoJob], shard: ShardSpec, context: str) -> list[VideoJob]:
    """The child's videos, checked against what the parent split: a manifest edited (or a
    service switched) in between would otherwise make videos nobody asked for."""
    part = list(jobs[shard.start : shard.stop])
    if len(part) != shard.stop - shard.start or shard_digest(part, context) != shard.digest:
        raise ManifestError(
            f"shard {shard.label}: the manifest's valid rows {shard.start + 1}-{shard.stop} "
            "are not the ones the parent batch split (the manifest, its images or the "
            "service changed since); nothing was submitted. Re-run the whole batch."
        )
    return part


def shard_budget(budget: Decimal | None, videos: int, of_videos: int) -> Decimal | None:
    """A child's share of the batch budget: in proportion to its videos, rounded down to a
    cent, so the children together never exceed it."""
    if budget is None:
        return None
    share = budget * videos / max(of_videos, 1)
    return share.quantize(Decimal("0.01"), rounding=ROUND_DOWN)


# -- deciding -------------------------------------------------------------------------------


def should_fan_out(
    enabled: Literal["auto"] | bool,
    *,
    videos: int,
    shard_size: int,
    deployment: str | None,
    embedded: bool,
    own_deployment_limited: bool,
) -> bool:
    """Whether to fan out; with `enabled=True`, an error naming what prevents it."""
    if enabled is False or videos == 0:
        return False
    reason = None
    if embedded:
        reason = (
            "this run uses the embedded emulator or store (no WAVESPEED_API_KEY or "
            "WAN_TASKS_BUCKET), which child runs in other processes cannot share"
        )
    elif deployment is None:
        reason = "this run is not from a deployment and fan_out.deployment names none"
    elif own_deployment_limited:
        reason = (
            "this run's deployment has a concurrency limit, so its children would wait "
            "behind it forever; name another deployment of generate-batch in fan_out.deployment"
        )
    if reason:
        if enabled is True:
            raise ConfigurationError(f"fan_out.enabled: cannot fan out: {reason}")
        if videos > shard_size:
            logger.info("%d videos in one process: %s", videos, reason)
        return False
    return enabled is True or videos > shard_size


def plan_shards(
    fan_out: FanOutOptions, jobs: Sequence[VideoJob], *, embedded: bool, context: str
) -> tuple[str, list[ShardSpec]] | None:
    """(deployment to run the shards on, the shards), or None to make the batch here."""
    if fan_out.enabled is False or not jobs:
        return None
    if fan_out.enabled == "auto" and len(jobs) <= fan_out.shard_size:
        return None  # small batches stay in one process, without asking the server anything
    from prefect.runtime import deployment as this_deployment

    own = str(this_deployment.id) if this_deployment.id else None
    target = fan_out.deployment or own
    limited = False
    if target is not None and not embedded:
        limited = _check_deployment(target, own)
    if not should_fan_out(
        fan_out.enabled,
        videos=len(jobs),
        shard_size=fan_out.shard_size,
        deployment=target,
        embedded=embedded,
        own_deployment_limited=limited,
    ):
        return None
    assert target is not None
    return target, split(jobs, fan_out.shard_size, context)


def _check_deployment(name: str, own: str | None) -> bool:
    """That `name` is a deployment of generate-batch; True if it is this run's own and has a
    concurrency limit."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            as_id = _as_uuid(name)
            found = client.read_deployment(as_id) if as_id else client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ConfigurationError(
                f"fan_out.deployment: no deployment {name!r} on this Prefect server "
                "('generate-batch/<deployment name>')"
            ) from None
        flow_name = client.read_flow(found.flow_id).name
    if flow_name != BATCH_FLOW:
        raise ConfigurationError(
            f"fan_out.deployment: {name!r} runs flow {flow_name!r}, not {BATCH_FLOW!r}"
        )
    return str(found.id) == own and found.global_concurrency_limit is not None


def _as_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


# -- reports in the archive bucket ------------------------------------------------------------


def report_prefix(target: ArchiveTarget, manifest: str, digest: str) -> str:
    stem = sanitise_segment(Path(manifest.rstrip("/")).stem)
    parts = (sanitise_prefix(target.prefix), "batches", stem, "shards", digest)
    return "/".join(p for p in parts if p) + "/"


def report_key(target: ArchiveTarget, manifest: str, digest: str, flow_run_id: str | None) -> str:
    """{prefix}/batches/{manifest}/shards/{digest}/{flow run id}.json"""
    run = sanitise_segment(flow_run_id or "local")
    return f"{report_prefix(target, manifest, digest)}{run}.json"


def write_shard_report(target: ArchiveTarget, manifest: str, report: ShardReport) -> str:
    """The child's report, at `report_key`; returns its URI."""
    key = report_key(target, manifest, report.shard.digest, report.flow_run_id)
    # Like the summary: s3:// URIs, never presigned links (bearer credentials while they live).
    body = report.model_dump_json(exclude={"outcomes": {"__all__": {"presigned_url"}}}).encode()
    s3_client(target.s3_block).put_object(
        Bucket=target.bucket, Key=key, Body=body, ContentType="application/json"
    )
    return f"s3://{target.bucket}/{key}"


def read_shard_report(target: ArchiveTarget, key: str) -> ShardReport | None:
    from botocore.exceptions import ClientError

    try:
        body = s3_client(target.s3_block).get_object(Bucket=target.bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    try:
        return ShardReport.model_validate_json(body)
    except ValidationError as exc:
        logger.warning("ignoring unreadable shard report s3://%s/%s: %s", target.bucket, key, exc)
        return None


def landed_report(
    target: ArchiveTarget, manifest: str, shard: ShardSpec, item_ids: Sequence[str]
) -> ShardReport | None:
    """A report of an earlier run in which every video of this shard landed, if any."""
    prefix = report_prefix(target, manifest, shard.digest)
    pages = s3_client(target.s3_block).get_paginator("list_objects_v2")
    found = [
        obj
        for page in pages.paginate(Bucket=target.bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
        if obj["Key"].endswith(".json")
    ]
    for obj in sorted(found, key=lambda o: o["LastModified"], reverse=True):
        report = read_shard_report(target, obj["Key"])
        if report is not None and report.shard.digest == shard.digest and report.landed(item_ids):
            return report
    return None


# -- the parent -----------------------------------------------------------------------------


@dataclass
class ShardRun:
    """A shard as the parent tracks it: its videos, its child run, the report it uses."""

    shard: ShardSpec
    jobs: list[VideoJob]
    flow_run: FlowRun | None = None
    report: ShardReport | None = None
    reused: bool = False


def run_shards(
    deployment: str,
    shards: Sequence[ShardSpec],
    jobs: Sequence[VideoJob],
    *,
    manifest: str,
    archive: ArchiveOptions,
    options: RunOptions,
    fail_on_item_error: bool,
    target: ArchiveTarget,
    poll_interval_s: float,
) -> Produced:
    """Start a child run per shard that has not landed yet, wait for them all, and return
    every video's outcome (those of landed shards from their earlier report)."""
    from prefect.runtime import flow_run

    children = [ShardRun(s, list(jobs[s.start : s.stop])) for s in shards]
    for child in children:
        ids = [j.item_id for j in child.jobs]
        child.report = landed_report(target, manifest, child.shard, ids)
        child.reused = child.report is not None
    to_run = [c for c in children if not c.reused]
    _run_log().info(
        "%d videos in %d shards on %s: %d to run, %d landed in an earlier run",
        len(jobs),
        len(children),
        deployment,
        len(to_run),
        len(children) - len(to_run),
    )
    parent_id = str(flow_run.id) if flow_run.id else None
    parent_name = flow_run.name or "batch"
    to_make = sum(len(c.jobs) for c in to_run)
    cancelled = False
    if to_run:
        try:
            for child in to_run:
                child.flow_run = _start(
                    deployment,
                    child,
                    manifest=manifest,
                    archive=archive,
                    options=options.model_copy(
                        update={
                            "budget_usd": shard_budget(options.budget_usd, len(child.jobs), to_make)
                        }
                    ),
                    fail_on_item_error=fail_on_item_error,
                    parent=(parent_id, parent_name, int(flow_run.run_count or 1)),
                )
            cancelled = _wait(to_run, parent_id, poll_interval_s)
        except BaseException as exc:
            # A termination signal (the parent's worker cancelling it), Ctrl-C, or an error
            # starting a child: no child may go on without its parent.
            _cancel(to_run, f"the parent batch run ended ({type(exc).__name__})")
            raise
        for child in to_run:
            assert child.flow_run is not None
            key = report_key(target, manifest, child.shard.digest, str(child.flow_run.id))
            child.report = read_shard_report(target, key)
    produced = aggregate(children, cancelled=cancelled)
    # Fresh links for the batch's result (reports hold none).
    produced.outcomes = [
        o.model_copy(update={"presigned_url": _presign(o.s3_uri, target)})
        if o.status == "archived"
        else o
        for o in produced.outcomes
    ]
    return produced


def _start(
    deployment: str,
    child: ShardRun,
    *,
    manifest: str,
    archive: ArchiveOptions,
    options: RunOptions,
    fail_on_item_error: bool,
    parent: tuple[str | None, str, int],
) -> FlowRun:
    from prefect.deployments import run_deployment

    parent_id, parent_name, run_count = parent
    shard = child.shard
    try:
        started = run_deployment(
            _as_uuid(deployment) or deployment,
            parameters={
                "manifest": manifest,
                "archive": archive.model_dump(mode="json"),
                "options": options.model_dump(mode="json"),
                "fail_on_item_error": fail_on_item_error,
                "fan_out": {"enabled": False},
                "shard": shard.model_dump(mode="json"),
            },
            flow_run_name=f"{parent_name}-shard-{shard.index + 1}-of-{shard.count}",
            timeout=0,
            # Linked as a subflow of this run (the UI nests it; the server cancels it with it).
            as_subflow=True,
            tags=[f"shard:{shard.label}"],
            # A retried parent (a new run count) starts new children; a repeated call in the
            # same attempt gets the same child back instead of a second one.
            idempotency_key=f"{parent_id}:{run_count}:{shard.digest}" if parent_id else None,
        )
        assert not isinstance(started, Coroutine)  # called from sync code: dispatched sync
    except Exception as exc:
        raise ConfigurationError(
            f"fan_out.deployment: could not start shard {shard.label} on {deployment!r} "
            f"({type(exc).__name__}: {exc}). A deployment made before fan-out existed must be "
            "deployed again to accept the `shard` parameter."
        ) from exc
    _run_log().info(
        "shard %s (videos %d-%d): flow run %s",
        shard.label,
        shard.start + 1,
        shard.stop,
        started.name,
    )
    return started


_READ_PAGE = 100


def _run_log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The flow run's logger (its lines reach the UI), else this module's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


def _wait(children: Sequence[ShardRun], parent_id: str | None, poll_interval_s: float) -> bool:
    """Until every child run is final. Returns whether the parent was cancelled meanwhile (its
    children are then moved to Cancelling, and still waited for: their reports say what
    landed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    by_id = {c.flow_run.id: c for c in children if c.flow_run is not None}
    pending = set(by_id)
    cancelled = False
    done = 0
    with get_client(sync_client=True) as client:
        while True:
            watch = [*pending, *([UUID(parent_id)] if parent_id and not cancelled else [])]
            runs = [
                run
                # In pages: the server caps a read (200 by default).
                for at in range(0, len(watch), _READ_PAGE)
                for run in client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=watch[at : at + _READ_PAGE])
                    ),
                    limit=_READ_PAGE,
                )
            ]
            for run in runs:
                if run.id in pending:
                    by_id[run.id].flow_run = run
                    if run.state is not None and run.state.is_final():
                        pending.discard(run.id)
                elif run.state is not None and (
                    run.state.is_cancelling() or run.state.is_cancelled()
                ):
                    cancelled = True
                    _cancel(children, "the parent batch run was cancelled", client)
            if len(by_id) - len(pending) != done:
                done = len(by_id) - len(pending)
                _run_log().info("shards: %d of %d child runs finished", done, len(by_id))
            if not pending:
                return cancelled
            time.sleep(poll_interval_s)


def _cancel(
    children: Sequence[ShardRun], reason: str, client: SyncPrefectClient | None = None
) -> None:
    """Cancel every child run that is not final: Cancelling for one a worker may be running
    (the worker ends its process), Cancelled for one still waiting to be picked up."""
    if client is None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as own:
            _cancel(children, reason, own)
        return
    from prefect.states import Cancelled, Cancelling

    for child in children:
        if child.flow_run is None:
            continue
        try:
            run = client.read_flow_run(child.flow_run.id)
            state = run.state
            if state is None or state.is_final() or state.is_cancelling():
                continue
            waiting = state.is_scheduled() or state.is_paused()
            new: State[Any] = Cancelled(message=reason) if waiting else Cancelling(message=reason)
            client.set_flow_run_state(run.id, new)
            _run_log().warning("shard %s (%s): %s", child.shard.label, run.name, new.name)
        except Exception as exc:  # the others still get theirs
            logger.warning("could not cancel shard %s: %s", child.shard.label, exc)


def aggregate(children: Sequence[ShardRun], *, cancelled: bool = False) -> Produced:
    """Every video's outcome from the children's reports; a child that left none (it
    crashed, was cancelled before it wrote one, could not read the manifest) gives each of
    its videos an outcome that says so and how to complete it."""
    produced = Produced(outcomes=[], cancelled=cancelled)
    for child in children:
        run = child.flow_run
        if run is not None:
            produced.shard_runs.append(str(run.id))
        report = child.report
        if report is None:
            state = run.state if run is not None else None
            where = f"flow run {run.name}" if run is not None else "its flow run"
            stopped = state is not None and (state.is_cancelled() or state.is_cancelling())
            error = RunIncompleteError(
                f"shard {child.shard.label} ({where}) ended "
                f"{state.name if state else 'unstarted'}"
                f"{': ' + state.message if state and state.message else ''} without a report; "
                "whatever it made is in the ledger. Re-run the batch to complete the shard."
            )
            produced.outcomes += [
                VideoOutcome(
                    item_id=j.item_id,
                    row=j.row,
                    status="skipped" if stopped else "failed",
                    error_type=type(error).__name__,
                    error=str(error),
                )
                for j in child.jobs
            ]
            continue
        rows = {j.item_id: j.row for j in child.jobs}
        for outcome in report.outcomes:
            update: dict[str, Any] = {"row": rows.get(outcome.item_id, outcome.row)}
            if child.reused:
                update["already_archived"] = True
            produced.outcomes.append(outcome.model_copy(update=update))
        if not child.reused:
            produced.spent += report.new_spend_usd
            produced.refund_expected += report.refund_expected_usd
            produced.rate_limit_wait_s += report.rate_limit_wait_s
    return produced


def _presign(uri: str | None, target: ArchiveTarget) -> str | None:
    if not uri or not uri.startswith(f"s3://{target.bucket}/"):
        return None
    key = uri.removeprefix(f"s3://{target.bucket}/")
    url: str = s3_client(target.s3_block).generate_presigned_url(
        "get_object",
        Params={"Bucket": target.bucket, "Key": key},
        ExpiresIn=target.presign_expiry_s,
    )
    return url


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FanOutOptions",
    "Produced",
    "ShardReport",
    "ShardRun",
    "ShardSpec",
    "aggregate",
    "plan_shards",
    "run_shards",
    "shard_jobs",
    "split",
    "write_shard_report",
]
