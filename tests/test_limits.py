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


class _Server:
    """Answers slot requests after a moment; with `collides`, like SQLite: 503 to a request
    sent while another one was out (it took no slot)."""

    def __init__(self, collides: bool) -> None:
        self.collides = collides
        self.out = self.most = self.refused = 0
        self.order: list[int] = []

    async def post(self, client: Any, body: dict[str, Any]) -> httpx.Response:
        self.out += 1
        self.most = max(self.most, self.out)
        self.order.append(body["slots"])
        clash = self.collides and self.out > 1
        await asyncio.sleep(0.001)  # the server's answer takes a while
        self.out -= 1
        request = httpx.Request("POST", "http://p.test")
        if clash:
            self.refused += 1
            return httpx.Response(503, request=request)
        return httpx.Response(200, json=GRANTED, request=request)


def _lanes(server: _Server, window: limits.RequestWindow | None, n: int = 10) -> int:
    async def instant(_: float) -> None:
        await asyncio.sleep(0)

    async def run() -> list[uuid.UUID]:
        asks = [
            acquire_lease(None, "l", k, post=server.post, window=window, sleep=instant)  # type: ignore[arg-type]
            for k in range(1, n + 1)
        ]
        return await asyncio.gather(*asks)

    return len(asyncio.run(run()))


def test_a_runs_slot_requests_go_out_as_the_server_keeps_up() -> None:
    """Ten lanes asking at once collided on a SQLite server, which answered 503 to all but
    one, again and again (10 lanes: 32 503s, the last lane 3 s late); one at a time, a
    PostgreSQL server's round trips put the last of 10 lanes 1.1 s behind the first (64
    leases: ~6 s). The run's window lets one request out first, grows while the server
    answers, halves on a refusal: against a server that keeps up, the requests of 64 lanes go
    out several at once, in the order asked; against one that collides, fewer 503s than
    lanes, where all at once keeps colliding."""
    keeps_up = _Server(collides=False)
    assert _lanes(keeps_up, limits.RequestWindow(), n=64) == 64
    assert keeps_up.order == list(range(1, 65))  # in the order asked
    assert 8 <= keeps_up.most <= limits.RequestWindow.MOST

    colliding = _Server(collides=True)
    assert _lanes(colliding, limits.RequestWindow()) == 10
    paced = colliding.refused
    assert paced <= 10

    unpaced = _Server(collides=True)
    assert _lanes(unpaced, None) == 10
    assert unpaced.most == 10 and unpaced.refused > 2 * paced


def test_the_window_grows_on_answers_and_is_cut_once_a_burst() -> None:
    """The window's own decisions: 1 at first; +1 per served answer up to MOST; the refusals
    of requests out together cut it once (halved, never below 1), and growing again then
    takes twice as many answers, until STREAK answers in a row halve that again."""

    async def run() -> list[int]:
        window = limits.RequestWindow()

        async def answered(ok: bool) -> None:
            number = await window.enter()
            window.leave()
            window.served(ok, number)

        seen = [window.size]
        for _ in range(6):
            await answered(True)
        seen.append(window.size)
        burst = [await window.enter() for _ in range(7)]  # out together, all refused
        for number in burst:
            window.leave()
            window.served(False, number)
        seen.append(window.size)
        await answered(False)  # sent after the cut: cuts again
        seen.append(window.size)
        # Cut twice: 4 answers a step; after 32 in a row, 2.
        for steps in (3, 1, 4, 24, 2):
            for _ in range(steps):
                await answered(True)
            seen.append(window.size)
        return seen

    assert limits.RequestWindow.STREAK == 32
    assert asyncio.run(run()) == [1, 7, 3, 1, 1, 2, 3, 9, 10]


def test_a_lane_cancelled_while_it_waits_for_the_window_sends_nothing() -> None:
    """A lane waiting for room (its run cancelled) leaves without sending its request, so
    no slot is taken and given back behind it; one whose request failed makes room again."""
    sent: list[int] = []
    answer = asyncio.Event()

    async def post(client: Any, body: dict[str, Any]) -> httpx.Response:
        sent.append(body["slots"])
        if body["slots"] == 3 and sent.count(3) == 1:
            raise httpx.ConnectError("dropped")
        await answer.wait()
        return httpx.Response(200, json=GRANTED, request=httpx.Request("POST", "http://p.test"))

    async def instant(_: float) -> None:
        await asyncio.sleep(0)

    async def run() -> int:
        window = limits.RequestWindow()

        def lane(slots: int) -> Any:
            return acquire_lease(None, "l", slots, post=post, window=window, sleep=instant)  # type: ignore[arg-type]

        first = asyncio.create_task(lane(1))
        queued = asyncio.create_task(lane(2))
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == [1] and window.out == 1
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        answer.set()
        await first
        await lane(3)  # dropped once, asked again
        return window.out

    assert asyncio.run(run()) == 0
    assert sent == [1, 3, 3]


def test_a_lane_queued_for_the_window_keeps_its_acquire_timeout() -> None:
    """`acquire_timeout_s` held only between tries: a lane queued behind a request the
    server does not answer waited for room until that request ended (Prefect's client gives
    up on one after 60 s; the fake here never answers), past its own deadline. Now it gives
    up at its deadline, having sent nothing and taken no room in the window. (A request
    once sent is still not cut short by the deadline.)"""
    sent: list[int] = []
    hang = asyncio.Event()

    async def post(client: Any, body: dict[str, Any]) -> httpx.Response:
        sent.append(body["slots"])
        await hang.wait()  # the server never answers
        raise AssertionError("unreachable")

    async def run() -> tuple[str, int]:
        window = limits.RequestWindow()
        hung = asyncio.create_task(acquire_lease(None, "l", 1, post=post, window=window))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        try:
            await acquire_lease(None, "l", 2, post=post, window=window, timeout_s=0.2)  # type: ignore[arg-type]
            outcome = "got a lease"
        except TimeoutError as exc:
            outcome = str(exc)
        out = window.out  # the hung request's, not the lane's that gave up
        hung.cancel()
        await asyncio.gather(hung, return_exceptions=True)
        return outcome, out

    # (Bounded: before, the lane waited for good.)
    outcome, out = asyncio.run(asyncio.wait_for(run(), 60))
    assert "no 2 slot(s) of 'l' within 0.2 s" in outcome
    assert sent == [1] and out == 1


def test_a_refusal_cuts_the_window_before_it_makes_room_and_full_says_nothing() -> None:
    """Four requests out, a fifth waiting: a 503 cuts the window (4 -> 2) before its request
    makes room, so the fifth is not sent into the refusal; an answer "full" (423) neither
    grows the window nor cuts it (nothing was granted, nothing collided)."""
    sent: list[int] = []
    answers: dict[int, asyncio.Future[int]] = {}

    async def post(client: Any, body: dict[str, Any]) -> httpx.Response:
        slots = body["slots"]
        sent.append(slots)
        answer = answers[slots] = asyncio.get_running_loop().create_future()
        code = await answer
        data = GRANTED if code == 200 else {"detail": "x"}
        return httpx.Response(code, json=data, request=httpx.Request("POST", "http://p.test"))

    async def instant(_: float) -> None:
        await asyncio.sleep(0)

    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    async def run() -> list[int]:
        window = limits.RequestWindow()
        for _ in range(3):  # grown to 4 by served answers
            number = await window.enter()
            window.leave()
            window.served(True, number)
        sizes = [window.size]
        number = await window.enter()
        window.leave()
        window.served(limits._verdict(423), number)
        sizes.append(window.size)
        lanes = [
            asyncio.create_task(
                acquire_lease(None, "l", k, post=post, window=window, sleep=instant)  # type: ignore[arg-type]
            )
            for k in range(1, 6)
        ]
        await settle()
        assert sent == [1, 2, 3, 4]  # the fifth waits for room
        answers.pop(1).set_result(503)
        await settle()
        sizes.append(window.size)
        assert sent == [1, 2, 3, 4] and window.out == 3  # cut first: no room for the fifth
        while answers or len(sent) < 6:
            for slots in list(answers):
                answers.pop(slots).set_result(200)
            await settle()
        await asyncio.gather(*lanes)
        return [*sizes, window.out]

    assert asyncio.run(run()) == [4, 4, 2, 0]


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
