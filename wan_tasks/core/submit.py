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
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, Field

from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.models import I2VRequest
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import legacy_request_key, request_key
from wan_tasks.core.ledger import ArchivedAt, Ledger, LedgerEntry, reconcile
from wan_tasks.errors import SubmissionNotFoundError, SubmissionUncertainError, WaveSpeedError
from wan_tasks.redact import redact_payload

logger = logging.getLogger(__name__)

# How long an unanswered submit waits for the service's history to show the task.
RECONCILE_SETTLE_S = (1.0, 3.0, 10.0)


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
    settle_s: Sequence[float] = RECONCILE_SETTLE_S,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
) -> SubmittedVideo:
    """Submit `request` (a concrete seed: see `identity.derive_seed`) at most once per request
    key and attempt.

    With a ledger: a recorded prediction id is reconnected to (no POST); an intent without one
    is reconciled through the history first. The intent is recorded before the POST and the
    id right after; a lost answer is looked for in the history (`settle_s` apart) and raises
    `SubmissionNotFoundError` (retryable: the retry reconciles again) when the history shows
    no such task. Without a ledger a lost answer raises `SubmissionUncertainError`.

    `before_post` runs right before the POST (a rate limit). A budget reservation is kept for
    every submit that may have reached the service and released on every other path.
    """
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

    previous = _read(ledger, client, request, key, attempt, log) if ledger else None
    # Other attempts of this request sent the same body: their tasks are never this one's.
    others = _other_attempts(ledger, request, service, model, attempt) if ledger else set()
    if ledger is not None and previous is not None:
        if previous.prediction_id:
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
        # A fresh intent may belong to a submit the history does not show yet.
        age = (datetime.now(UTC) - previous.intent_at).total_seconds()
        found = reconcile(
            client, previous, exclude=others, settle_s=max(0.0, min(sum(settle_s) - age, 15.0))
        )
        if found is not None:
            log.warning(
                "%s: found prediction %s in the service's history for an unfinished "
                "submit (%s pid %d); reconnecting",
                name,
                found.id,
                previous.host,
                previous.pid,
            )
            ledger.record_prediction(previous, found.id)
            return submitted(found.id, previous.payload, previous.intent_at, previous.flow_run_id)
        log.info(
            "%s: an earlier submit (%s pid %d) never reached the service; submitting",
            name,
            previous.host,
            previous.pid,
        )

    payload = client.prepare(request)
    if before_post is not None:
        before_post()
    if budget is not None:
        budget.reserve(key, request.cost_usd)
    try:
        entry = (
            ledger.record_intent(
                key, model, payload, item_id=item_id, seed=request.seed, flow_run_id=run_id
            )
            if ledger
            else None
        )
        prediction = client.submit_payload(payload)
    except SubmissionUncertainError:
        # The task may exist and be billed: look for it before giving up; keep the budget.
        if ledger is None or entry is None:
            raise
        for settle in settle_s:
            found = reconcile(client, entry, settle_s=settle, exclude=others)
            if found is not None:
                log.warning(
                    "%s: submit answer lost; found prediction %s in history", name, found.id
                )
                ledger.record_prediction(entry, found.id)
                return submitted(found.id, payload, entry.intent_at, run_id)
        # The history, given time to settle, holds no such task: the service never took it.
        # The retry reconciles once more before it submits (the intent stays recorded).
        raise SubmissionNotFoundError(
            f"{name}: the submit's answer was lost and after {sum(settle_s):.0f}s the "
            "service's history shows no such task; retrying (the retry checks the history "
            "again before submitting)"
        ) from None
    except BaseException:
        # Nothing was sent (the intent could not be recorded), or the service refused the
        # task: the reservation is given back.
        if budget is not None:
            budget.release(key)
        raise
    if ledger is not None and entry is not None:
        ledger.record_prediction(entry, prediction.id)
    log.info(
        "submitted %s: prediction %s, seed %d, $%s",
        name,
        prediction.id,
        request.seed,
        request.cost_usd,
    )
    return submitted(prediction.id, payload, datetime.now(UTC), run_id)


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
    if old is None or not old.prediction_id:
        return None
    try:
        client.get_prediction(old.prediction_id)
    except WaveSpeedError:
        return None
    log.info(
        "%s: reconnecting to prediction %s recorded by an older release",
        old.item_id or key[:12],
        old.prediction_id,
    )
    moved = old.model_copy(update={"request_key": key})
    ledger.write(moved)
    return moved


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
