"""The WaveSpeed wire protocol: envelopes in, typed results or typed errors out. No I/O here.

Tolerant by design: unknown fields are ignored (kept as extras), an unknown `status` reads as
"not finished" and is logged once per value, and an error may arrive either as an HTTP status or
as a `code` inside an HTTP 200 envelope; both map to the same exception classes. A submit answer
gets its own reading (`parse_submission`): whatever cannot prove the task was refused is
ambiguous, so it raises SubmissionUncertainError instead of anything retryable.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

import httpx

from wan_tasks.api.models import Prediction, PredictionStatus
from wan_tasks.api.policies import parse_retry_after
from wan_tasks.errors import (
    AuthenticationError,
    ContentModerationError,
    InsufficientBalanceError,
    InvalidRequestError,
    MediaAccessError,
    OutputExpiredError,
    RateLimitedError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransientServerError,
    WaveSpeedError,
)

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v3"
# Error text is quoted from the service's answer; cap it so a huge HTML error page does not
# end up in logs and Prefect states.
_MAX_DETAIL = 300
# Envelope codes that mean success: 200 everywhere, 0 in some task answers.
_OK_CODES = (200, 0)

_UNKNOWN_SEEN: set[str] = set()
_UNKNOWN_LOCK = threading.Lock()


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _detail(response: httpx.Response) -> str:
    body = _body(response)
    if body is None:
        return response.text.strip()[:_MAX_DETAIL]
    if isinstance(body, dict):
        return _message(body)
    return str(body)[:_MAX_DETAIL]


def _message(body: dict[str, Any]) -> str:
    msg = str(body.get("message") or body.get("detail") or body.get("error") or "")
    error_code = body.get("error_code")
    if error_code not in (None, ""):
        msg = f"{msg} (error_code {error_code})" if msg else f"error_code {error_code}"
    return msg[:_MAX_DETAIL]


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _server_side(code: int) -> bool:
    """A 5xx-class code, as an HTTP status (500-599) or a task code (5000-5999)."""
    return 500 <= code < 600 or 5000 <= code < 6000


def error_for_code(
    code: int,
    detail: str,
    *,
    operation: str,
    prediction_id: str | None = None,
    retry_after: float | None = None,
    in_envelope: bool = False,
) -> WaveSpeedError:
    """Map an error code (an HTTP status, or the `code` of an envelope) to its exception."""
    where = (
        f"{operation}: code {code} in an HTTP 200 answer"
        if in_envelope
        else f"{operation}: HTTP {code}"
    ) + (f": {detail}" if detail else "")
    kw: dict[str, Any] = {"prediction_id": prediction_id, "status_code": code}
    if code >= 1000:  # a task code in the envelope
        kw = {"prediction_id": prediction_id, "task_code": code}
        if _server_side(code):
            return TransientServerError(where, **kw)
        if code == 1200:
            return ContentModerationError(where, **kw)
        if code == 1402:
            return MediaAccessError(where, **kw)
        return InvalidRequestError(where, **kw)
    if code in (401, 403):
        return AuthenticationError(
            f"{where}. Check WAVESPEED_API_KEY (or the WaveSpeedCredentials block).", **kw
        )
    if code == 402 or (400 <= code < 500 and "balance" in detail.lower()):
        # Undocumented upstream; 402 is what the emulator sends.
        return InsufficientBalanceError(f"{where}. Top up the account.", **kw)
    if code == 429:
        return RateLimitedError(
            where, retry_after=retry_after, prediction_id=prediction_id, status_code=code
        )
    if code == 404:
        return OutputExpiredError(where, **kw)
    if code in (408, 425) or code >= 500:
        return TransientServerError(where, **kw)
    return InvalidRequestError(where, **kw)


def error_for_response(
    response: httpx.Response,
    *,
    operation: str,
    prediction_id: str | None = None,
    now: datetime | None = None,
) -> WaveSpeedError:
    """Map a non-success HTTP answer to the exception a caller can act on. `now` is the wall
    clock an HTTP-date Retry-After is measured against (the current time by default)."""
    retry_after = None
    if response.status_code == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
    return error_for_code(
        response.status_code,
        _detail(response),
        operation=operation,
        prediction_id=prediction_id,
        retry_after=retry_after,
    )


def _envelope_error(
    body: dict[str, Any],
    response: httpx.Response,
    *,
    operation: str,
    prediction_id: str | None,
    now: datetime | None,
) -> WaveSpeedError | None:
    """The error an HTTP 200 envelope carries in its `code`, or None for a success."""
    inner = _as_int(body.get("code", 200))
    if inner is None or inner in _OK_CODES:
        return None
    retry_after = None
    if inner == 429:
        retry_after = parse_retry_after(response.headers.get("retry-after"), now)
    return error_for_code(
        inner,
        _message(body),
        operation=operation,
        prediction_id=prediction_id,
        retry_after=retry_after,
        in_envelope=True,
    )


def envelope_data(
    response: httpx.Response,
    *,
    operation: str,
    prediction_id: str | None = None,
    now: datetime | None = None,
) -> Any:
    """Check status and envelope; return `data`. For idempotent calls: an unreadable 200 is
    transient (asking again is safe). Any 2xx is read like 200."""
    if not response.is_success:
        raise error_for_response(
            response, operation=operation, prediction_id=prediction_id, now=now
        )
    body = _body(response)
    if body is None:
        raise TransientServerError(
            f"{operation}: the service answered 200 with a body that is not JSON",
            prediction_id=prediction_id,
            status_code=200,
        )
    if not isinstance(body, dict) or "data" not in body:
        raise TransientServerError(
            f"{operation}: the service answered 200 without an envelope",
            prediction_id=prediction_id,
            status_code=200,
        )
    error = _envelope_error(
        body, response, operation=operation, prediction_id=prediction_id, now=now
    )
    if error is not None:
        raise error
    return body["data"]


def _note_status(prediction: Prediction, operation: str) -> None:
    status = prediction.status
    if status.is_known:
        return
    with _UNKNOWN_LOCK:
        if status.value in _UNKNOWN_SEEN:
            return
        _UNKNOWN_SEEN.add(status.value)
    logger.warning(
        "%s: unknown prediction status %r (first seen on %s); treated as not finished",
        operation,
        status.value,
        prediction.id,
    )


def parse_prediction(
    response: httpx.Response,
    *,
    operation: str,
    prediction_id: str | None = None,
    now: datetime | None = None,
) -> Prediction:
    data = envelope_data(response, operation=operation, prediction_id=prediction_id, now=now)
    try:
        prediction = Prediction.model_validate(data)
    except ValueError as exc:
        raise TransientServerError(
            f"{operation}: unexpected prediction shape from the service: {exc}",
            prediction_id=prediction_id,
        ) from exc
    _note_status(prediction, operation)
    return prediction


def _uncertain(
    operation: str, why: str, status_code: int | None = None
) -> SubmissionUncertainError:
    return SubmissionUncertainError(
        f"{operation}: {why}. The task may exist and be billed: reconcile through the history "
        "endpoint before submitting again.",
        status_code=status_code,
    )


def parse_submission(
    response: httpx.Response, *, operation: str, now: datetime | None = None
) -> Prediction:
    """Read the answer to a submit POST.

    Returns the new prediction, or raises: the mapped error when the service refused the task
    (4xx status, or a 4xx-class `code` in a 200 envelope; RateLimitedError is the one a caller
    may retry), SubmissionUncertainError when the answer does not settle whether a task exists
    (5xx status, a 5xx-class `code` in the envelope, a 200 that cannot be read).
    """
    status = response.status_code
    if status >= 500:
        raise _uncertain(operation, f"HTTP {status} after the request was received", status)
    if status == 404:
        # Not an expired output as elsewhere: the model path is unknown; nothing was created.
        raise InvalidRequestError(
            f"{operation}: HTTP 404 (is the model id right?): {_detail(response)}",
            status_code=404,
        )
    if not response.is_success:
        raise error_for_response(response, operation=operation, now=now)
    body = _body(response)
    if not isinstance(body, dict):
        raise _uncertain(operation, f"HTTP {status} with a body that cannot be read", status)
    error = _envelope_error(body, response, operation=operation, prediction_id=None, now=now)
    if error is not None:
        code = _as_int(body.get("code"))
        if code is not None and _server_side(code):
            raise _uncertain(operation, f"HTTP {status} carrying error code {code}", status)
        raise error
    try:
        prediction = Prediction.model_validate(body.get("data"))
    except ValueError as exc:
        raise _uncertain(operation, f"HTTP {status} without a readable prediction", status) from exc
    _note_status(prediction, operation)
    return prediction


def task_failure(prediction: Prediction) -> WaveSpeedError:
    """The typed error for a prediction that ended without output."""
    code = prediction.code
    status = prediction.status
    reason = prediction.error or status.value
    message = f"prediction {prediction.id} {status.value}: {reason}"
    if code is not None:
        message += f" (task code {code})"
    kw: dict[str, Any] = {"prediction_id": prediction.id, "task_code": code}
    if code == 1200:
        return ContentModerationError(
            message + ". Change the prompt or images; retrying the same input will fail again.",
            **kw,
        )
    if code == 1402:
        return MediaAccessError(
            message + ". The service could not download an input image: use a public URL "
            "or a local path (wan-tasks uploads local files).",
            **kw,
        )
    if code in (1400, 1401):
        return InvalidRequestError(
            message + ". A parameter is missing or invalid: fix the request.", **kw
        )
    if status in (PredictionStatus.CANCELLED, PredictionStatus.DELETED):
        return TaskCancelledError(message, **kw)
    if status is PredictionStatus.TIMEOUT or code == 5004:
        return TaskTimedOutError(message, **kw)
    if status is PredictionStatus.COMPLETED:
        return TaskFailedError(message + " but produced no output", **kw)
    return TaskFailedError(message, **kw)
