"""Global concurrency limits that keep a batch within the account's caps.

`in_flight` bounds videos from submit to completion (the account's concurrent-task cap): a slot
is held across submit and wait, so it counts what the service counts. `per_minute` is a rate
limit (a limit with slot decay) taken once per submit. Both are strict: a missing limit raises
instead of silently throttling nothing.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger("wan_tasks.limits")

DEFAULT_IN_FLIGHT_LIMIT = "wan-video-in-flight"
DEFAULT_RATE_LIMIT = "wan-video-submits-per-minute"


class LimitSettings(BaseModel):
    """Names of the limits a flow takes slots from. `None` skips that limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_flight: str | None = Field(DEFAULT_IN_FLIGHT_LIMIT, min_length=1)
    per_minute: str | None = Field(DEFAULT_RATE_LIMIT, min_length=1)
    acquire_timeout_s: float | None = Field(
        None, gt=0, description="give up waiting for a slot after this long (None: wait)"
    )


def ensure_limits(
    in_flight: int,
    per_minute: int | None,
    *,
    names: LimitSettings | None = None,
    only_missing: bool = False,
) -> None:
    """Create or update the limits on the Prefect server in use. With `only_missing`, limits
    that exist are left as they are (the embedded default must not undo an operator's
    setting)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if in_flight < 1:
        raise ValueError(f"in_flight must be at least 1, got {in_flight}")
    if per_minute is not None and per_minute < 1:
        raise ValueError(f"per_minute must be at least 1, got {per_minute}")
    names = names or LimitSettings()
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
