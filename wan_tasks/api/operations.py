"""Every WaveSpeed call as a sans-I/O operation, shared by the sync and the async client.

An operation is a generator that yields steps and receives their results; it never touches the
network or the disk itself and reads time only from injected clocks, so it can be driven in
memory (tests do, with a fake clock and rng). The steps:

- `httpx.Request`: the driver sends it and sends back the `httpx.Response`, or throws the
  transport error into the generator;
- `Sleep`: the driver sleeps (`time.sleep` / `asyncio.sleep`) and sends back None; a sleep
  with a `wake` may end early when that fires, and the driver then sends back True (a wait
  steered by what is learned meanwhile: `PollSteer`);
- `ReadImage`: the driver calls `step.run()` (inline in the sync client, in a worker thread via
  `asyncio.to_thread` in the async one, so a 30 MB image never blocks the event loop) and sends
  back the `LocalImage`, or throws the error (a ValueError naming the file and the rule).

Retry, backoff, polling and error mapping live here once; `client.py` only drives the steps,
and closes the generator in `finally`, so an exception or a cancellation in the driver runs the
operation's cleanup. Time comes from the injected `clock` (monotonic seconds, for deadlines)
and `now` (wall clock, for an HTTP-date Retry-After); jitter from the injected `rng`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import SecretStr

from wan_tasks.api.media import ImageInfo, inspect_image
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
    parse_prediction,
    parse_submission,
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


DEFAULT_WAIT_TIMEOUT = 1800.0


class Wake(Protocol):
    """Something a sleep can be woken by."""

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback` (from any thread, once or more) when it fires, at once if it fired
        already; returns the call that unsubscribes."""
        ...


class PollSteer(Protocol):
    """Moves a wait's polls by what is learned while it waits (a first wave with nothing to
    aim at learns from the first of its tasks to end). The operation still keeps the
    service's minimum interval after each poll and the deadline."""

    def next_poll(self, polls: int, scheduled: float) -> float:
        """Seconds from now to the next poll, after `polls` polls; `scheduled`: what the
        policy's own schedule has left."""
        ...

    def wake(self) -> Wake | None:
        """What may change `next_poll`'s answer while the wait sleeps (None: nothing)."""
        ...


@dataclass(frozen=True)
class Sleep:
    seconds: float
    wake: Wake | None = None


@dataclass(frozen=True)
class LocalImage:
    """A checked local image and its bytes, as `ReadImage.run` returns them."""

    info: ImageInfo
    data: bytes


@dataclass(frozen=True)
class ReadImage:
    """Check and read a local image: blocking file I/O, so the drivers run it, not the
    operation (the async driver in a worker thread)."""

    path: Path

    def run(self) -> LocalImage:
        info = inspect_image(self.path)
        return LocalImage(info, info.path.read_bytes())


Step = httpx.Request | Sleep | ReadImage
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


# How long an upload's URL is reused for the same bytes (the service keeps uploads 7 days),
# and how many distinct uploads are remembered.
UPLOAD_REUSE_S = 6 * 3600.0
MAX_REUSED_UPLOADS = 4096


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
        now: Callable[[], datetime] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url
        self.model = model
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._clock = clock
        self._now = now or (lambda: datetime.now(UTC))
        self._rng = rng or random.Random()
        # Seconds slept on the service's 429s, by every call of this client (thread-safe):
        # what a run spent waiting on the account's rate limit.
        self._rate_limited_wait_s = 0.0
        self._wait_lock = threading.Lock()
        # Uploads by content: a batch of many prompts on one image uploads it once.
        self._uploads: dict[tuple[str, str, str], tuple[UploadResult, float]] = {}
        self._uploads_lock = threading.Lock()

    @property
    def rate_limited_wait_s(self) -> float:
        with self._wait_lock:
            return self._rate_limited_wait_s

    def _backoff(self, error: WaveSpeedError, delay: float) -> Sleep:
        if isinstance(error, RateLimitedError):
            with self._wait_lock:
                self._rate_limited_wait_s += delay
        return Sleep(delay)

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
                operation,
                error,
                attempt,
                self.retry.max_attempts,
                delay,
            )
            yield self._backoff(error, delay)

    def _prediction_call(
        self,
        method: str,
        path: str,
        operation: str,
        prediction_id: str,
        deadline: float | None = None,
    ) -> Operation[Prediction]:
        return self._idempotent(
            lambda: self._request(method, path),
            lambda r: parse_prediction(
                r, operation=operation, prediction_id=prediction_id, now=self._now()
            ),
            operation=operation,
            prediction_id=prediction_id,
            deadline=deadline,
        )

    def _data_call(
        self, make: Callable[[], httpx.Request], read: Callable[[Any], T], operation: str
    ) -> Operation[T]:
        return self._idempotent(
            make,
            lambda r: read(envelope_data(r, operation=operation, now=self._now())),
            operation=operation,
        )

    # -- operations ------------------------------------------------------------------------

    def get_prediction(self, prediction_id: str) -> Operation[Prediction]:
        return self._prediction_call(
            "GET",
            f"/predictions/{prediction_id}/result",
            f"get prediction {prediction_id}",
            prediction_id,
        )

    def cancel(self, prediction_id: str) -> Operation[Prediction]:
        return self._prediction_call(
            "DELETE",
            f"/predictions/{prediction_id}",
            f"cancel prediction {prediction_id}",
            prediction_id,
        )

    def balance(self) -> Operation[Decimal]:
        return self._data_call(
            lambda: self._request("GET", "/balance"),
            lambda data: Decimal(str(data["balance"])),
            "balance",
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

        def read(data: Any) -> HistoryPage:
            if isinstance(data, list):  # tolerate a bare list
                data = {"items": data, "page": page, "page_size": page_size}
            return HistoryPage.model_validate(data)

        # A history query is a read even though it is a POST.
        return self._data_call(
            lambda: self._request("POST", "/predictions", json=body), read, "history"
        )

    def upload(self, data: bytes, filename: str, content_type: str) -> Operation[UploadResult]:
        """Multipart upload. Free and side-effect free apart from a new URL, so retried."""
        return self._data_call(
            lambda: self._request(
                "POST",
                "/media/upload/binary",
                files={"file": (filename, data, content_type)},
                read_timeout=self.timeouts.upload,
            ),
            UploadResult.model_validate,
            f"upload {filename}",
        )

    def upload_file(self, path: Path) -> Operation[UploadResult]:
        """Upload a local image, or reuse this client's upload of the same bytes (under the
        same name and type) from the last UPLOAD_REUSE_S: the service keeps uploads 7 days,
        and re-sending one image for each of a batch's rows costs a call and its bytes."""
        local: LocalImage = yield ReadImage(path)
        key = (
            hashlib.sha256(local.data).hexdigest(),
            local.info.path.name,
            local.info.content_type,
        )
        with self._uploads_lock:
            known = self._uploads.get(key)
        if known is not None and self._clock() - known[1] < UPLOAD_REUSE_S:
            return known[0]
        result = yield from self.upload(local.data, local.info.path.name, local.info.content_type)
        with self._uploads_lock:
            if len(self._uploads) >= MAX_REUSED_UPLOADS:
                self._uploads.clear()  # a bound, not an LRU: a process rarely has this many
            self._uploads[key] = (result, self._clock())
        return result

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
        (connect errors) or was refused with 429 (as a status or as an envelope code);
        anything ambiguous raises SubmissionUncertainError, never a second POST."""
        op = f"submit {self.model}"
        params = {"webhook": webhook} if webhook else None
        attempt = 0
        while True:
            attempt += 1
            request = self._request(
                "POST",
                f"/{self.model}",
                json=payload,
                params=params,
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
                try:
                    prediction = parse_submission(response, operation=op, now=self._now())
                except RateLimitedError as exc:
                    error = exc
                else:
                    logger.info("submitted prediction %s (%s)", prediction.id, self.model)
                    return prediction
            retry_after = error.retry_after if isinstance(error, RateLimitedError) else None
            if attempt >= self.retry.max_attempts:
                raise error
            delay = self.retry.delay(attempt, retry_after, self._rng)
            logger.warning("%s refused (%s); retrying in %.1fs", op, error, delay)
            yield self._backoff(error, delay)

    def _until_poll(
        self,
        scheduled: float,
        polls: int,
        last: float | None,
        deadline: float,
        policy: PollPolicy,
        steer: PollSteer | None,
    ) -> Operation[None]:
        """Sleep until the next poll: `scheduled` seconds from now by the policy, or when the
        steer says (asked again each time it wakes the sleep), never sooner than the
        policy's `min_interval` after the last poll; past the deadline only by less than
        that interval (the service's rule is a floor)."""
        while True:
            now = self._clock()
            delay = scheduled if steer is None else steer.next_poll(polls, scheduled)
            at = min(now + max(0.0, delay), deadline)
            if last is not None:
                at = max(at, last + policy.min_interval)
            if at <= now:
                return
            wake = steer.wake() if steer is not None else None
            woken = yield Sleep(at - now, wake=wake)
            if not woken:
                return
            scheduled = max(0.0, at - self._clock())  # what is left of the plan

    def submit(self, request: I2VRequest, *, webhook: str | None = None) -> Operation[Submission]:
        payload = yield from self.prepare(request)
        prediction = yield from self.submit_payload(payload, webhook=webhook)
        return Submission(prediction=prediction, payload=payload, request=request)

    def wait(
        self,
        prediction_id: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        poll_first: bool = True,
        polled: list[int] | None = None,
        steer: PollSteer | None = None,
    ) -> Operation[Prediction]:
        """Poll until the prediction is terminal or the wall-clock deadline passes.

        `steer`, if given, decides when each poll comes, the first one too (`poll_first`
        then only says the policy's first delay is spent), and may wake the wait early.

        `polled`, if given, gets the number of polls made appended when the wait ends
        (however it ends): whether the first poll found the task done is a fact of the wait,
        not something a caller should infer from how long it took.

        Polls are at least `poll.min_interval` apart, the last one too: near the deadline the
        wait overshoots it by less than one interval rather than break the service's rule.
        Transient poll failures (5xx, 429, network) are absorbed until the deadline: the task
        is running and paid for, so giving up early only loses it. An unknown status is "not
        finished". Returns a completed prediction with outputs; raises the typed failure
        otherwise.
        """
        policy = poll or self.poll
        deadline = self._clock() + timeout
        delays = policy.delays(self._rng)
        if poll_first:
            # The caller waited out the first delay (or is reconnecting): after a miss, the
            # next poll comes min_interval later, not first_poll_after again.
            delays.next()
        polls = 0
        first = poll_first
        last: float | None = None  # when the last poll was answered
        try:
            while True:
                if not first or steer is not None:
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise WaitTimeoutError(
                            f"prediction {prediction_id} not finished after {timeout:.0f}s "
                            f"({polls} polls); it may still complete: wait on it again",
                            prediction_id=prediction_id,
                        )
                    scheduled = 0.0 if first else delays.next()
                    yield from self._until_poll(scheduled, polls, last, deadline, policy, steer)
                first = False
                polls += 1
                try:
                    prediction = yield from self._prediction_call(
                        "GET",
                        f"/predictions/{prediction_id}/result",
                        f"poll {prediction_id}",
                        prediction_id,
                        deadline=deadline,
                    )
                except WaveSpeedError as exc:
                    if not exc.retryable or self._clock() >= deadline:
                        raise
                    logger.warning("poll of %s failed (%s); still waiting", prediction_id, exc)
                    continue
                finally:
                    last = self._clock()  # answered or failed: the floor counts from here
                if prediction.status is PredictionStatus.COMPLETED and prediction.outputs:
                    logger.info(
                        "prediction %s completed after %d polls (inference %s ms)",
                        prediction_id,
                        polls,
                        prediction.inference_ms,
                    )
                    return prediction
                if prediction.is_terminal:
                    raise task_failure(prediction)
        except GeneratorExit:
            # The driver stopped (an error or a cancellation around it): say so, because the
            # task goes on running, and billed, on the service.
            logger.info(
                "stopped waiting on prediction %s after %d polls; the task itself goes on",
                prediction_id,
                polls,
            )
            raise
        finally:
            if polled is not None:
                polled.append(polls)
