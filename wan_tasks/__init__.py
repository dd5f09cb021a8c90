"""wan-tasks: WaveSpeedAI's Wan 2.2 image-to-video as dependable Prefect steps.

The public surface, by layer:

- the client (`WaveSpeedClient`, `AsyncWaveSpeedClient`, `I2VRequest`, the policies) and the
  errors load with the package and import neither Prefect nor boto3;
- the never-pay-twice core (`submit_once`, `SubmittedVideo`, `Budget`), storage (`S3Place`,
  `ArchiveTarget`), the Prefect blocks, tasks and flows load on first use, so importing the
  client does not import Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wan_tasks.api.client import AsyncWaveSpeedClient, WaveSpeedClient
from wan_tasks.api.models import MODEL_ID, I2VRequest, LoraWeight, Prediction, PredictionStatus
from wan_tasks.api.operations import Submission, Timeouts
from wan_tasks.api.policies import PollPolicy, RetryPolicy
from wan_tasks.errors import (
    ArchiveError,
    AuthenticationError,
    BatchIncompleteError,
    BudgetExceededError,
    ConfigurationError,
    ContentModerationError,
    InputError,
    InsufficientBalanceError,
    InvalidRequestError,
    KeyTemplateError,
    LocalServiceError,
    LockUnavailableError,
    ManifestError,
    MediaAccessError,
    MissingLimitError,
    NoSlotError,
    OutputExpiredError,
    RateLimitedError,
    RunCancelledError,
    RunIncompleteError,
    SeaweedError,
    StorageError,
    SubmissionNotFoundError,
    SubmissionUncertainError,
    TaskCancelledError,
    TaskFailedError,
    TaskTimedOutError,
    TransientServerError,
    VideoFailedError,
    WaitTimeoutError,
    WanTasksError,
    WaveSpeedError,
    WebhookVerificationError,
)

if TYPE_CHECKING:
    from wan_tasks.core.budget import Budget
    from wan_tasks.core.submit import SubmittedVideo, submit_once
    from wan_tasks.flows.generate import generate_batch, generate_video
    from wan_tasks.flows.options import ArchiveOptions, RunOptions
    from wan_tasks.integration.blocks import WaveSpeedCredentials
    from wan_tasks.integration.limits import LimitSettings
    from wan_tasks.integration.tasks import (
        archive_to_s3,
        await_prediction,
        submit_i2v,
        wait_for_prediction,
    )
    from wan_tasks.storage.archive import ArchiveResult, ArchiveTarget
    from wan_tasks.storage.place import S3Place

# Loaded on first access: name -> module.
_LAZY = {
    "Budget": "wan_tasks.core.budget",
    "SubmittedVideo": "wan_tasks.core.submit",
    "submit_once": "wan_tasks.core.submit",
    "S3Place": "wan_tasks.storage.place",
    "ArchiveResult": "wan_tasks.storage.archive",
    "ArchiveTarget": "wan_tasks.storage.archive",
    "WaveSpeedCredentials": "wan_tasks.integration.blocks",
    "LimitSettings": "wan_tasks.integration.limits",
    "archive_to_s3": "wan_tasks.integration.tasks",
    "await_prediction": "wan_tasks.integration.tasks",
    "submit_i2v": "wan_tasks.integration.tasks",
    "wait_for_prediction": "wan_tasks.integration.tasks",
    "ArchiveOptions": "wan_tasks.flows.options",
    "RunOptions": "wan_tasks.flows.options",
    "generate_batch": "wan_tasks.flows.generate",
    "generate_video": "wan_tasks.flows.generate",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wan_tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "MODEL_ID",
    "ArchiveError",
    "ArchiveOptions",
    "ArchiveResult",
    "ArchiveTarget",
    "AsyncWaveSpeedClient",
    "AuthenticationError",
    "BatchIncompleteError",
    "Budget",
    "BudgetExceededError",
    "ConfigurationError",
    "ContentModerationError",
    "I2VRequest",
    "InputError",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "KeyTemplateError",
    "LimitSettings",
    "LocalServiceError",
    "LockUnavailableError",
    "LoraWeight",
    "ManifestError",
    "MediaAccessError",
    "MissingLimitError",
    "NoSlotError",
    "OutputExpiredError",
    "PollPolicy",
    "Prediction",
    "PredictionStatus",
    "RateLimitedError",
    "RetryPolicy",
    "RunCancelledError",
    "RunIncompleteError",
    "RunOptions",
    "S3Place",
    "SeaweedError",
    "StorageError",
    "Submission",
    "SubmissionNotFoundError",
    "SubmissionUncertainError",
    "SubmittedVideo",
    "TaskCancelledError",
    "TaskFailedError",
    "TaskTimedOutError",
    "Timeouts",
    "TransientServerError",
    "VideoFailedError",
    "WaitTimeoutError",
    "WanTasksError",
    "WaveSpeedClient",
    "WaveSpeedCredentials",
    "WaveSpeedError",
    "WebhookVerificationError",
    "archive_to_s3",
    "await_prediction",
    "generate_batch",
    "generate_video",
    "submit_i2v",
    "submit_once",
    "wait_for_prediction",
]
