"""Prefect tasks: submit, wait for the result, archive to S3. Thin over the client.

Each task is cached on what identifies its work, with results persisted, so a re-run of a
finished flow (in a new process, days later, with the same Prefect home or shared result
storage) calls nothing:

- submit: the request key (model + normalised request + concrete seed + image content hashes),
  under SERIALIZABLE isolation with a lock manager, so identical concurrent calls submit once;
- wait: the prediction id;
- archive: the prediction id and the archive target.

Retries retry only what is worth retrying. The submit task is never retried after its POST may
have reached the service (SubmissionUncertainError is not retryable).
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from prefect import Task, get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run, task_run
from prefect.settings import get_current_settings
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from wan_tasks.api.models import MODEL_ID, I2VRequest, Prediction
from wan_tasks.api.policies import PollPolicy
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import derive_seed, request_key
from wan_tasks.core.inference_times import InferenceTimes
from wan_tasks.core.ledger import LedgerSettings, reconcile
from wan_tasks.core.redact import redact_payload
from wan_tasks.errors import (
    ArchiveError,
    OutputExpiredError,
    SubmissionNotFoundError,
    SubmissionUncertainError,
    TaskFailedError,
    WaitTimeoutError,
    WanTasksError,
    WaveSpeedError,
)
from wan_tasks.integration.locking import CrashSafeFileLockManager
from wan_tasks.integration.runtime import s3_client, wavespeed_client
from wan_tasks.storage.archive import ArchiveResult, ArchiveTarget, S3Archiver
from wan_tasks.storage.keys import KeyFields

logger = logging.getLogger(__name__)

ARCHIVED_EVENT = "wan.video.archived"
# How long an unanswered submit waits for the service's history to show the task.
RECONCILE_SETTLE_S = (1.0, 3.0, 10.0)
# What this process has seen the service take, to aim first polls (PollPolicy.learn_first_poll).
INFERENCE_TIMES = InferenceTimes()


class SubmittedVideo(BaseModel):
    """What submit hands to the next steps (and persists). No secrets: stored URLs are
    scrubbed of signatures, and the key never enters it."""

    request_key: str
    prediction_id: str
    model: str
    request: dict[str, Any]
    payload: dict[str, Any]
    seed: int
    duration: int
    cost_usd: Decimal
    submitted_at: datetime
    item_id: str = ""
    attempt: int = 0
    flow_run_id: str | None = None


# -- retry conditions --------------------------------------------------------------------


def _exception(state: State[Any]) -> BaseException | None:
    try:
        state.result()
    except BaseException as exc:
        return exc
    return None


def _transient(exc: BaseException | None) -> bool:
    """One question for errors of this package (`retryable`); S3 and network errors that
    reach a task untranslated are transient when the store or the network says so."""
    if isinstance(exc, WanTasksError):
        return exc.retryable
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429
    return isinstance(exc, httpx.TransportError | BotoCoreError | ConnectionError)


# An ambiguous submit (SubmissionUncertainError) is not retryable: it is reconciled, never
# re-sent; SubmissionNotFoundError (the history shows no task) is. Budget refusals are final.
def retry_submit(task: Task[..., Any], run: TaskRun, state: State[Any]) -> bool:
    return _transient(_exception(state))


# A failed prediction stays failed (the flow resubmits 5xxx failures deliberately, as a new
# attempt), and a passed deadline is final for this task run.
def retry_wait(task: Task[..., Any], run: TaskRun, state: State[Any]) -> bool:
    exc = _exception(state)
    if isinstance(exc, TaskFailedError | WaitTimeoutError):
        return False
    return _transient(exc)


def retry_archive(task: Task[..., Any], run: TaskRun, state: State[Any]) -> bool:
    return _transient(_exception(state))


# -- cache policies ----------------------------------------------------------------------


def _locks_dir() -> Path:
    path = Path(get_current_settings().home) / "wan-tasks-locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _submit_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    request = derive_seed(params["request"], params.get("variant") or "")
    return "wan-submit-" + request_key(request, attempt=int(params.get("attempt") or 0))


def _wait_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    return f"wan-wait-{params['submitted'].prediction_id}"


def _archive_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    target: ArchiveTarget = params["target"]
    import hashlib

    where = hashlib.sha256(target.model_dump_json().encode()).hexdigest()[:16]
    return f"wan-archive-{params['submitted'].prediction_id}-{where}"


def serializable(policy: CacheKeyFnPolicy) -> Any:
    # One host: a file lock per key, broken when its process dies (Prefect's own file locks
    # never expire). Many hosts: swap in prefect-redis's RedisLockManager.
    return policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=CrashSafeFileLockManager(_locks_dir())
    )


def learn_inference_times(credentials_block: str | None = None) -> int:
    """Aim this process's first polls from the account's recent tasks (one history call, once
    per process and model); returns how many tasks it learned from."""
    client = wavespeed_client(credentials_block)
    if INFERENCE_TIMES.seeded(client.ops.model):
        return 0
    return INFERENCE_TIMES.seed_from_history(client, client.ops.model)


# -- tasks ---------------------------------------------------------------------------------


@task(
    name="submit-i2v",
    cache_policy=serializable(CacheKeyFnPolicy(cache_key_fn=_submit_key)),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_submit,
)
def submit_i2v(
    request: I2VRequest,
    *,
    variant: str = "",
    attempt: int = 0,
    item_id: str = "",
    credentials_block: str | None = None,
    budget: Budget | None = None,
    rate_limit_name: str | None = None,
    ledger: LedgerSettings | None = None,
) -> SubmittedVideo:
    """Validate, upload local images, submit once; return the prediction id and what the
    next steps need. Seed -1 becomes a concrete seed derived from the request and `variant`.

    With a ledger, a submit first reconnects to a prediction recorded for this request key,
    or reconciles an unfinished intent through the service's history; it records its intent
    before the POST and the prediction id right after."""
    log = get_run_logger()
    request = derive_seed(request, variant)
    key = request_key(request, attempt=attempt)
    client = wavespeed_client(credentials_block)
    book = ledger.open() if ledger else None
    this_run = str(flow_run.id) if flow_run.id else None

    def submitted(prediction_id: str, payload: dict[str, Any], at: datetime,
                  run: str | None) -> SubmittedVideo:
        return SubmittedVideo(
            request_key=key, prediction_id=prediction_id, model=client.ops.model,
            request=redact_payload(request.model_dump(mode="json")),
            payload=redact_payload(payload), seed=request.seed, duration=request.duration,
            cost_usd=request.cost_usd, submitted_at=at, item_id=item_id, attempt=attempt,
            flow_run_id=run,
        )

    previous = book.read(key) if book else None
    if book and previous:
        if previous.prediction_id:
            log.info("%s: reconnecting to prediction %s recorded in the ledger (no new submit)",
                     item_id or key[:12], previous.prediction_id)
            return submitted(previous.prediction_id, previous.payload,
                             previous.submitted_at or previous.intent_at, previous.flow_run_id)
        # A fresh intent may belong to a submit the history does not show yet.
        age = (datetime.now(UTC) - previous.intent_at).total_seconds()
        found = reconcile(client, previous,
                          settle_s=max(0.0, min(sum(RECONCILE_SETTLE_S) - age, 15.0)))
        if found is not None:
            log.warning("%s: found prediction %s in the service's history for an unfinished "
                        "submit (%s pid %d); reconnecting", item_id or key[:12], found.id,
                        previous.host, previous.pid)
            book.record_prediction(previous, found.id)
            return submitted(found.id, previous.payload, previous.intent_at,
                             previous.flow_run_id)
        log.info("%s: an earlier submit (%s pid %d) never reached the service; submitting",
                 item_id or key[:12], previous.host, previous.pid)

    payload = client.prepare(request)
    if rate_limit_name:
        from prefect.concurrency.sync import rate_limit

        rate_limit(rate_limit_name, strict=True)
    if budget is not None:
        budget.reserve(key, request.cost_usd)
    entry = book.record_intent(key, client.ops.model, payload, item_id=item_id,
                               seed=request.seed, flow_run_id=this_run,
                               previous=previous) if book else None
    try:
        prediction = client.submit_payload(payload)
    except SubmissionUncertainError:
        # The task may exist and be billed: look for it before giving up; keep the budget.
        if book is None or entry is None:
            raise
        for settle in RECONCILE_SETTLE_S:
            found = reconcile(client, entry, settle_s=settle)
            if found is not None:
                log.warning("%s: submit answer lost; found prediction %s in history",
                            item_id or key[:12], found.id)
                book.record_prediction(entry, found.id)
                return submitted(found.id, payload, entry.intent_at, this_run)
        # The history, given time to settle, holds no such task: the service never took it.
        # The retry reconciles once more before it submits (the intent stays recorded).
        raise SubmissionNotFoundError(
            f"{item_id or key[:12]}: the submit's answer was lost and after "
            f"{sum(RECONCILE_SETTLE_S):.0f}s the service's history shows no such task; "
            "retrying (the retry checks the history again before submitting)"
        ) from None
    except BaseException:
        if budget is not None:
            budget.release(key)
        raise
    if book is not None and entry is not None:
        book.record_prediction(entry, prediction.id)
    log.info("submitted %s: prediction %s, seed %d, $%s", item_id or key[:12],
             prediction.id, request.seed, request.cost_usd)
    return submitted(prediction.id, payload, datetime.now(UTC), this_run)


@task(
    name="wait-for-prediction",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_wait_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_wait,
)
def wait_for_prediction(
    submitted: SubmittedVideo,
    *,
    timeout_s: float = 1800.0,
    poll: PollPolicy | None = None,
    cancel_on_timeout: bool = True,
    credentials_block: str | None = None,
) -> Prediction:
    """Wait (one task run, however many polls) until the prediction is done; cancel the
    remote task if the deadline passes."""
    client = wavespeed_client(credentials_block)
    policy = poll or client.ops.poll
    # The first poll lands near the expected inference time after the *submit*, not after
    # this task started; a reconnect to an old prediction polls at once.
    first, aimed = INFERENCE_TIMES.first_poll_after(policy, submitted.model, submitted.duration)
    age = (datetime.now(UTC) - submitted.submitted_at).total_seconds()
    aimed = aimed and 0 <= age < first
    if 0 <= age < first:
        time.sleep(first - age)
    polled_at = time.monotonic()
    try:
        prediction = client.wait(submitted.prediction_id, timeout=timeout_s, poll=policy)
    except WaitTimeoutError:
        if cancel_on_timeout:
            try:
                client.cancel(submitted.prediction_id)
            except WaveSpeedError as exc:
                get_run_logger().warning("could not cancel %s: %s", submitted.prediction_id, exc)
            raise WaitTimeoutError(
                f"prediction {submitted.prediction_id} did not finish within {timeout_s:.0f}s; "
                "it was cancelled. Raise wait_timeout_s for longer jobs.",
                prediction_id=submitted.prediction_id,
            ) from None
        raise
    # Not seen by the first poll: it missed by at least one interval.
    early = aimed and time.monotonic() - polled_at > max(policy.min_interval / 2, 1.0)
    INFERENCE_TIMES.record(submitted.model, submitted.duration,
                           (prediction.inference_ms or 0) / 1000, early=early)
    return prediction


@task(
    name="archive-to-s3",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_archive_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_archive,
)
def archive_to_s3(
    submitted: SubmittedVideo,
    prediction: Prediction,
    target: ArchiveTarget,
    *,
    credentials_block: str | None = None,
) -> ArchiveResult:
    """Stream the output into S3 (verified, conditional), with metadata and a JSON sidecar."""
    log = get_run_logger()
    archiver = S3Archiver(s3_client(target.s3_block), target)
    fields = KeyFields(
        prediction_id=prediction.id, model=submitted.model,
        created_at=prediction.created_at or submitted.submitted_at, seed=submitted.seed,
        duration=submitted.duration, prefix=target.prefix, item_id=submitted.item_id,
    )
    result = archiver.find_archived(fields)
    if result is not None:
        archiver.ensure_sidecar(result, _sidecar(submitted, prediction))
    else:
        if not prediction.outputs:
            raise ArchiveError(f"prediction {prediction.id} has no output", retryable=False)
        client = wavespeed_client(credentials_block)
        try:
            with client.stream_output(prediction.outputs[0]) as response:
                length = response.headers.get("content-length")
                result = archiver.archive(
                    response.iter_bytes(1024 * 1024), fields,
                    metadata=_object_metadata(submitted, prediction),
                    sidecar=_sidecar(submitted, prediction),
                    expected_size=int(length) if length and length.isdigit() else None,
                )
        except OutputExpiredError as exc:
            raise OutputExpiredError(
                f"the output of prediction {prediction.id} is gone ({exc.message}); "
                "outputs live 7 days on the service. Resubmit to regenerate it.",
                prediction_id=prediction.id, status_code=exc.status_code,
            ) from None
        except httpx.RemoteProtocolError as exc:
            raise ArchiveError(
                f"download of prediction {prediction.id} was cut off: {exc}", retryable=True
            ) from exc
    log.info("%s %s (%d bytes)", "found" if result.already_archived else "archived",
             result.s3_uri, result.size)
    emit_event(
        event=ARCHIVED_EVENT,
        resource={"prefect.resource.id": result.s3_uri, "prefect.resource.name": result.key},
        payload={
            "s3_uri": result.s3_uri, "sidecar_uri": result.sidecar_uri,
            "sha256": result.sha256, "size": result.size, "prediction_id": prediction.id,
            "item_id": submitted.item_id, "already_archived": result.already_archived,
        },
    )
    return result


def _object_metadata(submitted: SubmittedVideo, prediction: Prediction) -> dict[str, str]:
    meta = {"prediction-id": prediction.id, "model": submitted.model,
            "seed": str(submitted.seed), "request-key": submitted.request_key}
    if submitted.item_id:
        meta["item-id"] = submitted.item_id
    return meta


def _sidecar(submitted: SubmittedVideo, prediction: Prediction) -> dict[str, Any]:
    return {
        # The schema id predates the "sidecar" name; kept so readers of round-1 archives match.
        "schema": "wan-tasks/video-manifest@1",
        "model": submitted.model or MODEL_ID,
        "prediction_id": prediction.id,
        "item_id": submitted.item_id,
        "request_key": submitted.request_key,
        "request": submitted.request,
        "payload": submitted.payload,
        "seed": submitted.seed,
        "cost_usd": str(submitted.cost_usd),
        "timings": {
            "inference_ms": prediction.inference_ms,
            "created_at": prediction.created_at.isoformat() if prediction.created_at else None,
            "submitted_at": submitted.submitted_at.isoformat(),
            "archived_at": datetime.now(UTC).isoformat(),
        },
        "has_nsfw_contents": prediction.has_nsfw_contents,
        "prefect": {
            "flow_run_id": str(flow_run.id) if flow_run.id else None,
            "flow_run_name": flow_run.name,
            "task_run_id": str(task_run.id) if task_run.id else None,
        },
    }
