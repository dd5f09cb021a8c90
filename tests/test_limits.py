"""Taking in-flight slots (`wan_tasks.integration.limits`): the retry decisions in memory, with
Prefect's own client over an in-memory transport that answers like a busy SQLite server, and
the lease's whole life on the session's real Prefect server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from wan_tasks.errors import MissingLimitError
from wan_tasks.integration import limits
from wan_tasks.integration.limits import acquire_backoff, acquire_lease

LEASE = str(uuid.uuid4())
GRANTED = {"limits": [{"id": str(uuid.uuid4()), "name": "l", "limit": 3}], "lease_id": LEASE}


def _server(answers: list[httpx.Response | Exception]) -> tuple[httpx.MockTransport, list[Any]]:
    """A transport that answers increment-with-lease from `answers` in turn (the last one
    for good), and the requests it saw."""
    seen: list[Any] = []

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/csrf-token"):  # as Prefect's server by default
            return httpx.Response(422, json={"detail": "CSRF protection is disabled."})
        assert request.url.path.endswith("/v2/concurrency_limits/increment-with-lease")
        seen.append(request.read())
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.MockTransport(handle), seen


def _acquire(transport: httpx.MockTransport, sleeps: list[float], **kwargs: Any) -> uuid.UUID:
    from prefect.client.orchestration import PrefectClient

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async def run() -> uuid.UUID:
        client = PrefectClient("http://prefect.test/api", httpx_settings={"transport": transport})
        async with client:
            return await acquire_lease(client, "l", 2, sleep=sleep, **kwargs)

    return asyncio.run(run())


def test_a_busy_database_is_retried_in_milliseconds_not_prefects_seconds() -> None:
    """Two 503s (SQLite's deferred-transaction conflict), then the grant: one request per
    try, the waits 25-100 ms. Through Prefect's client (its retry loop) the first 503 alone
    sleeps 2 s, inside the call."""
    transport, seen = _server(
        [httpx.Response(503), httpx.Response(503), httpx.Response(200, json=GRANTED)]
    )
    sleeps: list[float] = []
    assert _acquire(transport, sleeps) == uuid.UUID(LEASE)
    assert len(seen) == 3
    assert len(sleeps) == 2 and all(0.025 <= s <= 0.1 for s in sleeps), sleeps


@pytest.mark.parametrize("code", [423, 429])  # the limit is full; Prefect Cloud's rate limit
def test_a_full_limit_waits_what_the_server_says_and_a_dropped_connection_is_retried(
    code: int,
) -> None:
    transport, seen = _server(
        [
            httpx.Response(code, headers={"Retry-After": "3"}),
            httpx.ConnectError("reset"),
            httpx.Response(200, json=GRANTED),
        ]
    )
    sleeps: list[float] = []
    assert _acquire(transport, sleeps) == uuid.UUID(LEASE)
    assert len(seen) == 3
    assert sleeps[0] == 3.0 and sleeps[1] <= limits.ACQUIRE_RETRY_FIRST_S


def test_a_missing_limit_names_the_fix() -> None:
    transport, _ = _server([httpx.Response(200, json={"limits": [], "lease_id": LEASE})])
    with pytest.raises(MissingLimitError, match="wan-video limits --in-flight"):
        _acquire(transport, [])


def test_the_timeout_is_decided_before_sleeping_past_it() -> None:
    """A full limit that asks for 5 s against a 1 s timeout: TimeoutError, without the
    5 s sleep."""
    transport, seen = _server([httpx.Response(423, headers={"Retry-After": "5"})])
    sleeps: list[float] = []
    with pytest.raises(TimeoutError, match=r"within 1\.0 s"):
        _acquire(transport, sleeps, timeout_s=1.0)
    assert sleeps == [] and len(seen) == 1


def test_a_server_that_never_recovers_is_the_callers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "ACQUIRE_RETRIES", 4)
    transport, seen = _server([httpx.Response(503)])
    sleeps: list[float] = []
    with pytest.raises(ConnectionError, match="5 tries failed"):
        _acquire(transport, sleeps)
    assert len(seen) == 5 and len(sleeps) == 4


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [(1, 0.0, 0.025), (1, 1.0, 0.05), (2, 1.0, 0.1), (5, 1.0, 0.8), (6, 1.0, 1.0), (50, 0.0, 0.5)],
)
def test_backoff_doubles_to_its_cap_and_is_never_zero(
    attempt: int, rand: float, expected: float
) -> None:
    fixed: Callable[[], float] = lambda: rand  # noqa: E731
    assert acquire_backoff(attempt, fixed) == pytest.approx(expected)


def test_a_failed_renewal_is_tried_again_while_the_lease_still_holds() -> None:
    """Renewals every 75% of the lease; after a failure, again within 10 s, not 225 s later
    (when a 300 s lease has run out)."""
    calls: list[float] = []

    class Client:
        async def renew_concurrency_lease(self, lease_id: uuid.UUID, lease_duration: float) -> None:
            calls.append(lease_duration)
            if len(calls) == 1:
                raise httpx.ConnectError("reset")

    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        if len(sleeps) == 3:
            raise asyncio.CancelledError
        sleeps.append(seconds)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(limits._renew(Client(), uuid.UUID(LEASE), 300.0, sleep))  # type: ignore[arg-type]
    assert sleeps == [225.0, 10.0, 225.0] and calls == [300.0, 300.0, 300.0]


def test_a_holder_cancelled_while_its_request_is_out_gives_back_what_is_granted() -> None:
    """A cancelled run's lane can be cancelled after its slot request left: the server still
    grants the lease, and it is given back (not held until it expires, 300 s)."""
    released: list[uuid.UUID] = []

    class Client:
        async def release_concurrency_slots_with_lease(self, lease_id: uuid.UUID) -> None:
            released.append(lease_id)

    async def run() -> None:
        answer: asyncio.Future[httpx.Response] = asyncio.get_running_loop().create_future()

        async def post(client: Any, body: dict[str, Any]) -> httpx.Response:
            return await answer

        acquiring = asyncio.ensure_future(acquire_lease(Client(), "l", 1, post=post))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        acquiring.cancel()
        with pytest.raises(asyncio.CancelledError):
            await acquiring
        answer.set_result(httpx.Response(200, json=GRANTED))  # the server granted it anyway
        for _ in range(5):
            await asyncio.sleep(0)

    asyncio.run(run())
    assert released == [uuid.UUID(LEASE)]


def test_a_runs_lanes_send_their_slot_requests_one_at_a_time() -> None:
    """Ten lanes asking at once collided on a SQLite server, which answered 503 to all but
    one, again and again (10 lanes: 32 503s, the last lane 3 s late). With the run's lock,
    each lane's request goes when the one before it is answered, in the order asked, and
    every lane still gets its lease; without one (a caller of its own), they go at once."""
    out = 0
    most = 0
    order: list[int] = []

    async def post(client: Any, body: dict[str, Any]) -> httpx.Response:
        nonlocal out, most
        out += 1
        most = max(most, out)
        order.append(body["slots"])
        await asyncio.sleep(0.001)  # the server's answer takes a while
        out -= 1
        return httpx.Response(200, json=GRANTED, request=httpx.Request("POST", "http://p.test"))

    async def run(gate: asyncio.Lock | None) -> list[uuid.UUID]:
        lanes = [acquire_lease(None, "l", n, post=post, gate=gate) for n in range(1, 11)]  # type: ignore[arg-type]
        return await asyncio.gather(*lanes)

    async def in_a_run() -> list[uuid.UUID]:
        return await run(asyncio.Lock())

    assert len(asyncio.run(in_a_run())) == 10
    assert most == 1 and order == list(range(1, 11))
    most = 0
    assert len(asyncio.run(run(None))) == 10
    assert most == 10


def test_a_lease_is_held_then_given_back_on_a_real_server(prefect_server: None) -> None:
    """On the session's Prefect server: the slots are taken while the block runs and
    freed after it, also when the block fails; a missing limit raises MissingLimitError."""
    from prefect.client.orchestration import get_client

    from wan_tasks.integration.limits import ensure_limits, hold_slots

    name = f"limits-test-{uuid.uuid4().hex[:8]}"
    ensure_limits(3, None, names=limits.LimitSettings(in_flight=name))

    def active() -> int:
        with get_client(sync_client=True) as client:
            return int(client.read_global_concurrency_limit_by_name(name).active_slots)

    async def run() -> list[int]:
        seen: list[int] = []
        async with hold_slots(name, 2):
            seen.append(await asyncio.to_thread(active))
        with pytest.raises(RuntimeError):
            async with hold_slots(name, 1):
                seen.append(await asyncio.to_thread(active))
                raise RuntimeError("the block failed")
        seen.append(await asyncio.to_thread(active))
        with pytest.raises(MissingLimitError):
            async with hold_slots(f"{name}-missing"):
                pass
        return seen

    assert asyncio.run(run()) == [2, 1, 0]
