"""Every WaveSpeed call as a sans-I/O operation, shared by the sync and the async client.

An operation is a generator that yields `httpx.Request`s to send and `Sleep`s to wait, and
receives the `httpx.Response` (or has the transport error thrown into it). Retry, backoff,
polling and error mapping live here once; `client.py` only drives them with a sync or an async
httpx client. This keeps the two clients from drifting apart.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import SecretStr

from wan_tasks.api.media import inspect_image
from wan_tasks.api.models import (
    MODEL_ID,
    HistoryPage,
    HistoryStatus,
    I2VRequest,
    Prediction,
    PredictionStatus,
    UploadResult,
)
from wan_tasks.api.policies import PollPolicy, RetryPolicy
from wan_tasks.api.protocol import (
    API_PREFIX,
    envelope_data,
    error_for_response,
    parse_prediction,
    task_failure,
)
from wan_tasks.errors import (
    RateLimitedError,
    SubmissionUncertainError,
    TransientServerError,
    WaitTimeoutError,
    WaveSpeedError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = httpx.Request | Sleep
Operation = Generator[Step, Any, T]

# Errors raised before a request left the machine: the service cannot have created a task.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


@dataclass(frozen=True)
class Timeouts:
    """Per-call httpx timeouts. The submit read timeout is long: a timeout there is ambiguous."""

    connect: float = 10.0
    read: float = 30.0
    write: float = 60.0
    pool: float = 30.0
    submit_read: float = 60.0
    upload: float = 120.0

    def for_call(self, read: float | None = None) -> dict[str, float]:
        return httpx.Timeout(
            connect=self.connect, read=read or self.read, write=self.write, pool=self.pool
        ).as_dict()  # type: ignore[return-value]


@dataclass(frozen=True)
class Submission:
    """What submit returns: the prediction and exactly what was sent (uploaded URLs, seed)."""

    prediction: Prediction
    payload: dict[str, Any]
    request: I2VRequest


class Operations:
    """Builds requests and interprets answers. Holds the key; never shows it."""

    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str,
        model: str = MODEL_ID,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url
        self.model = model
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._clock = clock
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"Operations(base_url={self.base_url!r}, model={self.model!r})"

    # -- building requests ------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        read_timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        return httpx.Request(
            method,
            f"{self.base_url}{API_PREFIX}{path}",
            headers={"Authorization": f"Bearer {self._api_key.get_secret_value()}"},
            extensions={"timeout": self.timeouts.for_call(read_timeout)},
            **kwargs,
        )

    # -- the retry loop for idempotent calls ------------------------------------------------

    def _idempotent(
        self,
        make: Callable[[], httpx.Request],
        parse: Callable[[httpx.Response], T],
        *,
        operation: str,
        prediction_id: str | None = None,
        deadline: float | None = None,
    ) -> Operation[T]:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = yield make()
                return parse(response)
            except httpx.TransportError as exc:
                error: WaveSpeedError = TransientServerError(
                    f"{operation}: {type(exc).__name__} talking to the service",
                    prediction_id=prediction_id,
                )
                error.__cause__ = exc
            except WaveSpeedError as exc:
                if not exc.retryable:
                    raise
                error = exc
            retry_after = error.retry_after if isinstance(error, RateLimitedError) else None
            delay = self.retry.delay(attempt, retry_after, self._rng)
            out_of_time = deadline is not None and self._clock() + delay > deadline
            if attempt >= self.retry.max_attempts or out_of_time:
                raise error
            logger.warning(
                "%s failed (%s); attempt %d/%d, retrying in %.1fs",
                operation, error, attempt, self.retry.max_attempts, delay,
            )
            yield Sleep(delay)

    # -- operations ------------------------------------------------------------------------

    def get_prediction(self, prediction_id: str) -> Operation[Prediction]:
        op = f"get prediction {prediction_id}"
        return self._idempotent(
            lambda: self._request("GET", f"/predictions/{prediction_id}/result"),
            lambda r: parse_prediction(r, operation=op, prediction_id=prediction_id),
            operation=op,
            prediction_id=prediction_id,
        )

    def cancel(self, prediction_id: str) -> Operation[Prediction]:
        op = f"cancel prediction {prediction_id}"
        return self._idempotent(
            lambda: self._request("DELETE", f"/predictions/{prediction_id}"),
            lambda r: parse_prediction(r, operation=op, prediction_id=prediction_id),
            operation=op,
            prediction_id=prediction_id,
        )

    def balance(self) -> Operation[Decimal]:
        def parse(r: httpx.Response) -> Decimal:
            return Decimal(str(envelope_data(r, operation="balance")["balance"]))

        return self._idempotent(
            lambda: self._request("GET", "/balance"), parse, operation="balance"
        )

    def history(
        self,
        *,
        created_after: str | None = None,
        created_before: str | None = None,
        model: str | None = None,
        status: HistoryStatus | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> Operation[HistoryPage]:
        body: dict[str, Any] = {"page": page, "page_size": page_size}
        for key, value in (
            ("created_after", created_after),
            ("created_before", created_before),
            ("model", model),
            ("status", status),
        ):
            if value is not None:
                body[key] = value

        def parse(r: httpx.Response) -> HistoryPage:
            data = envelope_data(r, operation="history")
            if isinstance(data, list):  # tolerate a bare list
                data = {"items": data, "page": page, "page_size": page_size}
            return HistoryPage.model_validate(data)

        # A history query is a read even though it is a POST.
        return self._idempotent(
            lambda: self._request("POST", "/predictions", json=body), parse, operation="history"
        )

    def upload(
        self, data: bytes, filename: str, content_type: str
    ) -> Operation[UploadResult]:
        """Multipart upload. Free and side-effect free apart from a new URL, so retried."""

        def parse(r: httpx.Response) -> UploadResult:
            return UploadResult.model_validate(envelope_data(r, operation="upload"))

        return self._idempotent(
            lambda: self._request(
                "POST",
                "/media/upload/binary",
                files={"file": (filename, data, content_type)},
                read_timeout=self.timeouts.upload,
            ),
            parse,
            operation=f"upload {filename}",
        )

    def upload_file(self, path: Path) -> Operation[UploadResult]:
        info = inspect_image(path)
        return self.upload(info.path.read_bytes(), info.path.name, info.content_type)

    def prepare(self, request: I2VRequest) -> Operation[dict[str, Any]]:
        """Upload local images; return the exact JSON body to submit."""
        urls: dict[str, str] = {}
        for field, path in request.local_images().items():
            result = yield from self.upload_file(path)
            logger.info("uploaded %s (%s) for %s", path.name, result.size, field)
            urls[field] = result.download_url
        return request.to_payload(**urls)

    def submit_payload(
        self, payload: dict[str, Any], *, webhook: str | None = None
    ) -> Operation[Prediction]:
        """POST the task. Retried only when the request provably never reached the service
        (connect errors) or was refused with 429; anything ambiguous raises
        SubmissionUncertainError, never a second POST."""
        op = f"submit {self.model}"
        params = {"webhook": webhook} if webhook else None
        attempt = 0
        while True:
            attempt += 1
            request = self._request(
                "POST", f"/{self.model}", json=payload, params=params,
                read_timeout=self.timeouts.submit_read,
            )
            try:
                response = yield request
            except _NOT_SENT as exc:
                error: WaveSpeedError = TransientServerError(
                    f"{op}: could not connect ({type(exc).__name__}); nothing was submitted"
                )
                error.__cause__ = exc
            except httpx.TransportError as exc:
                raise SubmissionUncertainError(
                    f"{op}: the request was sent but no answer came back "
                    f"({type(exc).__name__}). The task may exist and be billed: reconcile "
                    "through the history endpoint before submitting again."
                ) from exc
            else:
                if response.status_code == 429 or response.status_code in (401, 402, 403):
                    error = error_for_response(response, operation=op)
                    if not error.retryable:
                        raise error
                elif response.status_code >= 500:
                    raise SubmissionUncertainError(
                        f"{op}: HTTP {response.status_code} after the request was received. "
                        "The task may exist: reconcile through history before resubmitting.",
                        status_code=response.status_code,
                    )
                else:
                    prediction = parse_prediction(response, operation=op)
                    logger.info("submitted prediction %s (%s)", prediction.id, self.model)
                    return prediction
            retry_after = error.retry_after if isinstance(error, RateLimitedError) else None
            if attempt >= self.retry.max_attempts:
                raise error
            delay = self.retry.delay(attempt, retry_after, self._rng)
            logger.warning("%s refused (%s); retrying in %.1fs", op, error, delay)
            yield Sleep(delay)

    def submit(
        self, request: I2VRequest, *, webhook: str | None = None
    ) -> Operation[Submission]:
        payload = yield from self.prepare(request)
        prediction = yield from self.submit_payload(payload, webhook=webhook)
        return Submission(prediction=prediction, payload=payload, request=request)

    def wait(
        self,
        prediction_id: str,
        *,
        timeout: float = 1800.0,
        poll: PollPolicy | None = None,
        poll_first: bool = True,
    ) -> Operation[Prediction]:
        """Poll until the prediction is terminal or the wall-clock deadline passes.

        Transient poll failures (5xx, 429, network) are absorbed until the deadline: the task
        is running and paid for, so giving up early only loses it. Returns a completed
        prediction with outputs; raises the typed failure otherwise.
        """
        deadline = self._clock() + timeout
        delays = (poll or self.poll).delays(self._rng)
        if poll_first:
            # The caller waited out the first delay (or is reconnecting): after a miss, the
            # next poll comes min_interval later, not first_poll_after again.
            delays.next()
        polls = 0
        first = poll_first
        while True:
            if not first:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise WaitTimeoutError(
                        f"prediction {prediction_id} not finished after {timeout:.0f}s "
                        f"({polls} polls); it may still complete: wait on it again",
                        prediction_id=prediction_id,
                    )
                yield Sleep(min(delays.next(), remaining))
            first = False
            polls += 1
            try:
                prediction = yield from self._idempotent(
                    lambda: self._request("GET", f"/predictions/{prediction_id}/result"),
                    lambda r: parse_prediction(
                        r, operation=f"poll {prediction_id}", prediction_id=prediction_id
                    ),
                    operation=f"poll {prediction_id}",
                    prediction_id=prediction_id,
                    deadline=deadline,
                )
            except WaveSpeedError as exc:
                if not exc.retryable or self._clock() >= deadline:
                    raise
                logger.warning("poll of %s failed (%s); still waiting", prediction_id, exc)
                continue
            if prediction.status is PredictionStatus.COMPLETED and prediction.outputs:
                logger.info(
                    "prediction %s completed after %d polls (inference %s ms)",
                    prediction_id, polls, prediction.inference_ms,
                )
                return prediction
            if prediction.is_terminal:
                raise task_failure(prediction)
