"""What the service has been taking, to aim first polls at (PollPolicy.learn_first_poll).

A first poll that comes too early costs the task the wait until the next poll (the policy's
`min_interval`, 5 s: the service's rule); one that comes late costs only its delay. So the
first poll aims where the expected lateness over the recent inference times of the same model
and duration is least, counting that cost (`aim`): with times that vary less than the interval
usually the slowest of them, with times spread wider an earlier one. Then come the policy's
margin and an extra margin for what `timings.inference` leaves out (queueing, output upload):
it doubles when an aimed poll finds running a task whose own inference fitted the aim (a miss
the spread of the times does not explain) and decays slowly while polls hit. Seeded from the
account's history at the start of a run, so even a run's first wave aims: in the background
(`seed_in_background`), beside the run's first slot and submit, and waited for only by a wait
that would otherwise poll at the fixed time (`learning`).

It aimed at the 80th percentile and widened on every miss: with inference times that vary
(10 s +- 1.5 s in the emulator), one first poll in five missed by design, each miss doubled
the margin, and a 40-video batch kept half its lanes idle (bench/batch.py --latency-jitter).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import threading
from collections import deque
from concurrent.futures import Future
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
        self._seeding: dict[str, Future[int]] = {}
        self._lock = threading.Lock()

    def record(
        self,
        model: str,
        duration: int,
        seconds: float,
        *,
        early: bool = False,
        aimed_at: float | None = None,
    ) -> None:
        """One finished task; `early`: a first poll aimed at `aimed_at` (an inference time,
        before the margins) found it running."""
        key = (model, duration)
        # A task whose own inference took longer than its poll's aim is a miss the aim
        # accepted (the times vary); only one that fitted it says the margin is short. The
        # aim is the one its poll used: the times have changed since.
        unexplained = early and (aimed_at is None or seconds <= aimed_at)
        with self._lock:
            if seconds > 0:
                self._seen.setdefault(key, deque(maxlen=self._keep)).append(seconds)
            extra = self._extra.get(key, 0.0)
            if unexplained:
                self._extra[key] = min(self._max_extra, max(0.5, 2 * extra))
            elif not early:
                self._extra[key] = extra * 0.95

    def aim(self, model: str, duration: int, miss_cost_s: float) -> float | None:
        """The first poll's time (before margins) with the least expected lateness over the
        recent times, when a task still running at the poll is seen `miss_cost_s` later (or
        a multiple of it); of equal ones the latest (fewer polls). None: too few times."""
        with self._lock:
            seen = sorted(self._seen.get((model, duration), ()))
        if len(seen) < self._min_samples:
            return None
        return _least_late(tuple(seen), miss_cost_s)

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
            return self._seeded_locked(model)

    def _seeded_locked(self, model: str) -> bool:
        return model in self._seeded or any(k[0] == model for k in self._seen)

    def first_poll_after(self, policy: PollPolicy, model: str, duration: int) -> tuple[float, bool]:
        """Seconds after the submit to poll first under `policy`, and whether that was aimed
        from what was seen (False: the policy's fixed `first_poll_after`)."""
        seconds, aimed_at = self.aimed_poll(policy, model, duration)
        return seconds, aimed_at is not None

    def aimed_poll(
        self, policy: PollPolicy, model: str, duration: int
    ) -> tuple[float, float | None]:
        """Seconds after the submit to poll first, and the inference time that aims at (None:
        the policy's fixed `first_poll_after`, nothing learned or learning off)."""
        aim = self.aim(model, duration, policy.min_interval) if policy.learn_first_poll else None
        if aim is None:
            return policy.first_poll_after, None
        with self._lock:
            extra = self._extra.get((model, duration), 0.0)
        return aim + policy.first_poll_margin + extra, aim

    def seed_in_background(self, client: WaveSpeedClient, model: str) -> Future[int]:
        """`seed_from_history` in a thread of its own, once per model: the history call is
        then off the run's way to its first submit. The future's result: tasks learned from
        (0 when the history was read already)."""
        learning: Future[int] = Future()
        with self._lock:
            running = self._seeding.get(model)
            if running is not None and not running.done():
                return running
            known = self._seeded_locked(model)
            if not known:
                self._seeding[model] = learning
        if known:  # read once a process: a later run learns nothing new from it
            learning.set_result(0)
            return learning

        def seed() -> None:
            if not learning.set_running_or_notify_cancel():  # cancelled before it began
                return
            try:
                learned = self.seed_from_history(client, model)
            except Exception as exc:  # a bug: the first polls then come at the fixed time
                logger.warning("first polls not aimed from the history: %r", exc)
                learned = 0
            learning.set_result(learned)

        run = contextvars.copy_context().run
        try:
            threading.Thread(target=run, args=(seed,), name="wan-history", daemon=True).start()
        except RuntimeError:  # no thread to be had: nobody waits for a read that never ends
            learning.cancel()
            with self._lock:
                self._seeding.pop(model, None)
        return learning

    def learning(self, model: str) -> Future[int] | None:
        """The history read for `model` while it is under way; None once it is done (or
        when none was started)."""
        with self._lock:
            running = self._seeding.get(model)
        return running if running is not None and not running.done() else None

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


@functools.lru_cache(maxsize=64)
def _least_late(seen: tuple[float, ...], miss_cost_s: float) -> float:
    """The aim with the least total lateness over `seen` (sorted), a task still running at
    the poll being seen a whole number of `miss_cost_s` later; of equal ones the latest.

    Moving an aim `miss_cost_s` earlier changes no task's lateness but those that finished
    before the earlier aim, whose lateness it cuts: so the best aim is below seen[0] +
    miss_cost_s, and, by the tie rule, not below seen[0]. It is one of the points in that
    window where a task is seen the moment it finishes: each time moved down by whole
    intervals into it. Cached: the times change once a task."""
    if miss_cost_s <= 0:
        return seen[0]
    low = seen[0]
    candidates = {x - miss_cost_s * math.floor((x - low) / miss_cost_s + _EPS) for x in seen}
    best, best_cost = low, math.inf
    for aim in sorted(candidates):
        cost = sum(
            aim - x
            if x <= aim + _EPS
            else miss_cost_s * math.ceil((x - aim) / miss_cost_s - _EPS) - (x - aim)
            for x in seen
        )
        if cost <= best_cost + _EPS:
            best, best_cost = aim, cost
    return best


# Float tolerance: a candidate aim sits exactly where a task is seen at once, and rounding
# must not charge that task a whole interval.
_EPS = 1e-9
