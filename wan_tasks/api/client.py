"""Typed sync and async clients for the WaveSpeed API.

Both drive the same sans-I/O operations (`operations.py`) over one httpx connection pool each,
with the same methods and the same explicit keyword arguments (a test compares signatures).
A driver executes the steps an operation yields and always closes the generator in `finally`,
so an exception or a cancellation in the driver runs the operation's cleanup. The async driver
runs file reads (`ReadImage`) in a worker thread: preparing a large image never blocks its loop.
The API key is a SecretStr end to end and is only ever put in the Authorization header of
requests to the API's own base URL; output downloads (a CDN) never carry it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from pydantic import SecretStr

from wan_tasks.api._tls import shared_ssl_context
from wan_tasks.api.config import resolve_api_key, resolve_base_url, service_fingerprint
from wan_tasks.api.models import MODEL_ID, HistoryPage, HistoryStatus, I2VRequest, Prediction
from wan_tasks.api.operations import (
    DEFAULT_WAIT_TIMEOUT,
    Operation,
    Operations,
    PollSteer,
    ReadImage,
    Sleep,
    Step,
    Submission,
    Timeouts,
)
from wan_tasks.api.policies import PollPolicy, RetryPolicy
from wan_tasks.api.protocol import error_for_response
from wan_tasks.redact import redact_text

T = TypeVar("T")


class _RedactUrls(logging.Filter):
    """httpx logs every request's full URL at INFO; an output URL's signature (a bearer
    credential for its lifetime) must not reach a log through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_text(str(a)) if isinstance(a, httpx.URL | str) else a for a in record.args
            )
        return True


_httpx_logger = logging.getLogger("httpx")
if not any(isinstance(f, _RedactUrls) for f in _httpx_logger.filters):
    _httpx_logger.addFilter(_RedactUrls())

_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)
_USER_AGENT = "wan-tasks/0.1"


class _Base:
    def __init__(
        self,
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        *,
        model: str = MODEL_ID,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        key, url = resolve_api_key(api_key), resolve_base_url(base_url)
        # Which service and account this client pays on (no secret in it): part of every
        # identity that can reconnect to a prediction.
        self.service_id = service_fingerprint(url, key)
        self.ops = Operations(
            api_key=key,
            base_url=url,
            model=model,
            timeouts=timeouts,
            retry=retry,
            poll=poll,
        )

    @property
    def base_url(self) -> str:
        return self.ops.base_url

    @property
    def rate_limited_wait_s(self) -> float:
        """Seconds this client has slept on the service's 429s (Retry-After), all calls."""
        return self.ops.rate_limited_wait_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.ops.model!r})"

    def _download_request(self, url: str) -> httpx.Request:
        # No Authorization header: output URLs live on a CDN, not the API.
        return httpx.Request("GET", url, extensions={"timeout": self.ops.timeouts.for_call()})


class WaveSpeedClient(_Base):
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        *,
        model: str = MODEL_ID,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api_key, base_url, model=model, timeouts=timeouts, retry=retry, poll=poll)
        self._http = httpx.Client(
            transport=transport,
            verify=shared_ssl_context(),
            limits=_LIMITS,
            headers={"User-Agent": _USER_AGENT},
            timeout=httpx.Timeout(30.0, connect=10.0),
        )

    def _run(self, op: Operation[T]) -> T:
        try:
            step: Step = next(op)
            while True:
                if isinstance(step, Sleep):
                    step = op.send(_sleep(step))
                    continue
                if isinstance(step, ReadImage):
                    try:
                        local = step.run()
                    except (OSError, ValueError) as exc:
                        step = op.throw(exc)
                        continue
                    step = op.send(local)
                    continue
                try:
                    response = self._http.send(step)
                except httpx.TransportError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(response)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            op.close()

    def submit(self, request: I2VRequest, *, webhook: str | None = None) -> Submission:
        """Upload local images and submit. Never sends the POST twice."""
        return self._run(self.ops.submit(request, webhook=webhook))

    def prepare(self, request: I2VRequest) -> dict[str, Any]:
        return self._run(self.ops.prepare(request))

    def submit_payload(self, payload: dict[str, Any], *, webhook: str | None = None) -> Prediction:
        return self._run(self.ops.submit_payload(payload, webhook=webhook))

    def get_prediction(self, prediction_id: str) -> Prediction:
        return self._run(self.ops.get_prediction(prediction_id))

    def wait(
        self,
        prediction_id: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        poll_first: bool = True,
        polled: list[int] | None = None,
        steer: PollSteer | None = None,
    ) -> Prediction:
        """Poll until done (see Operations.wait); `poll_first=False` right after a submit."""
        return self._run(
            self.ops.wait(
                prediction_id,
                timeout=timeout,
                poll=poll,
                poll_first=poll_first,
                polled=polled,
                steer=steer,
            )
        )

    def run(
        self,
        request: I2VRequest,
        *,
        webhook: str | None = None,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
    ) -> Prediction:
        """Submit and wait. Errors after the submit carry the prediction id."""
        submission = self.submit(request, webhook=webhook)
        return self.wait(submission.prediction.id, timeout=timeout, poll=poll, poll_first=False)

    def upload(self, path: Path) -> str:
        return self._run(self.ops.upload_file(path)).download_url

    def cancel(self, prediction_id: str) -> Prediction:
        return self._run(self.ops.cancel(prediction_id))

    def balance(self) -> Decimal:
        return self._run(self.ops.balance())

    def history(
        self,
        *,
        created_after: str | None = None,
        created_before: str | None = None,
        model: str | None = None,
        status: HistoryStatus | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> HistoryPage:
        """One page of the account's task history (ISO 8601 bounds)."""
        return self._run(
            self.ops.history(
                created_after=created_after,
                created_before=created_before,
                model=model,
                status=status,
                page=page,
                page_size=page_size,
            )
        )

    @contextmanager
    def stream_output(self, url: str) -> Iterator[httpx.Response]:
        """Stream an output file; raises the typed error for a non-200 answer."""
        # A CDN may redirect; the request carries no Authorization header to leak, and httpx
        # drops it across origins anyway.
        response = self._http.send(self._download_request(url), stream=True, follow_redirects=True)
        try:
            if response.status_code != 200:
                response.read()
                raise error_for_response(response, operation=f"download {url}")
            yield response
        finally:
            response.close()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _sleep(step: Sleep) -> bool:
    """Sleep a step's seconds; True when its `wake` ended the sleep early."""
    if step.wake is None:
        time.sleep(step.seconds)
        return False
    woken = threading.Event()
    unsubscribe = step.wake.subscribe(woken.set)
    try:
        return woken.wait(step.seconds)
    finally:
        unsubscribe()


async def _async_sleep(step: Sleep) -> bool:
    """`_sleep` on the event loop: a wake from another thread comes through the loop."""
    if step.wake is None:
        await asyncio.sleep(step.seconds)
        return False
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[bool] = loop.create_future()

    def settle() -> None:
        if not woken.done():
            woken.set_result(True)

    def wake() -> None:
        # A closed loop has nobody sleeping on it any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    unsubscribe = step.wake.subscribe(wake)
    try:
        # Not wait_for: on Python 3.11 it returns a future's result that came in the same
        # loop iteration as a cancellation, and the cancellation is lost.
        await asyncio.wait({woken}, timeout=step.seconds)
        return woken.done() and not woken.cancelled()
    finally:
        unsubscribe()
        woken.cancel()


def _request_gate() -> asyncio.Semaphore:
    # At most as many API calls at once as the pool has connections: thousands of waits
    # polling at once would otherwise all queue inside httpcore's pool, whose assignment of
    # queued requests to connections is quadratic in the queue (3,000 in flight: a core spent
    # there, measured with bench/inflight.py).
    return asyncio.Semaphore(_LIMITS.max_connections or 100)


def _async_http(transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        verify=shared_ssl_context(),
        limits=_LIMITS,
        headers={"User-Agent": _USER_AGENT},
        timeout=httpx.Timeout(30.0, connect=10.0),
    )


class AsyncWaveSpeedClient(_Base):
    """Asyncio client with the same methods as WaveSpeedClient."""

    def __init__(
        self,
        api_key: SecretStr | str | None = None,
        base_url: str | None = None,
        *,
        model: str = MODEL_ID,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api_key, base_url, model=model, timeouts=timeouts, retry=retry, poll=poll)
        self._http = _async_http(transport)
        self._gate = _request_gate()

    @classmethod
    def sharing(
        cls, client: WaveSpeedClient, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> AsyncWaveSpeedClient:
        """An async client on the same account and settings as `client`, sharing its
        operations (and so its retry and 429 accounting); its connection pool is its own,
        since an asyncio pool belongs to the event loop that uses it."""
        new = cls.__new__(cls)
        new.service_id, new.ops = client.service_id, client.ops
        new._http = _async_http(transport)
        new._gate = _request_gate()
        return new

    async def _run(self, op: Operation[T]) -> T:
        try:
            step: Step = next(op)
            while True:
                if isinstance(step, Sleep):
                    step = op.send(await _async_sleep(step))
                    continue
                if isinstance(step, ReadImage):
                    try:
                        local = await asyncio.to_thread(step.run)
                    except (OSError, ValueError) as exc:
                        step = op.throw(exc)
                        continue
                    step = op.send(local)
                    continue
                try:
                    async with self._gate:
                        response = await self._http.send(step)
                except httpx.TransportError as exc:
                    step = op.throw(exc)
                    continue
                step = op.send(response)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            op.close()

    async def submit(self, request: I2VRequest, *, webhook: str | None = None) -> Submission:
        return await self._run(self.ops.submit(request, webhook=webhook))

    async def prepare(self, request: I2VRequest) -> dict[str, Any]:
        return await self._run(self.ops.prepare(request))

    async def submit_payload(
        self, payload: dict[str, Any], *, webhook: str | None = None
    ) -> Prediction:
        return await self._run(self.ops.submit_payload(payload, webhook=webhook))

    async def get_prediction(self, prediction_id: str) -> Prediction:
        return await self._run(self.ops.get_prediction(prediction_id))

    async def wait(
        self,
        prediction_id: str,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
        poll_first: bool = True,
        polled: list[int] | None = None,
        steer: PollSteer | None = None,
    ) -> Prediction:
        """Poll until done (see Operations.wait); `poll_first=False` right after a submit."""
        return await self._run(
            self.ops.wait(
                prediction_id,
                timeout=timeout,
                poll=poll,
                poll_first=poll_first,
                polled=polled,
                steer=steer,
            )
        )

    async def run(
        self,
        request: I2VRequest,
        *,
        webhook: str | None = None,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll: PollPolicy | None = None,
    ) -> Prediction:
        """Submit and wait. Errors after the submit carry the prediction id."""
        submission = await self.submit(request, webhook=webhook)
        return await self.wait(
            submission.prediction.id, timeout=timeout, poll=poll, poll_first=False
        )

    async def upload(self, path: Path) -> str:
        return (await self._run(self.ops.upload_file(path))).download_url

    async def cancel(self, prediction_id: str) -> Prediction:
        return await self._run(self.ops.cancel(prediction_id))

    async def balance(self) -> Decimal:
        return await self._run(self.ops.balance())

    async def history(
        self,
        *,
        created_after: str | None = None,
        created_before: str | None = None,
        model: str | None = None,
        status: HistoryStatus | None = None,
        page: int = 1,
        page_size: int = 50,
    ) -> HistoryPage:
        """One page of the account's task history (ISO 8601 bounds)."""
        return await self._run(
            self.ops.history(
                created_after=created_after,
                created_before=created_before,
                model=model,
                status=status,
                page=page,
                page_size=page_size,
            )
        )

    @asynccontextmanager
    async def stream_output(self, url: str) -> AsyncIterator[httpx.Response]:
        response = await self._http.send(
            self._download_request(url), stream=True, follow_redirects=True
        )
        try:
            if response.status_code != 200:
                await response.aread()
                raise error_for_response(response, operation=f"download {url}")
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
