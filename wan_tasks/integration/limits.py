"""Global concurrency limits that keep a batch within the account's caps.

`in_flight` bounds videos from submit to completion (the account's concurrent-task cap): a slot
is held across submit and wait, so it counts what the service counts. `per_minute` is an
opt-in rate limit (a limit with slot decay) taken once per submit: it costs a Prefect write per
video, and the service's own 429 (with Retry-After) is already retried safely, so it is only
worth it for accounts whose per-minute cap binds before the in-flight cap does. Both are
strict: a named limit that does not exist raises instead of silently throttling nothing.

`hold_slots` takes in-flight slots as one lease, renews it while held and gives it back. It is
Prefect's `concurrency()` minus the client's sleep on a 503: Prefect's client answers a 503 by
sleeping 2**attempt s (2, 4, 8 ...; once even at PREFECT_CLIENT_MAX_RETRIES=0). On a SQLite
server (the default one) `increment-with-lease` answers 503 whenever another write commits
between its read and its write (Prefect 3.9.1 runs it in a deferred transaction, so it fails
at once instead of waiting), and every 503 a batch saw was that call: lanes started 2-6 s
late. A 503 there took no slot (the transaction rolled back), so it is retried here after
50 ms, doubling to 1 s (`acquire_backoff`). What it leaves out of `concurrency()`: the
acquired/released events (UI decoration, an event write each).

A run's slot requests are paced (`SLOT_REQUESTS`, a `RequestWindow` the run sets;
`wan_tasks.flows.produce` does). A batch's K lanes asking at once collided with each other on
SQLite, which answered 503 to all but one of them, again and again (10 lanes: 32 503s, the
last lane starting 3 s late). One at a time cost a round trip per lease instead: on
PostgreSQL, with the first submits starting beside them, ~0.1 s each, so a 10-lane batch's
last lane started 1.1 s after its first (and the whole batch ended that much later), a
64-lease Gold run's ~6 s. The window lets one request out at first, one more after each
answer the server could serve and half as many after one it could not (a 503, a dropped
connection), as TCP paces a path it knows nothing about: a server that keeps up gets the
requests 1, 2, 4, 8 ... at once (at most `RequestWindow.MOST`); SQLite, colliding, one at a
time, probed for more less and less often. Only the single POST is paced (its retries wait
outside the window); renewals and give-backs are not (they are not what SQLite refuses, and
Prefect's client retries them with sleeps of seconds).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from wan_tasks.errors import MissingLimitError

if TYPE_CHECKING:
    import httpx
    from prefect.client.orchestration import PrefectClient

logger = logging.getLogger(__name__)

# A lease the server reclaims this long after its holder stopped renewing it (a crash).
LEASE_S = 300.0
# Renewed when this share of it has passed (Prefect renews at 75% too).
RENEW_AT = 0.75
RENEW_RETRY_S = 10.0
# Retrying a 503 (or a dropped connection): first after this long, doubling up to the cap,
# at most this many times in a row before the error is the caller's.
ACQUIRE_RETRY_FIRST_S = 0.05
ACQUIRE_RETRY_MAX_S = 1.0
ACQUIRE_RETRIES = 60
# What Prefect's client retries too (408, 502, 503; 504 from proxies); 423 (the limit is
# full) and 429 (Prefect Cloud's rate limit) wait the server's Retry-After.
_RETRYABLE = frozenset({408, 502, 503, 504})
_WAIT_AS_TOLD = frozenset({423, 429})
_INCREMENT = "/v2/concurrency_limits/increment-with-lease"

DEFAULT_IN_FLIGHT_LIMIT = "wan-video-in-flight"
DEFAULT_RATE_LIMIT = "wan-video-submits-per-minute"


class LimitSettings(BaseModel):
    """Names of the limits a flow takes slots from. `None` skips that limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_flight: str | None = Field(DEFAULT_IN_FLIGHT_LIMIT, min_length=1)
    per_minute: str | None = Field(
        None,
        min_length=1,
        description=f"a rate limit taken per submit (opt-in; e.g. {DEFAULT_RATE_LIMIT!r}, "
        "created with `wan-video limits --per-minute N`)",
    )
    acquire_timeout_s: float | None = Field(
        None, gt=0, description="give up waiting for a slot after this long (None: wait)"
    )
    release_after_s: float | None = Field(
        60.0,
        ge=0,
        description="a flow run keeps a slot for video after video; after holding it this "
        "long it gives it back (between videos) and queues again, so other flows sharing the "
        "limit get turns. None: keep it until the run has no more videos; 0: one per video",
    )


def ensure_limits(
    in_flight: int,
    per_minute: int | None,
    *,
    names: LimitSettings | None = None,
    only_missing: bool = False,
) -> None:
    """Create or update the limits on the Prefect server in use: the in-flight limit, and the
    rate limit when `per_minute` is given (named `names.per_minute`, else the default name).
    With `only_missing`, limits that exist are left as they are (the embedded default must
    not undo an operator's setting)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    if per_minute is not None and per_minute < 1:
        raise ValueError(f"per_minute must be at least 1, got {per_minute}")
    names = names or LimitSettings()
    if per_minute is not None and not names.per_minute:
        names = names.model_copy(update={"per_minute": DEFAULT_RATE_LIMIT})
    with get_client(sync_client=True) as client:
        if only_missing:
            for name in (names.in_flight, names.per_minute):
                if name:
                    try:
                        client.read_global_concurrency_limit_by_name(name)
                    except ObjectNotFound:
                        continue
                    if name == names.in_flight:
                        names = names.model_copy(update={"in_flight": None})
                    else:
                        names = names.model_copy(update={"per_minute": None})
        if names.in_flight:
            client.upsert_global_concurrency_limit_by_name(names.in_flight, in_flight)
            logger.info("limit %s: %d videos in flight", names.in_flight, in_flight)
        if names.per_minute and per_minute is not None:
            # A slot decays after 60/per_minute s: at most `per_minute` submits a minute, and
            # bursts up to the limit size.
            client.upsert_global_concurrency_limit_by_name(
                names.per_minute, per_minute, slot_decay_per_second=per_minute / 60.0
            )
            logger.info("limit %s: %d submits per minute", names.per_minute, per_minute)


def missing_limit(name: str) -> MissingLimitError:
    """The error for an in-flight limit the Prefect server does not have, naming the fix."""
    return MissingLimitError(
        f"limits.in_flight: the concurrency limit {name!r} does not exist on this Prefect "
        f"server. Create it with `wan-video limits --in-flight N --in-flight-name {name}` "
        "(N = the account's concurrent-task cap), or set limits.in_flight to null to run "
        "without one."
    )


def read_limit(name: str) -> int:
    """The size of a global concurrency limit, or MissingLimitError naming the fix."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            raise missing_limit(name) from None


def reset_in_flight(names: LimitSettings | None = None) -> None:
    """Free every slot of the in-flight limit (after a crash on a server without lease
    reclamation, such as the temporary one)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    names = names or LimitSettings()
    if not names.in_flight:
        return
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            names.in_flight, GlobalConcurrencyLimitUpdate(active_slots=0)
        )


def acquire_backoff(attempt: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...) of a slot request the server
    could not serve: ACQUIRE_RETRY_FIRST_S doubling to ACQUIRE_RETRY_MAX_S, jittered into
    its upper half so that lanes that collided do not collide again, and never zero."""
    ceiling = min(ACQUIRE_RETRY_MAX_S, ACQUIRE_RETRY_FIRST_S * 2.0 ** max(attempt - 1, 0))
    return ceiling * (0.5 + 0.5 * rand())


class RequestWindow:
    """How many of a run's slot requests may be out at once: 1 at first, one more after each
    answer the server could serve (up to MOST), half as many after one it could not, once a
    burst (the refusals of requests sent before that cut count for nothing more). After a
    cut, growing again takes twice as many served answers as before, and STREAK answers in a
    row without a refusal halve that again: a server that refuses company (SQLite) is probed
    less and less often, one that had a blip gets back to full pace. Waiters go in the
    order they came; one cancelled while waiting takes nothing."""

    MOST = 16
    MOST_PATIENCE = 64
    STREAK = 32

    def __init__(self, most: int = MOST) -> None:
        self.size = 1
        self.most = most
        self.out = 0
        self._waiting: deque[asyncio.Future[int]] = deque()
        self._sent = 0  # requests let out so far; each one's number stamps its answer
        self._cut_at = 0  # requests let out when the window was last cut
        # Served answers needed to grow by one, those counted towards it, and those since
        # the last cut or easing.
        self._patience = 1
        self._credit = 0
        self._streak = 0

    async def enter(self) -> int:
        """Wait for room; the request's number (for `served`). Cancelled while waiting, it
        takes nothing; once let in, its holder must `leave()`."""
        if self.out < self.size and not self._waiting:
            return self._let_out()
        ticket: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting.append(ticket)
        try:
            return await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():  # let in as it was cancelled
                self.leave()
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            raise

    def leave(self) -> None:
        self.out -= 1
        self._let_in()

    def served(self, ok: bool | None, number: int) -> None:
        """Request `number` was answered: `ok`, the server served it (a grant); False, it
        refused (a 5xx, a dropped connection, a rate limit); None, neither ("full")."""
        if ok:
            self._credit += 1
            self._streak += 1
            if self._credit >= self._patience:
                self.size, self._credit = min(self.most, self.size + 1), 0
            if self._streak >= self.STREAK:
                self._patience, self._streak = max(1, self._patience // 2), 0
        elif ok is False and number > self._cut_at:  # a burst's first refusal cuts; not "full"
            self.size, self._credit, self._cut_at = max(1, self.size // 2), 0, self._sent
            self._patience = min(self.MOST_PATIENCE, 2 * self._patience)
            self._streak = 0
        self._let_in()

    def _let_out(self) -> int:
        self.out += 1
        self._sent += 1
        return self._sent

    def _let_in(self) -> None:
        while self._waiting and self.out < self.size:
            ticket = self._waiting.popleft()
            if ticket.done():  # cancelled: its waiter is on its way out
                continue
            ticket.set_result(self._let_out())


# The window a run's slot requests go through (None: no pacing). A ContextVar set by the
# run's loop, so the window lives and dies with the run.
SLOT_REQUESTS: ContextVar[RequestWindow | None] = ContextVar("wan_slot_requests", default=None)


async def _paced(
    post: Callable[[PrefectClient, dict[str, Any]], Awaitable[httpx.Response]],
    client: PrefectClient,
    body: dict[str, Any],
    window: RequestWindow,
    number: int,
) -> httpx.Response:
    """Request `number`, let in by `window`: its answer tells the window how the server is
    doing (told before the request makes room: a refusal cuts the window first). The room
    is made by the caller, when this task ends, however (also cancelled before it ran)."""
    try:
        response = await post(client, body)
    except Exception:
        window.served(False, number)
        raise
    window.served(_verdict(response.status_code), number)
    return response


def _leaving(window: RequestWindow) -> Callable[[object], None]:
    return lambda _: window.leave()


def _verdict(code: int) -> bool | None:
    """What an answer says of the server's load: True served (a grant), False refused (a
    5xx, a rate limit), None neither ("full": nothing was granted, nothing collided)."""
    if code == 423:
        return None
    return not (code >= 500 or code in _RETRYABLE or code == 429)


async def _post_once(client: PrefectClient, body: dict[str, Any]) -> httpx.Response:
    """One POST of a slot request through the client's connection, auth, CSRF token and
    attribution headers, but not its retry loop (which sleeps seconds per 503). Private
    parts of Prefect's client (pinned <3.10); tests/test_limits.py drives this through it."""
    import httpx

    http = client._client  # a PrefectHttpxAsyncClient: its send() is the retry loop
    request = http.build_request("POST", _INCREMENT, json=body)
    prefect_http = cast(Any, http)
    prefect_http._add_attribution_headers(request)
    if getattr(prefect_http, "enable_csrf_support", False):
        await prefect_http._add_csrf_headers(request)
    response = await httpx.AsyncClient.send(http, request)
    if response.status_code == 403 and "Invalid CSRF token" in response.text:
        prefect_http.csrf_token = None  # fetched again on the next try
    return response


async def acquire_lease(
    client: PrefectClient,
    name: str,
    occupy: int,
    *,
    timeout_s: float | None = None,
    lease_s: float = LEASE_S,
    post: Callable[[PrefectClient, dict[str, Any]], Awaitable[httpx.Response]] = _post_once,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    window: RequestWindow | None = None,
) -> UUID:
    """The lease id of `occupy` slots of limit `name`. Waits for the Retry-After given while
    the limit is full (423) or the API rate-limits (429); retries what the server could not
    serve (a 5xx, a dropped connection: no slot taken) after `acquire_backoff`. TimeoutError
    after `timeout_s`; MissingLimitError if the limit does not exist. With `window`, each POST
    waits for room in it (the retries' waits are outside it)."""
    import httpx

    body = {"names": [name], "slots": occupy, "mode": "concurrency", "lease_duration": lease_s}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failures = 0
    while True:
        # Waiting for room in the window can be cancelled (nothing was sent); the request,
        # once out, is shielded: a holder cancelled while it is out (a cancelled run) must not
        # lose a lease the server grants anyway, or its slots stay taken until it expires.
        if window is None:
            sent = asyncio.ensure_future(post(client, body))
        else:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                # The deadline holds while queued for room too (a server that hangs on the
                # requests already out would hold the lane there).
                async with asyncio.timeout(remaining):
                    number = await window.enter()
            except TimeoutError:
                raise TimeoutError(
                    f"timed out: no {occupy} slot(s) of {name!r} within {timeout_s} s "
                    "(queued behind the run's slot requests already out)"
                ) from None
            sent = asyncio.ensure_future(_paced(post, client, body, window, number))
            # Room is made when the request's task ends, however: also cancelled before it
            # ran (its own code would not have run to make it).
            sent.add_done_callback(_leaving(window))
        try:
            response = await asyncio.shield(sent)
        except asyncio.CancelledError:
            sent.add_done_callback(lambda done: _give_back_if_granted(client, done))
            raise
        except httpx.TransportError as exc:
            failure: str | None = f"{type(exc).__name__}: {exc}"
        else:
            code = response.status_code
            stale_csrf = code == 403 and "Invalid CSRF token" in response.text
            failure = f"HTTP {code}" if code in _RETRYABLE or stale_csrf else None
        if failure is not None:
            failures += 1
            if failures > ACQUIRE_RETRIES:
                raise ConnectionError(f"slots of {name!r}: {failures} tries failed ({failure})")
            wait = acquire_backoff(failures)
        elif response.status_code in _WAIT_AS_TOLD:  # full, or rate-limited: asked to wait
            failures = 0
            wait = _retry_after(response.headers.get("Retry-After"))
        else:
            response.raise_for_status()
            data = response.json()
            if not data.get("limits"):
                raise missing_limit(name)
            return UUID(data["lease_id"])
        if deadline is not None and time.monotonic() + wait > deadline:
            raise TimeoutError(f"timed out: no {occupy} slot(s) of {name!r} within {timeout_s} s")
        await sleep(wait)


# Give-backs of leases granted to cancelled holders, kept until done (the loop only holds
# weak references to tasks).
_giving_back: set[asyncio.Task[Any]] = set()


def _give_back_if_granted(client: PrefectClient, sent: asyncio.Future[httpx.Response]) -> None:
    if sent.cancelled() or sent.exception() is not None or sent.result().status_code != 200:
        return
    data = sent.result().json()
    if not data.get("limits"):
        return
    lease_id = UUID(data["lease_id"])
    task = asyncio.ensure_future(_release(client, lease_id))
    _giving_back.add(task)
    task.add_done_callback(_giving_back.discard)


async def _release(client: PrefectClient, lease_id: UUID) -> None:
    try:
        await client.release_concurrency_slots_with_lease(lease_id)
    except Exception as exc:  # the server re-counts the slots when the lease ends
        logger.warning("giving back in-flight lease %s failed: %s", lease_id, exc)


def _retry_after(header: str | None) -> float:
    """Seconds from a Retry-After of seconds (what Prefect sends); 1 s if absent or a date."""
    try:
        return max(float(header), 0.0) if header else 1.0
    except ValueError:
        return 1.0


async def _renew(
    client: PrefectClient,
    lease_id: UUID,
    lease_s: float,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Renew every RENEW_AT of the lease; after a failure, again within seconds (the lease
    is still good for a quarter of its length), not a whole period later, when it has run
    out."""
    delay = lease_s * RENEW_AT
    while True:
        await sleep(delay)
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=lease_s)
            delay = lease_s * RENEW_AT
        except Exception as exc:  # the slots stay held until the lease runs out
            logger.warning("renewing in-flight lease %s failed: %s", lease_id, exc)
            delay = min(RENEW_RETRY_S, lease_s * (1 - RENEW_AT) / 4)


@asynccontextmanager
async def hold_slots(
    name: str, occupy: int = 1, *, timeout_s: float | None = None, lease_s: float = LEASE_S
) -> AsyncIterator[UUID]:
    """`occupy` slots of global concurrency limit `name` as one lease, renewed while the
    block runs and given back when it ends (on errors and cancellation too)."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        lease_id = await acquire_lease(
            client, name, occupy, timeout_s=timeout_s, lease_s=lease_s, window=SLOT_REQUESTS.get()
        )
        renewal = asyncio.create_task(_renew(client, lease_id, lease_s))
        try:
            yield lease_id
        finally:
            renewal.cancel()
            # Shielded: a cancelled holder still gives its slots back (else they stay taken
            # until the lease runs out).
            await asyncio.shield(_release(client, lease_id))
