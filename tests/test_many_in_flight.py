"""Many predictions in flight in one process: waits are coroutines, not threads.

What must hold at Gold and Ultra scale (thousands in flight per worker), asserted on what the
code did rather than on time: the waits share a handful of threads, each prediction is polled
about once (the first poll aimed at the learned inference time), the in-flight limit holds
with lanes sharing slot leases, and the retry conditions see failures from the async wait.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect import flow
from prefect.states import Failed

from tests.conftest import SAMPLE, Stack
from wan_tasks import I2VRequest, PollPolicy
from wan_tasks.api.models import MODEL_ID
from wan_tasks.core.inference_times import InferenceTimes
from wan_tasks.core.submit import submit_once
from wan_tasks.errors import TaskFailedError
from wan_tasks.flows import produce
from wan_tasks.flows.generate import generate_batch
from wan_tasks.flows.options import RunOptions
from wan_tasks.integration import tasks
from wan_tasks.integration.limits import LimitSettings
from wan_tasks.integration.runtime import wavespeed_client

POLL = PollPolicy(first_poll_after=0.2, min_interval=0.5, max_interval=1.0, jitter=0.0)
# The service's own minimum interval between polls of one video.
SERVICE_POLL = PollPolicy(min_interval=5.0, max_interval=5.0, jitter=0.0)


def test_retry_conditions_see_failures_inside_an_event_loop() -> None:
    """The async wait's engine asks its retry condition inside a running loop, where
    Prefect's `State.result()` hands back a coroutine: every failure looked like no error,
    so a transient one was never retried."""
    state = Failed(data=httpx.ConnectError("connection refused"))
    final = Failed(data=TaskFailedError("the service failed it", task_code=1403))

    async def ask() -> tuple[bool, bool]:
        return (
            tasks.retry_wait(None, None, state),  # type: ignore[arg-type]
            tasks.retry_wait(None, None, final),  # type: ignore[arg-type]
        )

    assert asyncio.run(ask()) == (True, False)
    assert tasks.retry_wait(None, None, state) is True  # type: ignore[arg-type]


def test_one_process_waits_on_a_thousand_predictions_with_a_few_threads(
    make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 predictions in flight at once, each awaited by its own `await_prediction` task run
    in one flow: the process's thread count stays far below one per wait, every wait ends
    with the completed prediction, and each prediction is polled about once."""
    videos = 1000
    # Inference long enough that all 1,000 are still running when the last is submitted; the
    # first polls are then aimed at each one's expected end, spread like the submits were.
    stack = make_stack(latency_s=40.0, concurrency=videos, render_once=True)
    client = wavespeed_client()
    image = client.upload(SAMPLE)
    with ThreadPoolExecutor(8) as pool:  # set-up: the emulator's submit checks each image
        submitted = list(
            pool.map(
                # One input for all: the emulator renders it once (render_once), so the
                # test's CPU goes to the waits, not to 1,000 renders nobody downloads.
                lambda i: submit_once(
                    client, I2VRequest(image=image, prompt="many in flight", seed=7)
                ),
                range(videos),
            )
        )
    learned = InferenceTimes()
    for _ in range(5):  # as if this process had seen the model take 40 s
        learned.record(MODEL_ID, 5, 40.0)
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    threads: list[int] = []

    @flow
    async def wait_for_all() -> list[str]:  # (1,000 predictions are too big a parameter)
        done = asyncio.Event()

        async def count_threads() -> None:
            while not done.is_set():
                # The emulator runs in this process too: its threads (one per connection,
                # its input checks and renders) are the service's, not the waits'.
                threads.append(
                    sum(
                        1
                        for t in threading.enumerate()
                        if "process_request_thread" not in t.name
                        and not t.name.startswith("emulator-")
                    )
                )
                await asyncio.sleep(0.2)

        counter = asyncio.ensure_future(count_threads())
        try:
            got = await asyncio.gather(
                *(tasks.await_prediction(s, poll=SERVICE_POLL, notices=False) for s in submitted)
            )
        finally:
            done.set()
            await counter
        return [p.status.value for p in got]

    statuses = asyncio.run(wait_for_all())
    assert statuses == ["completed"] * videos
    # One thread per wait would be >= 1,000; the loop, Prefect's services and the test's
    # submit pool are a few dozen.
    assert threads and max(threads) < 60, max(threads)
    polls = stack.stats()["polls_by_prediction"]
    assert sorted(polls) == sorted(s.prediction_id for s in submitted)
    # Each polled about once: the first poll is aimed at the learned 40 s after its submit, a
    # miss costs one more poll 5 s later. (A tail polled ~23 times each was the emulator's:
    # its input checks queued behind 1,000 renders; test_emulator_service covers that.)
    counts = sorted(polls.values())
    assert sum(counts) <= 1.5 * videos and counts[-1] <= 3, counts[-20:]


def test_lanes_share_slot_leases_and_keep_the_limit(
    make_stack: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above MAX_LEASES lanes, lanes take their slots in groups (one lease per group): the
    groups' slots add up to the limit, the service never has more in flight than the limit,
    and every video is archived once."""
    from tests.test_assets import task_runs_of
    from tests.test_flows import write_manifest

    stack = make_stack(in_flight=24, latency_s=1.0, concurrency=50, render_once=True)
    monkeypatch.setattr(produce, "MAX_LEASES", 4)
    leases: list[int] = []
    real = produce.in_flight_slot

    def counting(limits: LimitSettings, occupy: int = 1) -> Any:
        leases.append(occupy)
        return real(limits, occupy)

    monkeypatch.setattr(produce, "in_flight_slot", counting)
    rows = [{"id": f"g{i}", "image": str(SAMPLE), "prompt": f"lease groups {i}"} for i in range(36)]
    options = RunOptions(poll=POLL, limits=LimitSettings(release_after_s=None))
    state = generate_batch(
        write_manifest(tmp_path / "groups.jsonl", rows), options=options, return_state=True
    )
    report = state.result()
    assert report.archived == 36
    stats = stack.stats()
    assert stats["submissions"] == 36 and stats["max_in_flight"] <= 24
    # 24 lanes in 4 groups of 6, each taking its slots once (no turns: release_after_s None).
    assert leases == [6, 6, 6, 6]
    # Untagged by default (tag_task_runs): Prefect skips its tag-limit check, two API writes
    # per task run.
    # (The server records task runs from events; two suites beside each other on two cores
    # kept it 15 short of 108 for the 120 s the helper waits by default.)
    runs = task_runs_of(state.state_details.flow_run_id, expect=3 * 36, timeout_s=300)
    assert len(runs) == 3 * 36 and not any(r.tags for r in runs)


def test_a_batch_makes_its_prefect_clients_once_not_per_task_run(
    make_stack: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lanes' loop has one Prefect client: an async task run (or a slot release) on a
    loop without a client context makes its own, an SSL context each (a quarter of a batch's
    CPU under py-spy)."""
    from prefect.client.orchestration import PrefectClient

    from tests.test_flows import write_manifest

    make_stack(in_flight=4, latency_s=0.3, concurrency=10, render_once=True)
    made = [0]
    real_init = PrefectClient.__init__

    def counting(self: PrefectClient, *args: Any, **kwargs: Any) -> None:
        made[0] += 1
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(PrefectClient, "__init__", counting)
    rows = [{"id": f"c{i}", "image": str(SAMPLE), "prompt": f"clients {i}"} for i in range(12)]
    report = generate_batch(
        write_manifest(tmp_path / "clients.jsonl", rows), options=RunOptions(poll=POLL)
    )
    assert report.archived == 12
    # 12 waits and 4 lanes' slot releases; a handful for the flow run, its services and the
    # loop, however many videos.
    assert made[0] <= 6, made[0]


def test_slot_groups() -> None:
    assert produce.slot_groups(1) == [1]
    assert produce.slot_groups(64) == [1] * 64
    groups = produce.slot_groups(3000)
    assert sum(groups) == 3000 and len(groups) <= produce.MAX_LEASES
    # Groups of ceil(3000 / 64) = 47 lanes, the last one the remainder (never empty).
    assert groups == [47] * 63 + [39]


def test_the_async_client_sends_at_most_a_pools_worth_of_calls_at_once() -> None:
    """Thousands of waits polling at once queue in the client, not inside httpcore's pool
    (whose queue handling is quadratic: 3,000 queued polls kept a core busy)."""
    from wan_tasks.api.client import _LIMITS, AsyncWaveSpeedClient

    now = [0, 0]  # in the transport now, most at once

    async def answer(request: httpx.Request) -> httpx.Response:
        now[0] += 1
        now[1] = max(now)
        await asyncio.sleep(0.01)
        now[0] -= 1
        pid = request.url.path.split("/")[-2]
        data = {"id": pid, "status": "processing", "outputs": [], "model": MODEL_ID}
        return httpx.Response(200, json={"code": 200, "message": "success", "data": data})

    async def poll_many() -> None:
        client = AsyncWaveSpeedClient(
            "test-key-0123456789abcdef",
            "http://service.test",
            transport=httpx.MockTransport(answer),
        )
        async with client:
            await asyncio.gather(*(client.get_prediction(f"p{i}") for i in range(500)))

    asyncio.run(poll_many())
    assert 1 < now[1] <= (_LIMITS.max_connections or 100), now[1]
