"""Every exception wan-tasks raises, in one tree.

Messages pass through `wan_tasks.redact.redact_text`: a signed URL or a bearer token quoted
into an error never reaches a log, a Prefect state or a report. Each error says whether trying
again can help (`retryable`), so retry conditions (the client's
own GET retries, the Prefect tasks' retry conditions) ask one question instead of listing
families or matching message text. Every error raised after a submit carries the prediction id,
so a caller can reconnect instead of paying again. Messages never contain the API key.

    WanTasksError                      root; `message`, `retryable`, pickles (Prefect states)
    (errors that were ValueError, LookupError or RuntimeError before the tree still are)
    ├── ConfigurationError             not configured: no key, bad base URL, no bucket
    │   └── MissingLimitError          a named Prefect concurrency limit does not exist
    ├── InputError (ValueError)        bad user input, found before anything is spent
    │   ├── ManifestError              a manifest that no row of can be trusted
    │   └── KeyTemplateError           an archive key template that cannot make safe keys
    ├── WaveSpeedError                 the WaveSpeed service (`prediction_id`, codes)
    │   ├── AuthenticationError        401/403
    │   ├── InsufficientBalanceError   the account cannot pay
    │   ├── InvalidRequestError        4xx, task codes 1400/1401
    │   │   └── MediaAccessError       task code 1402
    │   ├── ContentModerationError     task code 1200
    │   ├── RateLimitedError           429 (`retry_after`)               retryable
    │   ├── TransientServerError       5xx or network on an idempotent call  retryable
    │   ├── SubmissionUncertainError   a submit whose answer was lost: reconcile, never resend
    │   │   └── SubmissionNotFoundError  ...and the history shows no task  retryable
    │   ├── TaskFailedError            the task failed (`task_code`)  retryable for 5000/5003/5004
    │   │   ├── TaskCancelledError     cancelled or deleted
    │   │   └── TaskTimedOutError      the service gave up (status timeout, 5004)  retryable
    │   ├── WaitTimeoutError           the wait's deadline passed                retryable
    │   ├── OutputExpiredError         the output is gone (7-day lifetime)
    │   └── WebhookVerificationError   a forged, stale, replayed or malformed webhook
    ├── BudgetExceededError            the run's budget would be exceeded
    ├── NoSlotError                    no in-flight slot could be taken (nothing submitted)
    ├── StorageError                   object storage
    │   ├── ArchiveError               a video could not be archived (`retryable` per case)
    │   └── SeaweedError               the embedded SeaweedFS could not start
    ├── LocalServiceError              a dev-stack process did not start or died
    └── RunIncompleteError             a flow run did not land every video
        ├── RunCancelledError          the run was cancelled (videos not started)
        ├── VideoFailedError           the one video of `generate-video`
        └── BatchIncompleteError       some videos of a batch
"""

from __future__ import annotations

from typing import Any

from wan_tasks.redact import redact_text


class WanTasksError(Exception):
    """The root of every error wan-tasks raises.

    `retryable` is a class default that an instance may override (`retryable=` keyword).
    Subclasses may take any constructor arguments: pickling (Prefect stores exceptions in
    failed states) restores the instance's attributes without calling `__init__` again.
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        # Whatever a message quotes (a signed URL, a header), no credential is kept in it.
        message = redact_text(message)
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[WanTasksError], message: str, state: dict[str, Any]) -> WanTasksError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


def is_retryable(exc: BaseException | None) -> bool:
    """Whether another attempt may succeed, for errors of this package."""
    return isinstance(exc, WanTasksError) and exc.retryable


# -- configuration and input ---------------------------------------------------------------


class ConfigurationError(WanTasksError):
    """wan-tasks is not configured to do this (no API key, malformed base URL, no bucket)."""


class MissingLimitError(ConfigurationError, LookupError):
    """A named concurrency limit does not exist on the Prefect server."""


class InputError(WanTasksError, ValueError):
    """Bad user input, found before anything was spent. The message names the field (or row)
    and the rule."""


class ManifestError(InputError):
    """The manifest as a whole is unusable; no row of it can be trusted or was parsed."""


class KeyTemplateError(InputError):
    """The key template cannot produce safe keys."""


# -- the WaveSpeed service -----------------------------------------------------------------


class WaveSpeedError(WanTasksError):
    """An error of the WaveSpeed service or of talking to it."""

    def __init__(
        self,
        message: str,
        *,
        prediction_id: str | None = None,
        status_code: int | None = None,
        task_code: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable)
        self.prediction_id = prediction_id
        self.status_code = status_code
        self.task_code = task_code

    def __str__(self) -> str:
        if self.prediction_id and self.prediction_id not in self.message:
            return f"{self.message} (prediction {self.prediction_id})"
        return self.message


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
    """A submit POST was sent but no usable answer came back: the task may exist and may be
    billed. Never retried as such: reconcile through the history before submitting again."""


class SubmissionNotFoundError(SubmissionUncertainError):
    """A submit's answer was lost, and the service's history, after settling, shows no such
    task. Retryable: the retry reconciles again through the ledger before submitting."""

    retryable = True


class TaskFailedError(WaveSpeedError):
    """The task ended in `failed` (cancelled/deleted and timeout have the subclasses below).

    Retryable only for the service-side codes 5000/5003/5004 (internal, unavailable, timeout);
    1403/1405 are ambiguous and are not retried by default.
    """

    RETRYABLE_CODES = frozenset({5000, 5003, 5004})

    def __init__(
        self,
        message: str,
        *,
        prediction_id: str | None = None,
        status_code: int | None = None,
        task_code: int | None = None,
    ) -> None:
        super().__init__(
            message,
            prediction_id=prediction_id,
            status_code=status_code,
            task_code=task_code,
            retryable=task_code in self.RETRYABLE_CODES,
        )


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


class WebhookVerificationError(WaveSpeedError):
    """The webhook is forged, stale, replayed or malformed: reject it (HTTP 400)."""


# -- running videos ------------------------------------------------------------------------


class BudgetExceededError(WanTasksError):
    """Submitting this video would take the run past its budget. Not retryable."""


class NoSlotError(WanTasksError, RuntimeError):
    """No in-flight slot could be taken for a video, so it was not submitted."""


class StorageError(WanTasksError):
    """Object storage failed."""


class ArchiveError(StorageError):
    """The video could not be archived. `retryable` says whether another attempt may work."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message, retryable=retryable)


class SeaweedError(StorageError, RuntimeError):
    """The embedded SeaweedFS could not be started (the message carries its log's last lines)."""


class LocalServiceError(WanTasksError, RuntimeError):
    """A local service of the dev stack (a process on this machine) did not start or died;
    the message names it and quotes the end of its log."""


class RunIncompleteError(WanTasksError, RuntimeError):
    """A flow run did not land every video it was given; the message says which and why."""


class RunCancelledError(RunIncompleteError):
    """The flow run was cancelled: the videos it had not started were not submitted."""


class VideoFailedError(RunIncompleteError):
    """The video was not made or not archived; the message carries the typed reason."""


class BatchIncompleteError(RunIncompleteError):
    """Some videos of a batch did not land. The summary says which and why; re-run the flow to
    complete only those."""


__all__ = [
    "ArchiveError",
    "AuthenticationError",
    "BatchIncompleteError",
    "BudgetExceededError",
    "ConfigurationError",
    "ContentModerationError",
    "InputError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "KeyTemplateError",
    "LocalServiceError",
    "ManifestError",
    "MediaAccessError",
    "MissingLimitError",
    "NoSlotError",
    "OutputExpiredError",
    "RateLimitedError",
    "RunCancelledError",
    "RunIncompleteError",
    "SeaweedError",
    "StorageError",
    "SubmissionNotFoundError",
    "SubmissionUncertainError",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskTimedOutError",
    "TransientServerError",
    "WaitTimeoutError",
    "WanTasksError",
    "WaveSpeedError",
    "WebhookVerificationError",
    "is_retryable",
]
