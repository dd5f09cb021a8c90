"""How long to wait between polls and between retries. Pure arithmetic, no I/O."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field


class PollPolicy(BaseModel):
    """Adaptive polling for a video task.

    The first poll comes near the expected inference time (polling earlier only costs calls):
    `first_poll_after`, or, with `learn_first_poll`, just past the inference times this process
    has seen for the same model and duration (`first_poll_margin` after them). After that the
    interval starts at `min_interval` and grows by `multiplier` up to `max_interval`, with
    +/- `jitter` so a thousand waits do not poll in lockstep. The service asks for at least
    5 s between polls for video.
    """

    model_config = ConfigDict(frozen=True)

    first_poll_after: float = Field(default=10.0, ge=0.0)
    learn_first_poll: bool = True
    first_poll_margin: float = Field(default=0.25, ge=0.0)
    min_interval: float = Field(default=5.0, ge=0.0)
    max_interval: float = Field(default=30.0, ge=0.0)
    multiplier: float = Field(default=1.5, ge=1.0)
    jitter: float = Field(default=0.1, ge=0.0, lt=1.0)

    def interval_after(self, interval: float) -> float:
        """The schedule's interval (before jitter) that follows `interval`."""
        return min(self.max_interval, max(self.min_interval, interval * self.multiplier))

    def delays(self, rng: random.Random | None = None) -> PollDelays:
        return PollDelays(self, rng or random.Random())


class PollDelays:
    """The sequence of sleeps one wait goes through."""

    def __init__(self, policy: PollPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._next: float | None = None

    def next(self) -> float:
        p = self._policy
        if self._next is None:
            # The first delay aims at the expected completion: jitter it later, never
            # earlier, or it polls before the task can be done.
            self._next = p.min_interval
            return self._rng.uniform(p.first_poll_after, p.first_poll_after * (1 + p.jitter))
        base = self._next
        self._next = p.interval_after(base)
        spread = base * p.jitter
        # Never below min_interval after the first poll: the service's rule is a floor.
        return self._rng.uniform(max(p.min_interval, base - spread), base + spread)


class RetryPolicy(BaseModel):
    """Retries of idempotent calls (GET, upload, DELETE): exponential backoff with full jitter,
    or the server's Retry-After when it gives one."""

    model_config = ConfigDict(frozen=True)

    max_attempts: int = Field(default=5, ge=1)
    backoff: float = Field(default=0.5, ge=0.0)
    max_backoff: float = Field(default=30.0, ge=0.0)
    max_retry_after: float = Field(default=120.0, ge=0.0)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to sleep before attempt number `attempt + 1` (attempt counts from 1)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return rng.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
