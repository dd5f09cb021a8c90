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
(`seed_in_background`), beside the run's first slot and submit.

A wait with nothing to aim at (a fresh account, a duration not made lately, the history still
being read) is steered while it waits (`steer`, a `PollSteer`): it polls on the policy's fixed
schedule (10 s, then 5 s growing 1.5x: alone, a 60 s task is seen at ~76 s) but listens, and
the first time learned for its model and duration (from the history, or from the first of its
wave to end) moves its next poll to that aim. The waits of a wave stagger their polls after
the first (each shifted by its own fraction of the interval it is in), so together they poll
the timeline densely and the first task to end is seen soon after it ends, while none polls
more often than the policy allows and every first poll stays where the policy puts it. (A
probe polling every `min_interval` for the wave was tried instead: one wait then polled ~12
times for a 60 s task, and a probe that ended without a time had to hand its role over.)

It aimed at the 80th percentile and widened on every miss: with inference times that vary
(10 s +- 1.5 s in the emulator), one first poll in five missed by design, each miss doubled
the margin, and a 40-video batch kept half its lanes idle (bench/batch.py --latency-jitter).
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import logging
import math
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

import httpx

from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.models import Prediction
from wan_tasks.api.operations import Wake
from wan_tasks.api.policies import PollDelays, PollPolicy
from wan_tasks.errors import WaveSpeedError

logger = logging.getLogger(__name__)

Key = tuple[str, int]

# How far back the service's history goes (7 days, its documentation), less a margin for
# the clocks: a `created_after` past it may be refused.
HISTORY_KEPT = timedelta(days=7) - timedelta(hours=1)


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
        self._news: dict[Key, _News] = {}
        self._steered: dict[Key, int] = {}  # waits steered so far: each its own phase
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
            first = seconds > 0 and not self._seen.get(key)
            if seconds > 0:
                self._seen.setdefault(key, deque(maxlen=self._keep)).append(seconds)
            extra = self._extra.get(key, 0.0)
            if unexplained:
                self._extra[key] = min(self._max_extra, max(0.5, 2 * extra))
            elif not early:
                self._extra[key] = extra * 0.95
        if first:  # the waits of a first wave have something to aim at now
            self._tell(key)

    def aim(
        self, model: str, duration: int, miss_cost_s: float, *, min_samples: int | None = None
    ) -> float | None:
        """The first poll's time (before margins) with the least expected lateness over the
        recent times, when a task still running at the poll is seen `miss_cost_s` later (or
        a multiple of it); of equal ones the latest (fewer polls). None: fewer times than
        `min_samples` (None: the instance's)."""
        with self._lock:
            seen = sorted(self._seen.get((model, duration), ()))
        if not seen or len(seen) < (self._min_samples if min_samples is None else min_samples):
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

    def seed_from_history(
        self,
        client: WaveSpeedClient,
        model: str,
        *,
        windows: tuple[timedelta, ...] = (timedelta(days=1), HISTORY_KEPT),
        limit: int = 50,
    ) -> int:
        """Learn from the account's recent completed tasks of `model`: the tasks created
        within the first of `windows`, or, when those are too few to aim at, within the next
        (a daily schedule's last run can be a little over a day old; the service keeps a
        week). One history call, two for an account with nothing in the last day. Best
        effort: a history that cannot be read only means the first wave is not aimed."""
        items: list[tuple[int, float]] = []
        read = False
        for within in windows:
            since = (datetime.now(UTC) - within).strftime("%Y-%m-%dT%H:%M:%S.000Z")
            try:
                page = client.history(
                    model=model, status="completed", created_after=since, page_size=limit
                )
            except (WaveSpeedError, httpx.HTTPError) as exc:
                logger.debug("no (more) inference times from history: %s", exc)
                break  # what a narrower window gave is still worth having
            read = True
            # Oldest first, so the newest are the ones kept (`keep`); the service's order is
            # not documented, its times are.
            rows = sorted(page.items, key=_created)
            items = [
                (duration, item.inference_ms / 1000)
                for item in rows
                if item.inference_ms
                and isinstance(duration := (item.input or {}).get("duration"), int)
            ]
            if len(items) >= self._min_samples:
                break
        if read:
            self._learn(model, items)
        return len(items)

    def _learn(self, model: str, items: list[tuple[int, float]]) -> None:
        """Record the history's tasks at once, then tell the waits listening: a wait woken by
        its first one would otherwise aim at that one alone (and stop listening)."""
        by_key: dict[Key, list[float]] = {}
        for duration, seconds in items:
            by_key.setdefault((model, duration), []).append(seconds)
        news = []
        with self._lock:
            self._seeded.add(model)  # read once: an empty history stays empty for this run
            for key, older in by_key.items():
                own = self._seen.get(key, ())
                if not own:
                    news.append(key)
                # Older than what this run saw itself (a read that answered late): kept
                # behind the run's own times, never pushing them out.
                self._seen[key] = deque([*older, *own], maxlen=self._keep)
                self._extra[key] = self._extra.get(key, 0.0) * 0.95 ** len(older)
        for key in news:
            self._tell(key)

    def steer(
        self,
        policy: PollPolicy,
        model: str,
        duration: int,
        submitted_at: datetime,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> WaitSteer:
        """A `PollSteer` for one wait of a task submitted at `submitted_at` whose first poll
        has nothing (or too little) to aim at. The n-th of a key polls frac(n * golden
        ratio) of the way into each interval of the policy's schedule after the first poll:
        any number of waits spread evenly over every interval."""
        key = (model, duration)
        with self._lock:
            n = self._steered.get(key, 0)
            self._steered[key] = n + 1
        return WaitSteer(self, policy, key, submitted_at, now, (n * _GOLDEN) % 1.0, rng)

    def _steering(self, key: Key, miss_cost_s: float) -> tuple[int, float | None, float]:
        """At once: the news generation, the aim from every time known (None: none yet),
        and the extra margin."""
        with self._lock:
            generation = self._news.setdefault(key, _News()).generation
            seen = tuple(sorted(self._seen.get(key, ())))
            extra = self._extra.get(key, 0.0)
        return generation, (_least_late(seen, miss_cost_s) if seen else None), extra

    def _tell(self, key: Key) -> None:
        with self._lock:
            news = self._news.setdefault(key, _News())
            news.generation += 1
            listeners = list(news.listeners.values())
            news.listeners.clear()
        for listener in listeners:
            listener()


class _News:
    """One (model, duration)'s news: its first time learned. Sleeps that listen are woken
    once, on the next generation. Guarded by its InferenceTimes' lock."""

    def __init__(self) -> None:
        self.generation = 0
        self.listeners: dict[int, Callable[[], None]] = {}
        self.ids = itertools.count()


class _Since:
    """A `Wake` that fires on the first news after `generation` (at once if it came already:
    nothing is lost between a steer's look and its sleep)."""

    def __init__(self, times: InferenceTimes, key: Key, generation: int) -> None:
        self._times, self._key, self._generation = times, key, generation

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        times = self._times
        with times._lock:
            news = times._news.setdefault(self._key, _News())
            moved = news.generation != self._generation
            if not moved:
                ident = next(news.ids)
                news.listeners[ident] = callback
        if moved:
            callback()
            return lambda: None

        def unsubscribe() -> None:
            with times._lock:
                news.listeners.pop(ident, None)

        return unsubscribe


class WaitSteer:
    """Steers one wait whose first poll has nothing to aim at (`InferenceTimes.steer`; a
    `PollSteer` for `Operations.wait`).

    Nothing known: the policy's schedule, each poll after the first `phase` of the way into
    the interval that follows it (the policy's poll times t1, t2, t3...: t1, then t2 +
    phase * (t3 - t2), t3 + phase * (t4 - t3)...), listening. Something known (from the
    start, or learned while waiting): one poll at the aim plus the margins, counted from the
    submit; if that finds the task running, the policy's schedule after a first poll
    (`min_interval`, growing; stretched by the phase up to `max_interval`)."""

    def __init__(
        self,
        times: InferenceTimes,
        policy: PollPolicy,
        key: Key,
        submitted_at: datetime,
        now: Callable[[], datetime],
        phase: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self._times, self._policy, self._key = times, policy, key
        self._submitted_at, self._now = submitted_at, now
        self.phase = phase
        self._rng = rng or random.Random()
        self._interval = policy.min_interval  # the policy's interval after the last poll
        self._generation = 0
        self._listening = True
        self._polls = 0
        self._last_poll_age: float | None = None
        self._after_aim: PollDelays | None = None
        self._next_at = 0.0  # age of the planned poll, once the aim was tried
        self.aimed_at: float | None = None  # the inference time the first poll aimed at

    def next_poll(self, polls: int, scheduled: float) -> float:
        policy = self._policy
        age = (self._now() - self._submitted_at).total_seconds()
        polled = polls > self._polls
        if polled:
            self._polls, self._last_poll_age = polls, age
        generation, aim, extra = self._times._steering(self._key, policy.min_interval)
        self._generation, self._listening = generation, aim is None
        if aim is None:
            if polls == 0:
                return max(0.0, policy.first_poll_after - age)
            if not polled:  # woken with nothing new: what is left of the plan
                return scheduled
            # The policy's next delay (`scheduled`, jittered), shifted: from t(n) + phase *
            # d(n) to t(n+1) + phase * d(n+1), where d is the interval after each poll; the
            # first poll is not shifted.
            following = policy.interval_after(self._interval)
            growth = following / self._interval if self._interval > 0 else 1.0
            self._interval = following
            return scheduled * (1 + self.phase * (growth if polls == 1 else growth - 1))
        at = aim + policy.first_poll_margin + extra
        last = self._last_poll_age
        if last is None or last < at - _SAME_S:  # the aim not tried yet
            if polls == 0 and age < at:
                self.aimed_at = aim
            return max(0.0, at - age)
        # A poll at or after the aim found the task running (the aimed poll, or a poll of the
        # schedule that came after where the wave's time said): the policy's schedule after
        # a first poll, from that poll, each delay stretched by this wait's phase so that a
        # wave's misses do not all come back at once.
        if self._after_aim is None:
            self._after_aim = policy.delays(self._rng)
            self._after_aim.next()  # the first delay is the aimed poll's
            self._next_at = last + self._stretched(self._after_aim.next())
        elif polled:
            self._next_at = age + self._stretched(self._after_aim.next())
        return max(0.0, self._next_at - age)

    def _stretched(self, delay: float) -> float:
        """`delay` stretched by the phase (up to the multiplier), never past the policy's
        longest interval: a wave's misses spread out, none is seen later than the policy
        allows."""
        policy = self._policy
        longest = max(policy.max_interval, policy.min_interval)
        return max(delay, min(delay * (1 + self.phase * (policy.multiplier - 1)), longest))

    def wake(self) -> Wake | None:
        return _Since(self._times, self._key, self._generation) if self._listening else None


def _created(item: Prediction) -> datetime:
    """When a history item was created, comparable whatever the service sent (a time without
    a zone is UTC; none sorts first)."""
    at = item.created_at
    if at is None:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


# The phases of successive waits: n * golden ratio (mod 1) fills [0, 1) evenly for any n.
_GOLDEN = (math.sqrt(5) - 1) / 2

# A poll this close before the aimed time is the aimed poll (two clocks, and timers that fire
# a hair early).
_SAME_S = 0.05


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
