"""wan-tasks: WaveSpeedAI's Wan 2.2 image-to-video as dependable Prefect steps."""

from wan_tasks.api.client import AsyncWaveSpeedClient, WaveSpeedClient
from wan_tasks.api.models import MODEL_ID, I2VRequest, LoraWeight, Prediction, PredictionStatus
from wan_tasks.api.operations import Submission, Timeouts
from wan_tasks.api.policies import PollPolicy, RetryPolicy
from wan_tasks.errors import (
    AuthenticationError,
    ConfigurationError,
    ContentModerationError,
    InsufficientBalanceError,
    InvalidRequestError,
    MediaAccessError,
    OutputExpiredError,
    RateLimitedError,
    SubmissionUncertainError,
    TaskFailedError,
    TransientServerError,
    WaitTimeoutError,
    WaveSpeedError,
)

__all__ = [
    "MODEL_ID",
    "AsyncWaveSpeedClient",
    "AuthenticationError",
    "ConfigurationError",
    "ContentModerationError",
    "I2VRequest",
    "InsufficientBalanceError",
    "InvalidRequestError",
    "LoraWeight",
    "MediaAccessError",
    "OutputExpiredError",
    "PollPolicy",
    "Prediction",
    "PredictionStatus",
    "RateLimitedError",
    "RetryPolicy",
    "Submission",
    "SubmissionUncertainError",
    "TaskFailedError",
    "Timeouts",
    "TransientServerError",
    "WaitTimeoutError",
    "WaveSpeedClient",
    "WaveSpeedError",
]
