"""What the service has been taking, to aim first polls at (PollPolicy.learn_first_poll).

A first poll that comes too early costs a whole `min_interval` (5 s) of lateness; one that
comes late costs only its delay. So the first poll aims at an upper quantile of recent
inference times for the same model and duration, plus the policy's margin, plus an extra
margin that doubles whenever an aimed poll still finds the task running (the service's
`timings.inference` leaves out queueing and output upload) and decays slowly while polls hit.
Seeded from the account's history at the start of a run, so even a run's first wave aims.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from datetime import UTC, datetime, timedelta

import httpx

from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.policies import PollPolicy
from wan_tasks.errors import WaveSpeedError

logger = logging.getLogger(__name__)

Key = tuple[str, int]


class InferenceTimes:
    """Recent inference times per (model, duration); thread-safe."""

    def __init__(
        self, keep: int = 20, min_samples: int = 3, quantile: float = 0.8, max_extra_s: float = 30.0
    ) -> None:
        self._keep, self._min_samples, self._quantile = keep, min_samples, quantile
        self._max_extra = max_extra_s
        self._seen: dict[Key, deque[float]] = {}
        self._extra: dict[Key, float] = {}
        self._seeded: set[str] = set()
        self._lock = threading.Lock()

    def record(self, model: str, duration: int, seconds: float, *, early: bool = False) -> None:
        """One finished task; `early`: a first poll aimed from these times found it running."""
        key = (model, duration)
        with self._lock:
            if seconds > 0:
                self._seen.setdefault(key, deque(maxlen=self._keep)).append(seconds)
            extra = self._extra.get(key, 0.0)
            self._extra[key] = min(self._max_extra, max(0.5, 2 * extra)) if early else extra * 0.95

    def expected(self, model: str, duration: int) -> float | None:
        """The upper quantile of recent inference times, once there are enough of them."""
        with self._lock:
            seen = sorted(self._seen.get((model, duration), ()))
        if len(seen) < self._min_samples:
            return None
        return seen[min(len(seen) - 1, int(self._quantile * len(seen)))]

    def seeded(self, model: str) -> bool:
        """Whether the history was read for `model` already (or tasks of it were seen)."""
        with self._lock:
            return model in self._seeded or any(k[0] == model for k in self._seen)

    def first_poll_after(self, policy: PollPolicy, model: str, duration: int) -> tuple[float, bool]:
        """Seconds after the submit to poll first under `policy`, and whether that was aimed
        from what was seen (False: the policy's fixed `first_poll_after`)."""
        expected = self.expected(model, duration) if policy.learn_first_poll else None
        if expected is None:
            return policy.first_poll_after, False
        with self._lock:
            extra = self._extra.get((model, duration), 0.0)
        return expected + policy.first_poll_margin + extra, True

    def seed_from_history(
        self,
        client: WaveSpeedClient,
        model: str,
        *,
        within: timedelta = timedelta(days=1),
        limit: int = 50,
    ) -> int:
        """Learn from the account's recent completed tasks of `model` (one history call).
        Best effort: a history that cannot be read only means the first wave is not aimed."""
        since = (datetime.now(UTC) - within).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        try:
            page = client.history(
                model=model, status="completed", created_after=since, page_size=limit
            )
        except (WaveSpeedError, httpx.HTTPError) as exc:
            logger.debug("no inference times from history: %s", exc)
            return 0
        with self._lock:
            self._seeded.add(model)  # read once: an empty history stays empty for this run
        learned = 0
        for item in page.items:
            duration = (item.input or {}).get("duration")
            if item.inference_ms and isinstance(duration, int):
                self.record(model, duration, item.inference_ms / 1000)
                learned += 1
        return learned
