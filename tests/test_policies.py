"""Poll and retry arithmetic."""

from __future__ import annotations

import random

from wan_tasks.api.policies import PollPolicy, RetryPolicy, parse_retry_after


def test_poll_schedule_first_at_expected_time_then_at_least_min_interval() -> None:
    policy = PollPolicy(
        first_poll_after=10, min_interval=5, max_interval=30, multiplier=1.5, jitter=0.1
    )
    for seed in range(50):
        delays = policy.delays(random.Random(seed))
        first = delays.next()
        assert 10 <= first <= 11  # never before the task can be done
        rest = [delays.next() for _ in range(8)]
        assert all(d >= 5 for d in rest) and max(rest) <= 33
        assert rest[0] <= 5.5 and rest[-1] >= 27  # grows from min_interval to max_interval


def test_retry_policy_honours_retry_after_with_a_cap() -> None:
    retry = RetryPolicy(backoff=0.5, max_backoff=4, max_retry_after=60)
    rng = random.Random(1)
    assert retry.delay(1, 7.0, rng) == 7.0
    assert retry.delay(1, 600.0, rng) == 60
    assert all(0 <= retry.delay(n, None, rng) <= 4 for n in range(1, 10))
    assert parse_retry_after("3") == 3.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
