"""Submit once: the never-pay-twice algorithm, with no orchestrator in it.

`submit_once` reads the ledger, reconnects to a recorded prediction, reconciles an unfinished
intent through the service's history, records its intent, submits, records the prediction id,
and reconciles an ambiguous answer before it gives up. The Prefect task `submit-i2v` is a thin
shell over it (caching, retries, run ids); anything else that can call a function can use it
too, and tests run it without a Prefect server.

What it returns, `SubmittedVideo`, is what the next steps need and what gets persisted: no
secrets (stored request and body have signed URL parameters scrubbed; the key never enters).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from wan_tasks import settings
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.models import I2VRequest, Prediction
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import legacy_request_key, request_key
from wan_tasks.core.ledger import ArchivedAt, Ledger, LedgerEntry, reconcile
from wan_tasks.errors import (
    SubmissionNotFoundError,
    SubmissionUncertainError,
    WanTasksError,
    WaveSpeedError,
)
from wan_tasks.redact import redact_payload

logger = logging.getLogger(__name__)

# How long an unanswered submit waits for the service's history to show the task.
RECONCILE_SETTLE_S = settings.DEFAULT_RECONCILE_SETTLE_S


class SubmittedVideo(BaseModel):
    """A submitted (or reconnected) prediction and what the next steps need."""

    request_key: str
    prediction_id: str
    model: str
    service_id: str = Field("", description="the service and account it was paid on")
    redacted_request: dict[str, Any] = Field(
        description="the request as JSON, signed URL parameters scrubbed"
    )
    redacted_payload: dict[str, Any] = Field(
        description="the body that was sent, uploads resolved, signed URL parameters scrubbed"
    )
    seed: int
    duration: int
    cost_usd: Decimal
    submitted_at: datetime
    item_id: str = ""
    attempt: int = 0
    flow_run_id: str | None = Field(None, description="the run that submitted it")
    archived: ArchivedAt | None = Field(None, description="where its video was archived")


def submit_once(
    client: WaveSpeedClient,
    request: I2VRequest,
    *,
    attempt: int = 0,
    item_id: str = "",
    ledger: Ledger | None = None,
    budget: Budget | None = None,
    run_id: str | None = None,
    before_post: Callable[[], None] | None = None,
    settle_s: Sequence[float] | None = None,
    lease_s: float | None = None,
    claim_wait_s: float | None = None,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
) -> SubmittedVideo:
    """Submit `request` (a concrete seed: see `identity.derive_seed`) at most once per request
    key and attempt.

    With a ledger: a recorded prediction id is reconnected to (no POST); an intent without one
    is reconciled through the history first. The intent is recorded before the POST and the
    id right after; a lost answer is looked for in the history (`settle_s` apart; None: the
    `WAN_TASKS_RECONCILE_SETTLE_S` setting, `RECONCILE_SETTLE_S` by default) and raises
    `SubmissionNotFoundError` (retryable: the retry reconciles again) when the history shows
    no such task. Without a ledger a lost answer raises `SubmissionUncertainError`.

    `before_post` runs right before the POST (a rate limit). A budget reservation is kept for
    every submit that may have reached the service and released on every other path.
    """
    if settle_s is None:
        settle_s = settings.current().reconcile_settle_s
    model, service = client.ops.model, client.service_id
    key = request_key(request, service=service, model=model, attempt=attempt)
    name = item_id or key[:12]

    def submitted(
        prediction_id: str,
        payload: dict[str, Any],
        at: datetime,
        run: str | None,
        archived: ArchivedAt | None = None,
    ) -> SubmittedVideo:
        return SubmittedVideo(
            request_key=key,
            prediction_id=prediction_id,
            model=model,
            service_id=service,
            redacted_request=redact_payload(request.model_dump(mode="json")),
            redacted_payload=redact_payload(payload),
            seed=request.seed,
            duration=request.duration,
            cost_usd=request.cost_usd,
            submitted_at=at,
            item_id=item_id,
            attempt=attempt,
            flow_run_id=run,
            archived=archived,
        )

    if ledger is None:
        body = client.prepare(request)
        if before_post is not None:
            before_post()
        prediction, answered = _post(client, request, body, key, budget, name, log)
        return submitted(prediction.id, body, answered, run_id)

    lease_s = settings.current().claim_lease_s if lease_s is None else lease_s
    # A live owner is never overtaken: the claim outlasts the POST with all its retries and
    # the settle time of a lost answer, whatever lease was configured.
    lease_s = max(lease_s, _post_bound_s(client) + sum(settle_s))
    # Other attempts of this request sent the same body: their tasks are never this one's.
    others = _other_attempts(ledger, request, service, model, attempt)
    payload: dict[str, Any] | None = None
    with _working_on(key) as alone:
        for _ in range(CLAIM_ROUNDS):
            previous = _read(ledger, client, request, key, attempt, log)
            if previous is not None and previous.prediction_id:
                log.info(
                    "%s: reconnecting to prediction %s recorded in the ledger (no new submit)",
                    name,
                    previous.prediction_id,
                )
                return submitted(
                    previous.prediction_id,
                    previous.payload,
                    previous.submitted_at or previous.intent_at,
                    previous.flow_run_id,
                    previous.archived,
                )
            if previous is not None and _held(previous, alone()):
                # Another machine (or thread) is submitting this very request: never a
                # second POST; its prediction id appears in the ledger, or its claim ends.
                previous = _wait_for_claim(ledger, previous, name, claim_wait_s, log)
                continue
            if payload is None:
                payload = client.prepare(request)
            if before_post is not None:
                before_post()
            mine = ledger.claim(
                key,
                model,
                payload,
                item_id=item_id,
                seed=request.seed,
                flow_run_id=run_id,
                lease_s=lease_s,
                over=previous,
            )
            if mine is None:
                continue  # another owner claimed it between our read and our write
            earlier = previous
            if earlier is not None and not earlier.released:
                taken = _reconcile_taken_over(client, earlier, others, settle_s, name, log)
                if taken is not None:
                    pid = _recorded(ledger, mine, taken, name, log, at=earlier.intent_at)
                    return submitted(pid, earlier.payload, earlier.intent_at, run_id)
            try:
                prediction, answered = _post(client, request, payload, key, budget, name, log)
            except SubmissionUncertainError:
                # The task may exist and be billed: look for it before giving up; the claim
                # stays ours (its lease keeps other machines waiting) and the budget kept.
                for settle in settle_s:
                    found = reconcile(client, mine, settle_s=settle, exclude=others)
                    if found is not None:
                        log.warning(
                            "%s: submit answer lost; found prediction %s in history",
                            name,
                            found.id,
                        )
                        pid = _recorded(ledger, mine, found.id, name, log, at=mine.intent_at)
                        return submitted(pid, payload, mine.intent_at, run_id)
                # The history, given time to settle, holds no such task: the service never
                # took it. Whoever takes the claim over next (this task's retry, or another
                # machine) reconciles once more before it submits.
                _release(ledger, mine, created_nothing=False, log=log)
                raise SubmissionNotFoundError(
                    f"{name}: the submit's answer was lost and after {sum(settle_s):.0f}s the "
                    "service's history shows no such task; retrying (the retry checks the "
                    "history again before submitting)"
                ) from None
            except BaseException as exc:
                # A refusal created nothing: the claim is given back. Anything else may have
                # (a 503, a cut connection, a cancel mid-POST): the claim is left open to be
                # taken over at once, by whoever checks the history first.
                _release(ledger, mine, created_nothing=_refused(exc), log=log)
                raise
            # The time the service answered, not after the ledger's write: the first poll is
            # aimed from it (a later one made every first poll late by that write).
            pid = _recorded(ledger, mine, prediction.id, name, log, at=answered)
            return submitted(pid, payload, answered, run_id)
    raise SubmissionUncertainError(
        f"{name}: the ledger's record for this request kept changing under {CLAIM_ROUNDS} "
        "reads (many machines at once?); nothing was sent. Retry."
    )


# A claim read, lost to a faster writer, or waited for, is looked at again this many times.
CLAIM_ROUNDS = 16


def _post(
    client: WaveSpeedClient,
    request: I2VRequest,
    payload: dict[str, Any],
    key: str,
    budget: Budget | None,
    name: str,
    log: _Log,
) -> tuple[Prediction, datetime]:
    """POST, with a budget reservation kept for every submit that may have reached the
    service and given back on every other path; the prediction and when it was answered."""
    if budget is not None:
        budget.reserve(key, request.cost_usd)
    try:
        prediction = client.submit_payload(payload)
        answered = datetime.now(UTC)
    except SubmissionUncertainError:
        raise
    except Exception:
        # An answered or never-sent POST. A cancel (KeyboardInterrupt, CancelledError) may
        # land after the service took the task: its reservation is kept.
        if budget is not None:
            budget.release(key)
        raise
    log.info(
        "submitted %s: prediction %s, seed %d, $%s",
        name,
        prediction.id,
        request.seed,
        request.cost_usd,
    )
    return prediction, answered


def _post_bound_s(client: WaveSpeedClient) -> float:
    """The longest a submit POST can take with its own retries (each attempt's pool, connect,
    write and read timeouts; the longest wait between attempts), plus a margin."""
    t, retry = client.ops.timeouts, client.ops.retry
    attempt = t.pool + t.connect + t.write + t.submit_read
    pause = max(retry.max_backoff, retry.max_retry_after)
    return retry.max_attempts * attempt + (retry.max_attempts - 1) * pause + 30.0


def _refused(exc: BaseException) -> bool:
    """A failure that certainly created no task: the service's (or the budget's) refusal.
    Retryable errors (a 503, a 429, a lost connection) are not certain."""
    return isinstance(exc, WanTasksError) and not exc.retryable


def _release(ledger: Ledger, mine: LedgerEntry, *, created_nothing: bool, log: _Log) -> None:
    try:
        ledger.release(mine, created_nothing=created_nothing)
    except Exception as exc:  # the claim's lease ends it anyway
        log.warning("could not release the claim on %s: %s", mine.request_key[:12], exc)


def _held(entry: LedgerEntry, alone: bool) -> bool:
    """Someone else will finish this claim: a live owner elsewhere, or another thread of
    this process working on the same key right now."""
    if entry.owned_here():
        return not alone
    return not entry.owner_gone()


def _wait_for_claim(
    ledger: Ledger, entry: LedgerEntry, name: str, limit_s: float | None, log: _Log
) -> LedgerEntry | None:
    """Wait until the claim's owner records its prediction id, gives the claim back, or its
    lease runs out; the caller reads the ledger again."""
    log.info(
        "%s: %s is submitting this request right now; waiting for its prediction id (no "
        "second submit)",
        name,
        entry.owner(),
    )
    waited, pause = 0.0, 0.2
    while True:
        time.sleep(pause)
        waited += pause
        pause = min(pause * 1.5, 5.0)
        now = ledger.read(entry.request_key)
        if now is None or now.prediction_id or now.version != entry.version:
            return now
        if now.owner_gone() or (limit_s is not None and waited >= limit_s):
            return now


def _reconcile_taken_over(
    client: WaveSpeedClient,
    previous: LedgerEntry,
    others: set[str],
    settle_s: Sequence[float],
    name: str,
    log: _Log,
) -> str | None:
    """The claim just taken over may have created a task before its owner died: look."""
    # A fresh claim may belong to a submit the history does not show yet.
    age = (datetime.now(UTC) - previous.intent_at).total_seconds()
    found = reconcile(
        client, previous, exclude=others, settle_s=max(0.0, min(sum(settle_s) - age, 15.0))
    )
    if found is None:
        log.info(
            "%s: an earlier submit (%s) never reached the service; submitting",
            name,
            previous.owner(),
        )
        return None
    log.warning(
        "%s: found prediction %s in the service's history for an unfinished submit (%s); "
        "reconnecting",
        name,
        found.id,
        previous.owner(),
    )
    return found.id


def _recorded(
    ledger: Ledger,
    mine: LedgerEntry,
    prediction_id: str,
    name: str,
    log: _Log,
    at: datetime | None = None,
) -> str:
    """Record the id (submitted `at`) over our claim. When the claim was taken over meanwhile
    (our submit outlived its lease), the record that is there now decides, loudly."""
    for _ in range(CLAIM_ROUNDS):
        if ledger.record_prediction(mine, prediction_id, at=at) is not None:
            return prediction_id
        now = ledger.read(mine.request_key)
        if now is None:
            continue
        if now.prediction_id and now.prediction_id != prediction_id:
            log.error(
                "%s: this submit outlived its claim's lease and %s submitted the request "
                "again: predictions %s and %s were both paid; using the ledger's %s",
                name,
                now.owner(),
                prediction_id,
                now.prediction_id,
                now.prediction_id,
            )
            return now.prediction_id
        if now.prediction_id == prediction_id:
            return prediction_id
        mine = now
    return prediction_id


@contextmanager
def _working_on(key: str) -> Iterator[Callable[[], bool]]:
    """Marks `key` as being submitted by this process; yields a check of whether no other
    thread of it is on it now (then a claim of this process is a leftover of an earlier
    attempt)."""
    with _ACTIVE_LOCK:
        _ACTIVE[key] = _ACTIVE.get(key, 0) + 1

    def alone() -> bool:
        # Asked each round: a thread that was waiting on another's claim is alone once that
        # one has finished (then this process's leftover claim is its to take over).
        with _ACTIVE_LOCK:
            return _ACTIVE.get(key, 0) == 1

    try:
        yield alone
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE[key] -= 1
            if not _ACTIVE[key]:
                del _ACTIVE[key]


_ACTIVE: dict[str, int] = {}
_ACTIVE_LOCK = threading.Lock()
_Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


def _read(
    ledger: Ledger,
    client: WaveSpeedClient,
    request: I2VRequest,
    key: str,
    attempt: int,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> LedgerEntry | None:
    """The ledger's entry for `key`; else one an older release wrote under the key without
    the service, trusted only when this service knows its prediction (an entry of another
    service or account, or one whose prediction is gone, is not ours to reconnect to)."""
    entry = ledger.read(key)
    if entry is not None:
        return entry
    old = ledger.read(legacy_request_key(request, model=client.ops.model, attempt=attempt))
    if old is None:
        return None
    if not old.prediction_id:
        # An older release's intent whose POST may have created a task: moved with no lease,
        # so it is taken over and reconciled through the history before anything is sent.
        intent = old.model_copy(update={"request_key": key, "lease_until": None})
        return ledger.create(intent) or ledger.read(key)
    try:
        client.get_prediction(old.prediction_id)
    except WaveSpeedError as exc:
        if exc.retryable:  # a 503 or a 429 says nothing about the prediction: never pay again
            raise
        return None
    log.info(
        "%s: reconnecting to prediction %s recorded by an older release",
        old.item_id or key[:12],
        old.prediction_id,
    )
    moved = old.model_copy(update={"request_key": key})
    return ledger.create(moved) or ledger.read(key)


def _other_attempts(
    ledger: Ledger, request: I2VRequest, service: str, model: str, attempt: int
) -> set[str]:
    ids = set()
    for other in range(attempt):
        entry = ledger.read(request_key(request, service=service, model=model, attempt=other))
        if entry is not None and entry.prediction_id:
            ids.add(entry.prediction_id)
    return ids


__all__ = ["RECONCILE_SETTLE_S", "SubmittedVideo", "submit_once"]
