"""Aiming the first poll from observed inference times, and seeding them from history."""

from __future__ import annotations

from collections.abc import Callable
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
        expected = learned.expected(MODEL, 5)
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
