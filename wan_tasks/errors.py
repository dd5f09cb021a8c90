"""One exception hierarchy for everything the WaveSpeed client can raise.

Each class says whether trying again can help (`retryable`), so retry policies (the client's own
GET retries, Prefect retry conditions) decide by type, never by matching message text. Every
error raised after a submit carries the prediction id, so a caller can reconnect instead of paying
again. Messages never contain the API key: the client never formats it into anything.
"""

from __future__ import annotations

from typing import Any


class WaveSpeedError(Exception):
    """Base class of every error raised by wan_tasks' WaveSpeed client."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        prediction_id: str | None = None,
        status_code: int | None = None,
        task_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.prediction_id = prediction_id
        self.status_code = status_code
        self.task_code = task_code

    def __str__(self) -> str:
        if self.prediction_id and self.prediction_id not in self.message:
            return f"{self.message} (prediction {self.prediction_id})"
        return self.message

    def __reduce__(self) -> tuple[object, ...]:
        # Prefect pickles exceptions into failed states; keyword-only arguments need this.
        return (
            _rebuild,
            (
                type(self),
                self.message,
                self.prediction_id,
                self.status_code,
                self.task_code,
                self.__dict__,
            ),
        )


def _rebuild(
    cls: type[WaveSpeedError],
    message: str,
    prediction_id: str | None,
    status_code: int | None,
    task_code: int | None,
    state: dict[str, object],
) -> WaveSpeedError:
    err = cls.__new__(cls)
    WaveSpeedError.__init__(
        err, message, prediction_id=prediction_id, status_code=status_code, task_code=task_code
    )
    err.__dict__.update(state)
    return err


class ConfigurationError(WaveSpeedError):
    """The client is not configured (no API key, malformed base URL)."""


class AuthenticationError(WaveSpeedError):
    """HTTP 401/403: the API key is missing, wrong or revoked."""


class InsufficientBalanceError(WaveSpeedError):
    """The account cannot pay for the task. Top up before retrying."""


class InvalidRequestError(WaveSpeedError):
    """The service rejected the request (HTTP 4xx, or task codes 1400/1401/1402)."""


class MediaAccessError(InvalidRequestError):
    """Task code 1402: the service could not download an input image URL."""


class ContentModerationError(WaveSpeedError):
    """Task code 1200: the input or output was blocked by content moderation."""


class RateLimitedError(WaveSpeedError):
    """HTTP 429. `retry_after` is the server's Retry-After in seconds, when it sent one."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        prediction_id: str | None = None,
        status_code: int | None = 429,
    ) -> None:
        super().__init__(message, prediction_id=prediction_id, status_code=status_code)
        self.retry_after = retry_after


class TransientServerError(WaveSpeedError):
    """HTTP 5xx or a network failure on an idempotent call: trying again later may work."""

    retryable = True


class SubmissionUncertainError(WaveSpeedError):
    """A submit POST was sent but no answer came back: the task may exist and may be billed.

    Never retried automatically. Reconcile through the history endpoint before submitting again.
    """


class TaskFailedError(WaveSpeedError):
    """The task ended in `failed` (cancelled/deleted and timeout have the subclasses below).

    Retryable only for the service-side codes 5000/5003/5004 (internal, unavailable, timeout);
    1403/1405 are ambiguous and are not retried by default.
    """

    RETRYABLE_CODES = frozenset({5000, 5003, 5004})

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = self.task_code in self.RETRYABLE_CODES


class TaskCancelledError(TaskFailedError):
    """The task was cancelled or deleted (status `cancelled` or `deleted`) before it produced
    output. Not retryable: somebody stopped it on purpose."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = False


class TaskTimedOutError(TaskFailedError):
    """The service gave up on the task (status `timeout`, or task code 5004). Retryable, like
    any service-side timeout: a new attempt is a new task."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retryable = True


class WaitTimeoutError(WaveSpeedError):
    """The wait's wall-clock deadline passed; the task may still finish on the service."""

    retryable = True


class OutputExpiredError(WaveSpeedError):
    """The prediction's output is gone (HTTP 404 on the output URL or the prediction)."""


__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ContentModerationError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "MediaAccessError",
    "OutputExpiredError",
    "RateLimitedError",
    "SubmissionUncertainError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskTimedOutError",
    "TransientServerError",
    "WaitTimeoutError",
    "WaveSpeedError",
]
