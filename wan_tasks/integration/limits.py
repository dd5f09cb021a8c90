"""Global concurrency limits that keep a batch within the account's caps.

`in_flight` bounds videos from submit to completion (the account's concurrent-task cap): a slot
is held across submit and wait, so it counts what the service counts. `per_minute` is an
opt-in rate limit (a limit with slot decay) taken once per submit: it costs a Prefect write per
video, and the service's own 429 (with Retry-After) is already retried safely, so it is only
worth it for accounts whose per-minute cap binds before the in-flight cap does. Both are
strict: a named limit that does not exist raises instead of silently throttling nothing.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from wan_tasks.errors import MissingLimitError

logger = logging.getLogger(__name__)

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


def read_limit(name: str) -> int:
    """The size of a global concurrency limit, or MissingLimitError naming the fix."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return int(client.read_global_concurrency_limit_by_name(name).limit)
        except ObjectNotFound:
            raise MissingLimitError(
                f"limits.in_flight: the concurrency limit {name!r} does not exist on this "
                f"Prefect server. Create it with `wan-video limits --in-flight N "
                f"--in-flight-name {name}` (N = the account's concurrent-task cap), or set "
                "limits.in_flight to null to run without one."
            ) from None


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
