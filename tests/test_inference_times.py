"""Aiming the first poll from observed inference times, and seeding them from history."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from wan_tasks import I2VRequest, PollPolicy
from wan_tasks.api.models import MODEL_ID
from wan_tasks.core.inference_times import InferenceTimes

MODEL = MODEL_ID


def test_aims_at_an_upper_quantile_of_what_was_seen() -> None:
    times = InferenceTimes(keep=5, min_samples=3, quantile=0.8)
    policy = PollPolicy(first_poll_after=10, first_poll_margin=0.25)
    times.record(MODEL, 5, 30.0)
    times.record(MODEL, 5, 31.0)
    assert times.first_poll_after(policy, MODEL, 5) == (10, False)  # too few samples yet
    times.record(MODEL, 5, 0.0)  # a missing timing is not a sample
    assert times.expected(MODEL, 5) is None
    times.record(MODEL, 5, 32.0)
    assert times.first_poll_after(policy, MODEL, 5) == (32.25, True)  # quantile + margin
    assert times.expected(MODEL, 8) is None  # per duration
    for s in (40.0, 41.0, 42.0, 43.0, 44.0):  # keeps only the most recent
        times.record(MODEL, 5, s)
    assert times.expected(MODEL, 5) == 44.0
    fixed = policy.model_copy(update={"learn_first_poll": False})
    assert times.first_poll_after(fixed, MODEL, 5) == (10, False)


def test_an_early_poll_widens_the_margin_and_hits_narrow_it_slowly() -> None:
    times = InferenceTimes(min_samples=1)
    policy = PollPolicy(first_poll_margin=0.25)
    times.record(MODEL, 5, 20.0)
    assert times.first_poll_after(policy, MODEL, 5)[0] == 20.25
    times.record(MODEL, 5, 20.0, early=True)  # the task was not done at 20.25 s
    assert times.first_poll_after(policy, MODEL, 5)[0] == 20.75
    times.record(MODEL, 5, 20.0, early=True)
    assert times.first_poll_after(policy, MODEL, 5)[0] == 21.25
    for _ in range(10):
        times.record(MODEL, 5, 20.0)
    after_hits = times.first_poll_after(policy, MODEL, 5)[0]
    assert 20.25 < after_hits < 21.25  # decays, but not back to the edge at once
    for _ in range(10):
        times.record(MODEL, 5, 20.0, early=True)
    assert times.first_poll_after(policy, MODEL, 5)[0] == 20.25 + 30.0  # bounded


def _lateness(aim: float, times: list[float], interval: float) -> float:
    """Total lateness of first polls at `aim`, then every `interval`, over `times`."""
    return sum(
        # (to the nanosecond: a float 2.0000000001 intervals is two)
        aim - x
        if x <= aim + 1e-9
        else interval * math.ceil((x - aim) / interval - 1e-9) - (x - aim)
        for x in times
    )


def test_the_first_poll_aims_where_the_least_lateness_is_expected() -> None:
    """A miss costs the task the wait until the next poll (min_interval, 5 s). Times that
    vary less than that: aim at the slowest. Times spread wider (the model page's 50-65 s):
    an earlier aim, whichever makes the least lateness (checked against every aim on a
    grid)."""
    narrow = [8.6, 9.1, 9.7, 10.2, 10.8, 11.3]
    times = InferenceTimes(min_samples=3)
    for x in narrow:
        times.record(MODEL, 5, x)
    assert times.aim(MODEL, 5, 5.0) == 11.3
    assert times.first_poll_after(PollPolicy(first_poll_margin=0.25), MODEL, 5) == (11.55, True)

    wide = [50.0, 51.5, 53.0, 55.5, 57.0, 58.5, 60.0, 62.5, 64.0, 65.0]
    spread = InferenceTimes(min_samples=3)
    for x in wide:
        spread.record(MODEL, 5, x)
    aim = spread.aim(MODEL, 5, 5.0)
    assert aim is not None and 50.0 <= aim < 65.0
    grid = [45.0 + i * 0.05 for i in range(500)]
    assert _lateness(aim, wide, 5.0) <= min(_lateness(a, wide, 5.0) for a in grid) + 1e-6
    assert _lateness(aim, wide, 5.0) < _lateness(65.0, wide, 5.0)
    # Times that vary less than the interval but unevenly: not always the slowest.
    uneven = InferenceTimes(min_samples=3)
    for x in (10.0, 10.0, 10.0, 10.0, 14.0):
        uneven.record(MODEL, 5, x)
    assert uneven.aim(MODEL, 5, 5.0) == 10.0
    # Rounding at the points where a task is seen at once costs it nothing.
    tight = InferenceTimes(min_samples=1)
    for x in (6.63, 7.03, 7.39, 7.83):
        tight.record(MODEL, 5, x)
    aim = tight.aim(MODEL, 5, 0.2)
    assert aim is not None
    times_ = [6.63, 7.03, 7.39, 7.83]
    assert (
        _lateness(aim, times_, 0.2)
        <= min(_lateness(6.4 + i * 0.001, times_, 0.2) for i in range(1600)) + 1e-6
    )


def test_only_a_miss_the_spread_does_not_explain_widens_the_margin() -> None:
    """The aim accepts that some tasks take longer than it (the times vary): a miss by such
    a task leaves the margin as it is, judged against the aim its poll used (a batch's
    second wave is aimed from the fast tasks of the first, and the slow ones arrive before
    it is done). A miss by a task whose own inference fitted its aim means time the
    service's timings leave out (queueing, upload): the margin widens. With every miss
    widening it, varying times kept half a batch's lanes idle."""
    times = InferenceTimes(min_samples=3)
    policy = PollPolicy(first_poll_margin=0.25)
    for x in (8.6, 9.0, 9.3):  # the first wave's fast tasks
        times.record(MODEL, 5, x)
    seconds, aimed_at = times.aimed_poll(policy, MODEL, 5)
    assert aimed_at == 9.3 and seconds == pytest.approx(9.55)  # the second wave's aim
    for x in (11.0, 11.4):  # the first wave's slow tasks, seen later
        times.record(MODEL, 5, x)
    for x in (10.5, 10.8, 11.2):  # the second wave: slower than its aim
        times.record(MODEL, 5, x, early=True, aimed_at=aimed_at)
    aim = times.aim(MODEL, 5, policy.min_interval)
    assert aim is not None
    assert times.first_poll_after(policy, MODEL, 5)[0] == pytest.approx(aim + 0.25)
    times.record(MODEL, 5, aim - 1.0, early=True, aimed_at=aim)  # fitted, still running
    widened = times.first_poll_after(policy, MODEL, 5)[0]
    assert widened == pytest.approx(times.aim(MODEL, 5, policy.min_interval) + 0.25 + 0.5)  # type: ignore[operator]


def test_seeded_from_the_accounts_history(
    make_emulator: Callable[..., Any], make_client: Callable[..., Any]
) -> None:
    from tests.conftest import SAMPLE

    emu = make_emulator(latency_s=0.3)
    client = make_client(emu)
    for i in range(3):
        client.run(I2VRequest(image=str(SAMPLE), prompt=f"history seed {i}", duration=5))
    times = InferenceTimes()
    assert times.seed_from_history(client, MODEL) == 3
    expected = times.expected(MODEL, 5)
    # One of the inference times the history reports (how long the emulator's tasks took
    # depends on the machine's load; at least its latency).
    reported = {
        item.inference_ms / 1000
        for item in client.history(model=MODEL, status="completed").items
        if item.inference_ms
    }
    assert expected is not None and expected in reported and expected >= 0.25
    assert times.expected(MODEL, 8) is None and times.seeded(MODEL)
    assert not InferenceTimes().seeded(MODEL)


def test_an_account_with_nothing_in_the_last_day_is_read_back_a_week(
    make_emulator: Callable[..., Any], make_client: Callable[..., Any]
) -> None:
    """A daily schedule's previous run can be a little more than a day old: the history of
    the last day is then empty, and the first wave went unaimed. The read now goes back as
    far as the service keeps tasks (a week), and only when the last day has too few."""
    from tests.conftest import SAMPLE

    emu = make_emulator(latency_s=0.3)
    client = make_client(emu)
    for i in range(3):
        client.run(I2VRequest(image=str(SAMPLE), prompt=f"yesterday {i}", duration=5))
    engine = emu._server.engine
    with engine.lock:
        yesterday = list(engine.tasks.values())
        for task in yesterday:
            task.created -= 25 * 3600  # yesterday's run, an hour earlier than today's
    before = emu.stats()["history_queries"]
    times = InferenceTimes()
    assert times.seed_from_history(client, MODEL) == 3
    assert times.expected(MODEL, 5) is not None
    assert emu.stats()["history_queries"] - before == 2  # the day, then the week
    # Enough in the last day: one call, as before.
    client.run(I2VRequest(image=str(SAMPLE), prompt="today", duration=5))
    with engine.lock:
        for task in yesterday:
            task.created += 25 * 3600
    before = emu.stats()["history_queries"]
    assert InferenceTimes().seed_from_history(client, MODEL) == 4
    assert emu.stats()["history_queries"] - before == 1


def test_a_slow_answer_to_a_first_poll_that_hit_is_not_a_miss(
    make_stack: Callable[..., Any], monkeypatch: Any
) -> None:
    """Whether the aimed first poll found the task running is counted from the polls, not
    timed: on a loaded machine a poll that found the task done could take seconds to answer,
    each such wait doubled the margin, and waits of 1 s tasks grew to 9 s (bench/growth.py)."""
    from tests.conftest import SAMPLE
    from wan_tasks.core.submit import submit_once
    from wan_tasks.integration import tasks
    from wan_tasks.integration.runtime import wavespeed_client

    stack = make_stack(latency_s=0.3)
    policy = PollPolicy(first_poll_after=0.3, min_interval=0.5, max_interval=1.0, jitter=0.0)
    learned = InferenceTimes()
    # Learned at 3 s (the tasks take 0.3): a wait task that starts up to ~3 s after its
    # submit on a loaded machine still aims its first poll (later, it polls at once, not
    # aimed, and a poll that finds the task running is then rightly no miss).
    for _ in range(3):
        learned.record(MODEL, 5, 3.0)
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    client = wavespeed_client()

    def extra_margin() -> float:  # what misses added to the aim
        expected = learned.aim(MODEL, 5, policy.min_interval)
        assert expected is not None
        return learned.first_poll_after(policy, MODEL, 5)[0] - expected - policy.first_poll_margin

    def submitted(seed: int) -> Any:
        # Waited on at once: the first poll is aimed 3.25 s after the submit.
        return submit_once(client, I2VRequest(image=str(SAMPLE), prompt="aim", seed=seed))

    # The first poll hits, and answers 3 s late: not a miss, the aim stays.
    stack.emulator.set_faults({"script": {"result": ["slow"]}, "slow_s": 3.0})
    hit = submitted(1)
    assert tasks.wait_for_prediction(hit, poll=policy).status.value == "completed"
    assert stack.stats()["polls_by_prediction"][hit.prediction_id] == 1
    assert extra_margin() == pytest.approx(0.0)
    # The first poll finds it running (a status shown once): a miss, the margin widens.
    stack.emulator.set_faults({"script": {"result": ["status=processing"]}})
    miss = submitted(2)
    assert tasks.wait_for_prediction(miss, poll=policy).status.value == "completed"
    assert stack.stats()["polls_by_prediction"][miss.prediction_id] == 2
    assert extra_margin() == pytest.approx(0.5)  # widened (and doubling per miss)


def test_the_history_is_read_beside_the_first_submit_and_still_aims_its_first_poll(
    make_stack: Callable[..., Any], monkeypatch: Any
) -> None:
    """The account's history was read before anything else of a run: a service round trip
    before the first submit, in every new worker process. It is now read beside the slot
    and the submit; the wait, whose first poll is aimed from it, listens for it. Here the
    history answers only once the submit was answered: before, the run waited for it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import SAMPLE, run_video
    from wan_tasks.api.client import WaveSpeedClient
    from wan_tasks.flows.options import RunOptions
    from wan_tasks.integration import tasks
    from wan_tasks.integration.runtime import wavespeed_client

    stack = make_stack(latency_s=4.0)
    client = wavespeed_client()
    quick = PollPolicy(first_poll_after=4.0, min_interval=0.5, max_interval=1.0, jitter=0.0)
    with ThreadPoolExecutor(3) as pool:  # the account's history: three 4 s tasks
        done = pool.map(
            lambda i: client.run(I2VRequest(image=str(SAMPLE), prompt=f"earlier {i}"), poll=quick),
            range(3),
        )
        assert all(p.status.value == "completed" for p in done)
    learned = InferenceTimes()
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    submit_answered = threading.Event()
    submit = WaveSpeedClient.submit_payload

    def submit_payload(self: WaveSpeedClient, *args: Any, **kwargs: Any) -> Any:
        prediction = submit(self, *args, **kwargs)
        submit_answered.set()
        return prediction

    monkeypatch.setattr(WaveSpeedClient, "submit_payload", submit_payload)
    after_the_submit: list[bool] = []
    read = learned.seed_from_history

    def seed(*args: Any, **kwargs: Any) -> int:
        after_the_submit.append(submit_answered.wait(20))
        return read(*args, **kwargs)

    monkeypatch.setattr(learned, "seed_from_history", seed)
    aims = _aims(monkeypatch)
    # Unaimed, the first poll would come at 30 s.
    policy = PollPolicy(first_poll_after=30.0, min_interval=0.5, max_interval=1.0, jitter=0.0)
    out = run_video(
        I2VRequest(image=str(SAMPLE), prompt="beside the history"),
        options=RunOptions(poll=policy),
    )
    assert out.status == "archived"
    assert after_the_submit == [True]
    (aimed,) = aims
    assert aimed is not None and aimed >= 3.9  # aimed from the history's 4 s tasks
    assert stack.stats()["polls_by_prediction"][out.prediction_id] == 1


def test_a_history_read_that_does_not_end_leaves_the_first_poll_at_its_fixed_time(
    make_stack: Callable[..., Any], monkeypatch: Any
) -> None:
    """The wait listens for the history while it waits for its fixed first poll: a read that
    hangs costs the first poll its aim, never the video."""
    import threading

    from tests.conftest import SAMPLE, run_video
    from wan_tasks.flows.options import RunOptions
    from wan_tasks.integration import tasks

    make_stack(latency_s=0.3)
    learned = InferenceTimes()
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    release, returned = threading.Event(), threading.Event()

    def seed(*args: Any, **kwargs: Any) -> int:
        release.wait(60)
        returned.set()
        return 0

    monkeypatch.setattr(learned, "seed_from_history", seed)
    aims = _aims(monkeypatch)
    policy = PollPolicy(first_poll_after=1.0, min_interval=0.5, max_interval=1.0, jitter=0.0)
    try:
        out = run_video(
            I2VRequest(image=str(SAMPLE), prompt="history hangs"), options=RunOptions(poll=policy)
        )
        still_reading = not returned.is_set()
    finally:
        release.set()
    assert out.status == "archived" and still_reading
    assert aims == [None]


def _aims(monkeypatch: Any) -> list[float | None]:
    """What each wait's first poll aimed at (None: not aimed at learned times)."""
    from wan_tasks.integration import tasks

    seen: list[float | None] = []
    waited = tasks._waited

    def spy(submitted: Any, prediction: Any, *, aimed: float | None, polls: int) -> Any:
        seen.append(aimed)
        return waited(submitted, prediction, aimed=aimed, polls=polls)

    monkeypatch.setattr(tasks, "_waited", spy)
    return seen


def test_a_first_wave_staggers_listens_and_aims_once_a_time_is_learned() -> None:
    """With nothing known for a model and duration, each wait polls first where the policy
    says, then each later poll its own fraction (phase) of the way into the policy's next
    interval (the first wait: not shifted; together they spread over every interval), and
    listens. The first time learned wakes the listeners, whose next poll moves to that aim
    from their submit; a later wait aims its first poll at once; an aimed poll that finds
    the task running goes back to the policy's schedule after a first poll."""
    from datetime import UTC, timedelta

    times = InferenceTimes()
    policy = PollPolicy(first_poll_after=10, min_interval=5, first_poll_margin=0.25, jitter=0.1)
    t0 = datetime(2026, 12, 7, tzinfo=UTC)
    clock = [t0]

    def at(seconds: float) -> None:
        clock[0] = t0 + timedelta(seconds=seconds)

    def steer(submitted: float, duration: int = 5) -> Any:
        return times.steer(
            policy, MODEL, duration, t0 + timedelta(seconds=submitted), now=lambda: clock[0]
        )

    wave = [steer(0), steer(1)] + [steer(1) for _ in range(30)]
    phases = sorted(w.phase for w in wave)
    assert wave[0].phase == 0.0 and all(0.0 <= x < 1.0 for x in phases)
    # Spread over the whole interval: no gap between neighbours wider than 2/n of it.
    gaps = [b - a for a, b in zip(phases, [*phases[1:], 1.0], strict=True)]
    assert max(gaps) < 2 / len(wave)
    assert steer(0, duration=8).phase == 0.0  # each duration its own wave
    first, listener = wave[0], wave[1]
    phase = listener.phase
    at(1)
    assert first.next_poll(0, 0.0) == 9.0  # the policy's first poll, 10 s after its submit
    assert listener.next_poll(0, 0.0) == 10.0  # the first poll is never shifted
    at(10)
    assert first.next_poll(1, 5.0) == 5.0  # unshifted: the policy's 15, 22.5, 33.75...
    assert first.next_poll(2, 7.5) == 7.5
    at(11)
    # The listener's polls: 15 + 7.5 * phase, then 22.5 + 11.25 * phase (from its submit).
    assert listener.next_poll(1, 5.0) == pytest.approx(5.0 + phase * 7.5)
    at(11 + 5.0 + phase * 7.5)
    assert listener.next_poll(2, 7.5) == pytest.approx(7.5 + phase * (11.25 - 7.5))
    woken: list[str] = []
    wake = listener.wake()
    assert wake is not None
    wake.subscribe(lambda: woken.append("listener"))
    at(22)
    times.record(MODEL, 5, 30.0)  # the first task of the wave to end took 30 s
    assert woken == ["listener"]
    # Woken at 21 s of its age: its next poll is 30.25 s after its own submit.
    assert listener.next_poll(2, 10.0) == pytest.approx(9.25)
    assert listener.wake() is None and listener.aimed_at is None  # aimed mid-wait only
    times.record(MODEL, 5, 30.0)
    assert woken == ["listener"]  # news once: later times wake nobody

    later = steer(40)
    at(40)
    assert later.next_poll(0, 0.0) == pytest.approx(30.25) and later.aimed_at == 30.0
    at(70.26)  # the aimed poll found it running
    after = later.next_poll(1, 0.0)
    # min_interval (+ jitter), as after any first poll, stretched by the wait's phase (up to
    # the multiplier) so that a wave's misses do not all come back at once
    spread = 1 + later.phase * 0.5
    assert 5.0 * spread <= after <= 5.5 * spread
    at(71)
    assert later.next_poll(1, 0.0) == pytest.approx(after - 0.74)  # the plan holds

    # News that comes after a wait's scheduled poll already passed the aim: its task ran
    # longer than the wave's first; the after-first-poll schedule, from that poll.
    behind = steer(100, duration=8)
    at(100)
    assert behind.next_poll(0, 0.0) == 10.0
    at(110)
    behind.next_poll(1, 5.0)  # its first poll at 10 s found the task running
    at(112)
    times.record(MODEL, 8, 6.0)  # the wave's first 8 s video took 6 s
    gap = behind.next_poll(1, 3.0)  # woken
    assert 5.0 - 2.0 <= gap <= (5.5 * (1 + behind.phase * 0.5)) - 2.0


def test_a_wait_woken_by_the_history_aims_at_all_of_it() -> None:
    """The history's tasks are recorded at once and told once: a wait woken by the news
    sees every one of them (it aimed at the first alone, a 120 s outlier, and stopped
    listening: a reviewer saw 47 of 200 async waits do so)."""
    from datetime import UTC
    from types import SimpleNamespace

    class History:
        def history(self, **query: Any) -> Any:
            ms = [120_000] + [60_000] * 49  # one slow outlier, then 49 typical tasks
            items = [
                SimpleNamespace(inference_ms=m, input={"duration": 5}, created_at=None) for m in ms
            ]
            return SimpleNamespace(items=items)

    times = InferenceTimes()
    now = datetime.now(UTC)
    waiting = times.steer(PollPolicy(), MODEL, 5, now, now=lambda: now)
    waiting.next_poll(0, 0.0)
    seen: list[float] = []
    wake = waiting.wake()
    assert wake is not None
    wake.subscribe(lambda: seen.append(waiting.next_poll(0, 0.0)))
    assert times.seed_from_history(History(), MODEL) == 50  # type: ignore[arg-type]
    assert seen == [pytest.approx(60.25)]


def test_the_history_keeps_its_newest_tasks_and_what_a_failed_wider_read_left() -> None:
    """A page newest first (the emulator's order; the service's is not documented) keeps
    the newest `keep` times, not the oldest; and when the week's read fails after a thin
    day, the day's tasks are still learned."""
    from datetime import UTC, timedelta
    from types import SimpleNamespace

    from wan_tasks.errors import TransientServerError

    now = datetime.now(UTC)

    def item(seconds: float, age_s: float) -> Any:
        return SimpleNamespace(
            inference_ms=seconds * 1000,
            input={"duration": 5},
            created_at=now - timedelta(seconds=age_s),
        )

    class Pages:
        def __init__(self, *pages: Any) -> None:
            self.pages = list(pages)

        def history(self, **query: Any) -> Any:
            page = self.pages.pop(0)
            if isinstance(page, Exception):
                raise page
            return SimpleNamespace(items=page)

    newest_first = [item(70.0, age) for age in range(5)] + [item(30.0, 100 + a) for a in range(45)]
    times = InferenceTimes(keep=5)
    assert times.seed_from_history(Pages(newest_first), MODEL) == 50  # type: ignore[arg-type]
    assert times.expected(MODEL, 5) == 70.0  # the five newest, not five of the old 30 s

    thin_day = Pages([item(40.0, 10), item(41.0, 20)], TransientServerError("down"))
    times = InferenceTimes(min_samples=3)
    assert times.seed_from_history(thin_day, MODEL) == 2  # type: ignore[arg-type]
    assert times.aim(MODEL, 5, 5.0, min_samples=1) == 41.0 and times.seeded(MODEL)


def test_polls_after_a_missed_aim_spread_but_never_past_the_longest_interval() -> None:
    """After an aimed poll that found the task running, each delay is stretched by the
    wait's phase (a wave's misses do not come back at once), but never past `max_interval`:
    stretched as well, a slow task was seen up to ~48 s after it ended (a reviewer's run)."""
    import random
    from datetime import UTC, timedelta

    times = InferenceTimes()
    policy = PollPolicy(first_poll_after=10, min_interval=5, max_interval=30, jitter=0.0)
    t0 = datetime(2026, 12, 7, tzinfo=UTC)
    clock = [t0]
    for _ in range(2):  # the wait of interest is the third of the wave: phase 0.236
        times.steer(policy, MODEL, 5, t0)
    late = times.steer(policy, MODEL, 5, t0, now=lambda: clock[0], rng=random.Random(1))
    assert late.phase > 0.2
    times.record(MODEL, 5, 10.0)  # a fast outlier first
    assert late.next_poll(0, 0.0) == pytest.approx(10.25)
    age, gaps = 10.25, []
    for polls in range(1, 9):  # every poll finds it running
        clock[0] = t0 + timedelta(seconds=age)
        gaps.append(late.next_poll(polls, 0.0))
        age += gaps[-1]
    stretch = 1 + late.phase * 0.5
    assert gaps[:3] == pytest.approx([5 * stretch, 7.5 * stretch, 11.25 * stretch])
    assert max(gaps) == pytest.approx(30.0) and gaps[-1] == pytest.approx(30.0)


def test_a_history_that_answers_late_stays_behind_the_runs_own_times() -> None:
    """The history read is in the background; when it answers after the run's own tasks
    ended, its older times were appended after theirs and pushed them out of the `keep`
    kept."""
    from types import SimpleNamespace

    class History:
        def history(self, **query: Any) -> Any:
            old = SimpleNamespace(inference_ms=30_000, input={"duration": 5}, created_at=None)
            return SimpleNamespace(items=[old] * 50)

    times = InferenceTimes(keep=20)
    for _ in range(20):
        times.record(MODEL, 5, 60.0)  # what this run saw today
    assert times.seed_from_history(History(), MODEL) == 50  # type: ignore[arg-type]
    assert times.expected(MODEL, 5) == 60.0


def test_news_that_came_between_a_look_and_a_sleep_wakes_it_at_once() -> None:
    from datetime import UTC

    times = InferenceTimes()
    policy = PollPolicy(first_poll_after=10, min_interval=5)
    waiting = times.steer(policy, MODEL, 8, datetime.now(UTC))
    waiting.next_poll(0, 0.0)
    stale = waiting.wake()
    assert stale is not None
    times.record(MODEL, 8, 30.0)
    told: list[str] = []
    stale.subscribe(lambda: told.append("at once"))
    assert told == ["at once"]


def test_a_first_wave_against_the_service_learns_from_its_first_task_to_end(
    make_stack: Callable[..., Any], monkeypatch: Any
) -> None:
    """Four waits of a fresh account's first wave, on the event loop as a batch runs them,
    on a schedule of 1, 2, 4, 8 s after the submit that each shifts by its own fraction of
    each interval after the first poll. The first to see its 4.5 s task done tells the
    others, which were sleeping towards their next poll: each then polls once more, at the
    aim, and finds its task done."""
    import asyncio

    from tests.conftest import SAMPLE
    from wan_tasks.core.submit import submit_once
    from wan_tasks.integration import tasks
    from wan_tasks.integration.runtime import wavespeed_client

    stack = make_stack(latency_s=4.5)
    learned = InferenceTimes()
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    steers: dict[datetime, Any] = {}  # by the submit time of the wait's task
    woken: dict[datetime, int] = {}  # polls made when the news woke it
    make_steer = learned.steer

    def steer(policy: PollPolicy, model: str, duration: int, submitted_at: datetime) -> Any:
        made = make_steer(policy, model, duration, submitted_at)
        steers[submitted_at] = made
        listen = made.wake

        def wake() -> Any:  # note which waits' sleeps the news woke, and when
            inner = listen()
            if inner is None:
                return None

            class Noted:
                def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
                    def note() -> None:
                        woken[submitted_at] = made._polls
                        callback()

                    return inner.subscribe(note)

            return Noted()

        made.wake = wake
        return made

    monkeypatch.setattr(learned, "steer", steer)
    polls_made: dict[datetime, int] = {}
    waited = tasks._waited

    def spy(submitted: Any, prediction: Any, *, aimed: float | None, polls: int) -> Any:
        polls_made[submitted.submitted_at] = polls
        return waited(submitted, prediction, aimed=aimed, polls=polls)

    monkeypatch.setattr(tasks, "_waited", spy)
    client = wavespeed_client()
    wave = [
        submit_once(client, I2VRequest(image=str(SAMPLE), prompt=f"first wave {i}", seed=i))
        for i in range(4)
    ]
    policy = PollPolicy(
        first_poll_after=1.0, min_interval=1.0, multiplier=2.0, max_interval=1000, jitter=0.0
    )

    async def the_wave() -> list[Any]:
        return await asyncio.gather(
            *(tasks.await_prediction.fn(s, poll=policy, timeout_s=300, notices=False) for s in wave)
        )

    done = asyncio.run(the_wave())
    assert all(p.status.value == "completed" for p in done)
    assert set(steers) == set(polls_made) == {w.submitted_at for w in wave}
    assert len({s.phase for s in steers.values()}) == 4  # four different schedules
    # The first to see its task done on its own schedule told the rest (at most one more
    # could see its own by chance before the news reached it).
    assert len(woken) >= 2
    for at, before in woken.items():
        # One poll after the news, at the aim: done (one more, 1 s later, if a loaded
        # machine made the emulator's task end after its own reported time + 0.25 s).
        assert before + 1 <= polls_made[at] <= before + 2
    assert max(polls_made.values()) <= 4  # none more often than the schedule
    assert stack.stats()["submissions"] == 4
