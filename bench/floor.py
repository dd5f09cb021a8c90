"""Prefect's own floor for a video: three task runs that do nothing, run as a batch runs them.

`floor_batch` gives each video what `generate_batch` gives it from Prefect, and nothing else:
a sync submit task cached on its own key under SERIALIZABLE isolation with the same lock
manager, an async wait task (a sleep for the emulated inference, on one event loop, in one
Prefect client context), a sync archive task, each with persisted results, retries and a retry
condition; lanes as coroutines, submits and archives in thread pools of 16. No service, no S3,
no ledger, no slots. What it costs (this process and the Prefect server) is what three Prefect
task runs a video cost here: the part of a batch's cost that keeping the three steps as
Prefect tasks implies, against which the rest of `generate_batch`'s cost is wan-tasks' own.

Used by `bench.growth` (the "Prefect floor" row); not part of the package.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from prefect import Task, flow, task
from prefect.cache_policies import CacheKeyFnPolicy
from prefect.client.schemas.objects import State, TaskRun
from prefect.context import AsyncClientContext, TaskRunContext

from wan_tasks.integration.tasks import serializable

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
POOL = 16  # MAX_SUBMITTERS and MAX_ARCHIVERS of the flows' Producer


def _key(step: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        return f"floor-{step}-{params['batch']}-{params['i']}"

    return key


def _retry(task: Task[..., Any], run: TaskRun, state: State[Any]) -> bool:
    return False  # evaluated only on failure, as the flows' conditions are


def _step(step: str, *, serializable_key: bool = False) -> Callable[[F], F]:
    """The flows' task settings for one step: its own cache key (under SERIALIZABLE isolation
    with the flows' lock manager for the submit), persisted result, retries, a condition."""
    policy = CacheKeyFnPolicy(cache_key_fn=_key(step))
    # Typed as the function it wraps: a Task is called like it (the flows' tasks are too).
    return cast(
        Callable[[F], F],
        task(
            name=f"floor-{step}",
            cache_policy=serializable(policy) if serializable_key else policy,
            persist_result=True,
            retries=3,
            retry_condition_fn=_retry,
        ),
    )


@_step("submit", serializable_key=True)
def floor_submit(batch: str, i: int) -> dict[str, Any]:
    return {"id": f"{batch}-{i}", "i": i}


@_step("wait")
async def floor_wait(batch: str, i: int, latency_s: float) -> dict[str, Any]:
    await asyncio.sleep(latency_s)
    return {"id": f"{batch}-{i}", "status": "completed"}


@_step("archive")
def floor_archive(batch: str, i: int) -> dict[str, Any]:
    return {"id": f"{batch}-{i}", "archived": True}


@flow(name="prefect-floor")
def floor_batch(batch: str, videos: int, lanes: int, latency_s: float) -> int:
    """`videos` items through submit, wait and archive on `lanes` lanes; returns how many
    were archived."""
    return asyncio.run(_lanes(batch, videos, lanes, latency_s))


async def _lanes(batch: str, videos: int, lanes: int, latency_s: float) -> int:
    pending = list(range(videos))[::-1]
    archived: list[asyncio.Future[dict[str, Any]]] = []
    loop = asyncio.get_running_loop()

    def blocking(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> Any:
        return loop.run_in_executor(pool, contextvars.copy_context().run, fn, *args)

    async with AsyncClientContext.get_or_create():
        with (
            ThreadPoolExecutor(POOL, "floor-submit") as submitters,
            ThreadPoolExecutor(POOL, "floor-archive") as archivers,
        ):

            async def lane() -> None:
                while pending:
                    i = pending.pop()
                    await blocking(submitters, floor_submit, batch, i)
                    await floor_wait(batch, i, latency_s)
                    archived.append(blocking(archivers, floor_archive, batch, i))

            await asyncio.gather(*(lane() for _ in range(lanes)))
            done = await asyncio.gather(*archived)
    return sum(1 for d in done if d["archived"])
