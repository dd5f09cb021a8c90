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

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, cast

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from prefect import Task, get_run_logger, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import TaskRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run, task_run
from prefect.tasks import TaskRunNameCallbackWithParameters, exponential_backoff

from wan_tasks.api.models import MODEL_ID, I2VRequest, Prediction
from wan_tasks.api.policies import PollPolicy
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import derive_seed, request_key
from wan_tasks.core.inference_times import InferenceTimes, WaitSteer
from wan_tasks.core.ledger import ArchivedAt
from wan_tasks.core.submit import SubmittedVideo, submit_once
from wan_tasks.errors import (
    ArchiveError,
    OutputExpiredError,
    TaskFailedError,
    WaitTimeoutError,
    WanTasksError,
    WaveSpeedError,
)
from wan_tasks.integration.locking import TASK_LOCKS
from wan_tasks.integration.runtime import (
    async_wavespeed_client,
    open_ledger,
    s3_client,
    wavespeed_client,
)
from wan_tasks.redact import is_redacted, redact_url
from wan_tasks.storage.archive import ArchiveResult, ArchiveTarget, S3Archiver
from wan_tasks.storage.keys import KeyFields
from wan_tasks.storage.mp4check import checked_mp4
from wan_tasks.storage.place import S3Place

logger = logging.getLogger(__name__)

ARCHIVED_EVENT = "wan.video.archived"
# How long the service keeps outputs (its documentation: 7 days); a 404 on a younger output is
# transient.
OUTPUT_LIFETIME_S = 7 * 24 * 3600.0
# Prefect's own asset event (what `@materialize` emits): archived videos show in its asset
# views and lineage, and automations can trigger on them.
ASSET_MATERIALIZED_EVENT = "prefect.asset.materialization.succeeded"
# What this process has seen the service take, to aim first polls (PollPolicy.learn_first_poll).
INFERENCE_TIMES = InferenceTimes()


class LiveOutputs:
    """The signed output URLs of predictions this process has just waited for, kept in memory
    only, for the archive step that follows. The wait's persisted result keeps them scrubbed
    (they are bearer credentials), and the archive step asked the service for them again: a
    call per video. Bounded, and only for `keep_s`: an older entry, or another process (a
    re-run, a retry after a crash), asks the service as before."""

    def __init__(
        self, keep_s: float = 60.0, most: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._keep_s, self._most, self._clock = keep_s, most, clock
        self._live: OrderedDict[str, tuple[float, list[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, prediction_id: str, outputs: list[str]) -> None:
        now = self._clock()
        with self._lock:
            self._live[prediction_id] = (now, list(outputs))
            self._live.move_to_end(prediction_id)
            # Oldest first: drop what is past its time (a URL nobody took, say a wait whose
            # archive ran elsewhere), and past the bound.
            while self._live and (
                len(self._live) > self._most
                or now - next(iter(self._live.values()))[0] > self._keep_s
            ):
                self._live.popitem(last=False)

    def __len__(self) -> int:
        return len(self._live)

    def take(self, prediction_id: str) -> list[str] | None:
        """The outputs once (a retry of the archive asks the service: the URL may be why it
        failed), or None."""
        with self._lock:
            entry = self._live.pop(prediction_id, None)
        if entry is None or self._clock() - entry[0] > self._keep_s:
            return None
        return entry[1]


LIVE_OUTPUTS = LiveOutputs()


# -- retry conditions --------------------------------------------------------------------


def _exception(state: State[Any]) -> BaseException | None:
    try:
        # _sync: called from the async wait's engine too, where `result()` would hand back a
        # coroutine (and every failure would look like no error: never retried).
        cast(Any, state).result(_sync=True)
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


def _submit_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    request = derive_seed(params["request"], params.get("variant") or "")
    client = wavespeed_client(params.get("credentials_block"))
    return "wan-submit-" + request_key(
        request,
        service=client.service_id,
        model=client.ops.model,
        attempt=int(params.get("attempt") or 0),
    )


def _wait_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    submitted: SubmittedVideo = params["submitted"]
    return f"wan-wait-{submitted.service_id}-{submitted.prediction_id}"


def _archive_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    target: ArchiveTarget = params["target"]
    import hashlib

    where = hashlib.sha256(target.model_dump_json().encode()).hexdigest()[:16]
    submitted: SubmittedVideo = params["submitted"]
    return f"wan-archive-{submitted.service_id}-{submitted.prediction_id}-{where}"


def serializable(policy: CacheKeyFnPolicy) -> Any:
    # The manager WAN_TASKS_LOCK_MANAGER names when the lock is taken: a file lock per key
    # on one host (broken when its process dies), or a renewed Redis lease across hosts.
    return policy.configure(isolation_level="SERIALIZABLE", lock_manager=TASK_LOCKS)


def learn_inference_times(credentials_block: str | None = None) -> Future[int]:
    """Aim this process's first polls from the account's recent tasks: one history call, once
    per process and model, in the background (the run goes on to its first submit beside it;
    a wait with nothing to aim at yet listens for it: `InferenceTimes.steer`). The future's
    result: how many tasks it learned from."""
    client = wavespeed_client(credentials_block)
    return INFERENCE_TIMES.seed_in_background(client, client.ops.model)


# -- task run names: what each run works on, told apart in the UI --------------------------


def _label(value: object) -> str:
    return str(value or "video")


def submit_run_name(parameters: dict[str, Any]) -> str:
    """`submit-i2v[item-id]`, and `submit-i2v[item-id, attempt 2]` for a resubmission."""
    attempt = int(parameters.get("attempt") or 0)
    more = f", attempt {attempt + 1}" if attempt else ""
    return f"submit-i2v[{_label(parameters.get('item_id'))}{more}]"


def wait_run_name(parameters: dict[str, Any]) -> str:
    """`wait[prediction-id]`."""
    submitted = parameters.get("submitted")
    return f"wait[{getattr(submitted, 'prediction_id', None) or '?'}]"


def archive_run_name(parameters: dict[str, Any]) -> str:
    """`archive[item-id]`."""
    return f"archive[{_label(getattr(parameters.get('submitted'), 'item_id', None))}]"


def _named(namer: Callable[[dict[str, Any]], str]) -> TaskRunNameCallbackWithParameters:
    # Prefect passes the parameters to a callable with a `parameters` argument; its protocol
    # type also lists a classmethod no function has, hence the cast.
    return cast(TaskRunNameCallbackWithParameters, namer)


# -- tasks ---------------------------------------------------------------------------------


@task(
    name="submit-i2v",
    task_run_name=_named(submit_run_name),
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
    ledger: S3Place | None = None,
) -> SubmittedVideo:
    """Submit one image-to-video request, at most once per request key (`core.submit_once`).

    Local images are uploaded first; seed -1 becomes a concrete seed derived from the request
    and `variant`. Cached on the request key under SERIALIZABLE isolation, so identical
    concurrent calls submit once. With a ledger, a recorded prediction is reconnected to and an
    unfinished intent is reconciled through the service's history before anything is sent.

    Args:
        request: what to generate.
        variant: another take of the same request (a different derived seed).
        attempt: 0 for the first submission; n > 0 names a deliberate resubmission (after a
            5xxx failure or an expired output), a separate paid task with its own key.
        item_id: the batch row's id, for names, logs and object metadata.
        credentials_block: a saved `WaveSpeedCredentials` block; None: the settings.
        budget: the run's budget; a submit past it raises `BudgetExceededError`.
        rate_limit_name: a Prefect rate limit to take a slot from right before the POST.
        ledger: where the submission ledger lives (usually the archive bucket).

    Returns:
        The prediction id and what wait and archive need; no secrets.
    """
    request = derive_seed(request, variant)
    hook = None
    if rate_limit_name:
        from prefect.concurrency.sync import rate_limit

        def hook() -> None:
            rate_limit(rate_limit_name, strict=True)

    return submit_once(
        wavespeed_client(credentials_block),
        request,
        attempt=attempt,
        item_id=item_id,
        ledger=open_ledger(ledger) if ledger else None,
        budget=budget,
        run_id=str(flow_run.id) if flow_run.id else None,
        before_post=hook,
        log=get_run_logger(),
    )


@task(
    name="wait-for-prediction",
    task_run_name=_named(wait_run_name),
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
    """Wait for a prediction to finish, in one task run however many polls it takes.

    The first poll is aimed just after the inference times seen for the same model and
    duration, counted from the submit (a reconnect to an old prediction polls at once).

    Args:
        submitted: what `submit_i2v` returned.
        timeout_s: the wall-clock deadline for the wait.
        poll: the poll schedule; None: the client's.
        cancel_on_timeout: cancel the remote task when the deadline passes.
        credentials_block: a saved `WaveSpeedCredentials` block; None: the settings.

    Returns:
        The completed prediction (outputs, timings).

    Raises:
        TaskFailedError: the service failed the task (retryable for 5000/5003/5004: the flow
            resubmits those as a new attempt).
        WaitTimeoutError: the deadline passed.
    """
    client = wavespeed_client(credentials_block)
    policy = poll or client.ops.poll
    pause, aimed, steer = _first_poll(submitted, policy)
    polled: list[int] = []  # how many polls the wait made
    # progress: "still running after 40 s", also during the (often long) sleep to the first poll
    stop_notices = _still_running_notices(submitted)
    try:
        if pause:
            time.sleep(pause)
        prediction = client.wait(
            submitted.prediction_id, timeout=timeout_s, poll=policy, polled=polled, steer=steer
        )
    except WaitTimeoutError:
        if cancel_on_timeout:
            try:
                client.cancel(submitted.prediction_id)
            except WaveSpeedError as exc:
                get_run_logger().warning("could not cancel %s: %s", submitted.prediction_id, exc)
            raise _cancelled_after(submitted, timeout_s) from None
        raise
    finally:
        stop_notices()
    if steer is not None:
        aimed = steer.aimed_at
    return _waited(submitted, prediction, aimed=aimed, polls=polled[-1])


@task(
    name="wait-for-prediction",
    task_run_name=_named(wait_run_name),
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_wait_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_wait,
)
async def await_prediction(
    submitted: SubmittedVideo,
    *,
    timeout_s: float = 1800.0,
    poll: PollPolicy | None = None,
    cancel_on_timeout: bool = True,
    credentials_block: str | None = None,
    notices: bool = True,
) -> Prediction:
    """`wait_for_prediction` for an event loop: the same wait, cache key and result, without
    a thread. Thousands of these share one loop (the batch flows run them so): each sleeps on
    the loop's timer until its aimed poll, and polls over the loop's one connection pool.

    Args:
        notices: log "still running after N s" every 20 s (a batch logs its own progress
            line instead; a line per video per 20 s would flood a large batch's log).
    """
    client = await async_wavespeed_client(credentials_block)
    policy = poll or client.ops.poll
    pause, aimed, steer = _first_poll(submitted, policy)
    polled: list[int] = []  # how many polls the wait made
    notifier = asyncio.ensure_future(_still_running(submitted)) if notices else None
    try:
        if pause:
            await asyncio.sleep(pause)
        prediction = await client.wait(
            submitted.prediction_id, timeout=timeout_s, poll=policy, polled=polled, steer=steer
        )
    except WaitTimeoutError:
        if cancel_on_timeout:
            try:
                await client.cancel(submitted.prediction_id)
            except WaveSpeedError as exc:
                get_run_logger().warning("could not cancel %s: %s", submitted.prediction_id, exc)
            raise _cancelled_after(submitted, timeout_s) from None
        raise
    finally:
        if notifier is not None:
            notifier.cancel()
    if steer is not None:
        aimed = steer.aimed_at
    return _waited(submitted, prediction, aimed=aimed, polls=polled[-1])


def _first_poll(
    submitted: SubmittedVideo, policy: PollPolicy
) -> tuple[float, float | None, WaitSteer | None]:
    """(seconds to sleep before the first poll, the inference time it is aimed at: None when
    it is not aimed at learned times, and the steer of a wait that has too little to aim at).

    The first poll lands near the expected inference time after the *submit*, not after the
    wait started; a reconnect to an old prediction polls at once. A wait with too little to
    aim at (a first wave, the history still being read) is steered while it waits instead:
    it listens for what the first tasks to end teach (`InferenceTimes.steer`)."""
    first, aimed = INFERENCE_TIMES.aimed_poll(policy, submitted.model, submitted.duration)
    if aimed is None and policy.learn_first_poll:
        steer = INFERENCE_TIMES.steer(
            policy, submitted.model, submitted.duration, submitted.submitted_at
        )
        return 0.0, None, steer
    age = _age(submitted)
    if 0 <= age < first:
        return first - age, aimed, None
    return 0.0, None, None


def _age(submitted: SubmittedVideo) -> float:
    """Seconds since the service answered the submit."""
    return (datetime.now(UTC) - submitted.submitted_at).total_seconds()


def _cancelled_after(submitted: SubmittedVideo, timeout_s: float) -> WaitTimeoutError:
    return WaitTimeoutError(
        f"prediction {submitted.prediction_id} did not finish within {timeout_s:.0f}s; "
        "it was cancelled. Raise wait_timeout_s for longer jobs.",
        prediction_id=submitted.prediction_id,
    )


def _waited(
    submitted: SubmittedVideo, prediction: Prediction, *, aimed: float | None, polls: int
) -> Prediction:
    # Early: the aimed first poll found it running. Counted, not timed: on a loaded machine a
    # poll that hit can take seconds to answer, and timing it widened every later first poll
    # (the margin doubles per miss) until waits of 1 s tasks took 9 s (bench/growth.py).
    early = aimed is not None and polls > 1
    INFERENCE_TIMES.record(
        submitted.model,
        submitted.duration,
        (prediction.inference_ms or 0) / 1000,
        early=early,
        aimed_at=aimed,
    )
    # The result is persisted: signed output URLs are bearer credentials, so the stored copy
    # keeps them scrubbed and the archive step asks the service for live ones.
    return prediction.model_copy(update={"outputs": _stored_outputs(prediction)})


def _stored_outputs(prediction: Prediction, live: LiveOutputs | None = None) -> list[str]:
    """The outputs as stored, signed URL parameters scrubbed; the live URLs of a scrubbed one
    kept in `live` (the process's) for the archive step."""
    stored = [redact_url(u) for u in prediction.outputs]
    if any(is_redacted(u) for u in stored):
        (live if live is not None else LIVE_OUTPUTS).put(prediction.id, prediction.outputs)
    return stored


@task(
    name="archive-to-s3",
    task_run_name=_named(archive_run_name),
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_archive_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_archive,
)
def archive_to_s3(
    submitted: SubmittedVideo,
    prediction: Prediction | None,
    target: ArchiveTarget,
    *,
    credentials_block: str | None = None,
    ledger: S3Place | None = None,
    output_lifetime_s: float = OUTPUT_LIFETIME_S,
) -> ArchiveResult:
    """Archive a prediction's output into S3, verified, with metadata and a JSON sidecar.

    Streams the MP4 in parts (bounded memory), checks its SHA-256 against the stored object,
    writes with `If-None-Match: *`, and finds an already archived object instead of
    downloading again. Emits `wan.video.archived`.

    A video the ledger says is archived (anywhere, whatever the key template) is found there
    first; a download that is not a whole MP4 is refused (and retried), never archived; a
    404 on an output younger than the service's output lifetime is transient (retried), and
    only an older one is `OutputExpiredError`.

    Args:
        submitted: what `submit_i2v` returned.
        prediction: what `wait_for_prediction` returned; None only when the ledger records
            where the video was archived.
        target: where and how to archive.
        credentials_block: a saved `WaveSpeedCredentials` block; None: the settings.
        ledger: the submission ledger, to find and record where the video lands.
        output_lifetime_s: how long the service keeps outputs (7 days, its documentation).

    Returns:
        The object's `s3://` URI, its sidecar's, a presigned link, size and SHA-256.
    """
    log = get_run_logger()
    archiver = S3Archiver(s3_client(target.s3_block), target)
    book = open_ledger(ledger) if ledger else None
    recorded = submitted.archived
    entry = None
    if recorded is None and book is not None:
        entry = book.read(submitted.request_key)
        recorded = entry.archived if entry else None
    result = None
    if recorded is not None and recorded.bucket == target.bucket:
        result = archiver.find_at(recorded.key, recorded.sha256)
    if result is None and prediction is None:
        raise ArchiveError(
            f"prediction {submitted.prediction_id}: the ledger's archived copy is gone from "
            f"s3://{target.bucket}; re-run to fetch the output again",
            retryable=False,
        )
    if result is None and prediction is not None:
        result = _download_and_archive(
            archiver, submitted, prediction, credentials_block, output_lifetime_s
        )
    assert result is not None
    if book is not None:
        book.record_archived(
            submitted.request_key,
            ArchivedAt(
                bucket=result.bucket, key=result.key, sha256=result.sha256, size=result.size
            ),
            known=entry,  # read above: one S3 GET a video less
        )
    log.info(
        "%s %s (%d bytes)",
        "found" if result.already_archived else "archived",
        result.s3_uri,
        result.size,
    )
    emit_event(
        event=ARCHIVED_EVENT,
        resource={"prefect.resource.id": result.s3_uri, "prefect.resource.name": result.key},
        payload={
            "s3_uri": result.s3_uri,
            "sidecar_uri": result.sidecar_uri,
            "sha256": result.sha256,
            "size": result.size,
            "prediction_id": submitted.prediction_id,
            "item_id": submitted.item_id,
            "already_archived": result.already_archived,
        },
    )
    if not result.already_archived:
        # Like a cached `@materialize` task, a found object is not materialised again.
        emit_asset_materialized(result, submitted)
    return result


def _download_and_archive(
    archiver: S3Archiver,
    submitted: SubmittedVideo,
    prediction: Prediction,
    credentials_block: str | None,
    output_lifetime_s: float,
) -> ArchiveResult:
    fields = KeyFields(
        prediction_id=prediction.id,
        model=submitted.model,
        created_at=prediction.created_at or submitted.submitted_at,
        seed=submitted.seed,
        duration=submitted.duration,
        prefix=archiver.target.prefix,
        item_id=submitted.item_id,
    )
    result = archiver.find_archived(fields)
    if result is not None:
        archiver.ensure_sidecar(result, _sidecar(submitted, prediction))
        return result
    if not prediction.outputs:
        raise ArchiveError(f"prediction {prediction.id} has no output", retryable=False)
    client = wavespeed_client(credentials_block)
    url = prediction.outputs[0]
    if is_redacted(url):  # the stored result's copy: the live (signed) URL, kept or fetched
        live = LIVE_OUTPUTS.take(prediction.id) or client.get_prediction(prediction.id).outputs
        if not live:
            raise ArchiveError(
                f"prediction {prediction.id} no longer lists its output", retryable=True
            )
        url = live[0]
    try:
        with client.stream_output(url) as response:
            length = response.headers.get("content-length")
            return archiver.archive(
                checked_mp4(
                    response.iter_bytes(1024 * 1024), f"the output of prediction {prediction.id}"
                ),
                fields,
                metadata=_object_metadata(submitted, prediction),
                sidecar=_sidecar(submitted, prediction),
                expected_size=int(length) if length and length.isdigit() else None,
            )
    except OutputExpiredError as exc:
        made = prediction.created_at or submitted.submitted_at
        age = (datetime.now(UTC) - made).total_seconds()
        if age < output_lifetime_s:
            # A young output that answers 404 (a CDN not yet in sync, a passing fault) is not
            # gone: paying again for it would be paying twice. Retried by the task.
            raise ArchiveError(
                f"the output of prediction {prediction.id} answered 404 although it is only "
                f"{age:.0f}s old (outputs live {output_lifetime_s:.0f}s); trying again",
                retryable=True,
            ) from None
        raise OutputExpiredError(
            f"the output of prediction {prediction.id} is gone ({exc.message}); outputs "
            f"live {output_lifetime_s / 86400:g} days on the service. Resubmit to make it again.",
            prediction_id=prediction.id,
            status_code=exc.status_code,
        ) from None
    except httpx.RemoteProtocolError as exc:
        raise ArchiveError(
            f"download of prediction {prediction.id} was cut off: {exc}", retryable=True
        ) from exc


def asset_key(s3_uri: str) -> str:
    """The Prefect asset key of an object: its `s3://` URI, unless the URI has characters
    Prefect refuses in keys (spaces, `%`, `?`, `#`, brackets, ...) or is too long; then the
    URI with those replaced by `_` and a hash of the exact URI, so distinct objects keep
    distinct keys."""
    from prefect.types.names import MAX_ASSET_KEY_LENGTH, RESTRICTED_ASSET_CHARACTERS

    if len(s3_uri) <= MAX_ASSET_KEY_LENGTH and not any(
        c in s3_uri for c in RESTRICTED_ASSET_CHARACTERS
    ):
        return s3_uri
    import hashlib

    digest = hashlib.sha256(s3_uri.encode()).hexdigest()[:16]
    clean = "".join("_" if c in RESTRICTED_ASSET_CHARACTERS else c for c in s3_uri)
    return f"{clean[: MAX_ASSET_KEY_LENGTH - len(digest) - 1]}~{digest}"


def emit_asset_materialized(result: ArchiveResult, submitted: SubmittedVideo) -> None:
    """Prefect's asset materialisation event for the archived object, with what made it as
    metadata (prompt, seed, cost, sha256). Emitted inside the task run, so Prefect relates it
    to the flow run, the task run and their tags."""
    prompt = str(submitted.redacted_request.get("prompt") or "")
    resource = {
        "prefect.resource.id": asset_key(result.s3_uri),
        "prefect.resource.name": submitted.item_id or result.key,
        "prefect.asset.description": f"Wan 2.2 video ({submitted.model}): {prompt}"[:2500],
    }
    related = [
        {"prefect.resource.id": submitted.model, "prefect.resource.role": "asset-materialized-by"}
    ]
    image = submitted.redacted_request.get("image")
    if isinstance(image, str) and image.startswith(("s3://", "https://", "http://")):
        related.insert(
            0, {"prefect.resource.id": asset_key(image), "prefect.resource.role": "asset"}
        )
    emit_event(
        event=ASSET_MATERIALIZED_EVENT,
        resource=resource,
        related=related,
        payload={
            "s3_uri": result.s3_uri,
            "sidecar_uri": result.sidecar_uri,
            "prompt": prompt,
            "seed": submitted.seed,
            "cost_usd": str(submitted.cost_usd),
            "sha256": result.sha256,
            "size": result.size,
            "model": submitted.model,
            "prediction_id": submitted.prediction_id,
            "item_id": submitted.item_id,
        },
    )


def _object_metadata(submitted: SubmittedVideo, prediction: Prediction) -> dict[str, str]:
    meta = {
        "prediction-id": prediction.id,
        "model": submitted.model,
        "seed": str(submitted.seed),
        "request-key": submitted.request_key,
    }
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
        "request": submitted.redacted_request,
        "payload": submitted.redacted_payload,
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


# -- progress of one wait ------------------------------------------------------------------

STILL_RUNNING_EVERY_S = 20.0


def _still_running_notices(submitted: SubmittedVideo) -> Callable[[], None]:
    """Log "still running after N s; typical M s" every STILL_RUNNING_EVERY_S (counted from
    the submit) until the returned function is called, so a long wait shows in the run's log."""
    log = get_run_logger()
    typical = INFERENCE_TIMES.expected(submitted.model, submitted.duration)
    done = threading.Event()

    def notices() -> None:
        while not done.wait(_next_notice_in(submitted)):
            log.info(_still_running_line(submitted, typical))

    threading.Thread(target=notices, name="wan-wait-notice", daemon=True).start()
    return done.set


async def _still_running(submitted: SubmittedVideo) -> None:
    """The same notices on the event loop, until cancelled."""
    log = get_run_logger()
    typical = INFERENCE_TIMES.expected(submitted.model, submitted.duration)
    while True:
        await asyncio.sleep(_next_notice_in(submitted))
        log.info(_still_running_line(submitted, typical))


def _next_notice_in(submitted: SubmittedVideo) -> float:
    age = _age(submitted)
    return STILL_RUNNING_EVERY_S - age % STILL_RUNNING_EVERY_S


def _still_running_line(submitted: SubmittedVideo, typical: float | None) -> str:
    age = _age(submitted)
    return (
        f"{submitted.prediction_id} ({submitted.item_id or 'video'}): still running after "
        f"{age:.0f} s" + (f"; typical {typical:.0f} s" if typical else "")
    )
