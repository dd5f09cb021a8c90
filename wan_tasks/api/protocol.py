"""The WaveSpeed wire protocol: envelopes in, typed results or typed errors out. No I/O here."""

from __future__ import annotations

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
    TaskFailedError,
    TransientServerError,
    WaveSpeedError,
)

API_PREFIX = "/api/v3"
# Error text is quoted from the service's answer; cap it so a huge HTML error page does not
# end up in logs and Prefect states.
_MAX_DETAIL = 300


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return text[:_MAX_DETAIL]
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error") or ""
        return str(msg)[:_MAX_DETAIL]
    return str(body)[:_MAX_DETAIL]


def error_for_response(
    response: httpx.Response, *, operation: str, prediction_id: str | None = None
) -> WaveSpeedError:
    """Map a non-success HTTP answer to the exception a caller can act on."""
    code = response.status_code
    detail = _detail(response)
    where = f"{operation}: HTTP {code}" + (f": {detail}" if detail else "")
    kw: dict[str, Any] = {"prediction_id": prediction_id, "status_code": code}
    if code in (401, 403):
        return AuthenticationError(
            f"{where}. Check WAVESPEED_API_KEY (or the WaveSpeedCredentials block).", **kw
        )
    if code == 402 or (400 <= code < 500 and "balance" in detail.lower()):
        # Undocumented upstream; 402 is what the emulator sends.
        return InsufficientBalanceError(f"{where}. Top up the account.", **kw)
    if code == 429:
        return RateLimitedError(
            where,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            prediction_id=prediction_id,
        )
    if code == 404:
        return OutputExpiredError(where, **kw)
    if code in (408, 425) or code >= 500:
        return TransientServerError(where, **kw)
    return InvalidRequestError(where, **kw)


def envelope_data(
    response: httpx.Response, *, operation: str, prediction_id: str | None = None
) -> Any:
    """Check status and envelope; return `data`."""
    if response.status_code != 200:
        raise error_for_response(response, operation=operation, prediction_id=prediction_id)
    try:
        body = response.json()
    except ValueError as exc:
        raise TransientServerError(
            f"{operation}: the service answered 200 with a body that is not JSON",
            prediction_id=prediction_id,
            status_code=200,
        ) from exc
    if not isinstance(body, dict) or "data" not in body:
        raise TransientServerError(
            f"{operation}: the service answered 200 without an envelope",
            prediction_id=prediction_id,
            status_code=200,
        )
    inner = body.get("code", 200)
    if isinstance(inner, int) and inner != 200 and body.get("data") is None:
        raise InvalidRequestError(
            f"{operation}: {body.get('message', 'error')} (code {inner})",
            prediction_id=prediction_id,
        )
    return body["data"]


def parse_prediction(response: httpx.Response, *, operation: str, prediction_id: str | None = None
                     ) -> Prediction:
    data = envelope_data(response, operation=operation, prediction_id=prediction_id)
    try:
        return Prediction.model_validate(data)
    except ValueError as exc:
        raise TransientServerError(
            f"{operation}: unexpected prediction shape from the service: {exc}",
            prediction_id=prediction_id,
        ) from exc


def task_failure(prediction: Prediction) -> WaveSpeedError:
    """The typed error for a prediction that ended without output."""
    code = prediction.code
    reason = prediction.error or prediction.status.value
    message = f"prediction {prediction.id} {prediction.status.value}: {reason}"
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
        return InvalidRequestError(message, **kw)
    if prediction.status is PredictionStatus.COMPLETED:
        return TaskFailedError(message + " but produced no output", **kw)
    return TaskFailedError(message, **kw)
