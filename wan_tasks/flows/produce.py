"""Running videos: submit -> wait inside an in-flight slot, archive outside it.

The in-flight slot (the account's concurrent-task cap) is held from before submit until the
wait ends, so it counts what the service counts. Slots are held by *lanes*: K lanes (K = the
limit's size) each hold a slot and, holding it, submit and wait for video after video from a
shared queue (giving it back for a new turn every `release_after_s`); finished videos go to a
separate archive pool. Taking a Prefect slot per video instead costs several API writes per
video, serialised in the process and sleeping the server's Retry-After while the service sits
idle (BENCHMARKS.md: +18% makespan vs +7%).

Lanes are coroutines on one event loop per run, not threads: a waiting video is a sleeping
coroutine in the async `await_prediction` task (the loop's timer heap aims every poll, over one
connection pool), so one process holds thousands in flight (Gold: 3,000; Ultra: 10,000).
Submits and archives, which block on S3 and on the lock manager, run in small thread pools.
Above MAX_LEASES lanes, lanes share leases: a group of g lanes takes g slots in one
acquisition and gives them back together, so a 3,000-slot account holds 64 leases, not 3,000.

The per-video steps are plain functions, not tasks: tasks nested in a task share its
transaction, so a failed or crashed parent would roll back the submit's cache record and a
re-run would pay again. Run from the flow, each task commits its record when it succeeds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, AbstractContextManager, nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from prefect import get_run_logger, tags
from prefect.context import AsyncClientContext, SyncClientContext
from prefect.runtime import flow_run

from wan_tasks.api.models import I2VRequest, Prediction
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import derive_seed
from wan_tasks.core.submit import SubmittedVideo
from wan_tasks.errors import (
    BudgetExceededError,
    MissingLimitError,
    NoSlotError,
    OutputExpiredError,
    RunCancelledError,
    TaskFailedError,
)
from wan_tasks.flows.cancel import CancelWatch
from wan_tasks.flows.models import VideoJob, VideoOutcome, archived_outcome
from wan_tasks.flows.options import RunOptions
from wan_tasks.flows.progress import Progress
from wan_tasks.integration.limits import (
    SLOT_REQUESTS,
    LimitSettings,
    RequestWindow,
    hold_slots,
    read_limit,
)
from wan_tasks.integration.runtime import close_async_clients, open_ledger, wavespeed_client
from wan_tasks.integration.tasks import (
    archive_to_s3,
    await_prediction,
    learn_inference_times,
    submit_i2v,
)
from wan_tasks.storage.archive import ArchiveTarget

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Lanes when no in-flight limit is set, and at most (Ultra's cap: a lane is a coroutine).
DEFAULT_LANES = 32
MAX_LANES = 10_000
# Threads for the blocking steps: submits (ledger writes, lock files, the POST) and archives.
MAX_SUBMITTERS = 16
MAX_ARCHIVERS = 16
# Slot leases a run holds at most; above this many lanes, lanes share leases.
MAX_LEASES = 64


def in_flight_slot(limits: LimitSettings, occupy: int = 1) -> AbstractAsyncContextManager[Any]:
    """`occupy` slots of the in-flight limit, as one lease (renewed while held)."""
    if not limits.in_flight:
        return nullcontext()
    # Strict: a missing limit fails loudly instead of throttling nothing. A failed lease
    # renewal does not abort the lanes: their videos are paid for, and the slots are
    # re-counted by the server when the lease expires.
    return hold_slots(limits.in_flight, occupy, timeout_s=limits.acquire_timeout_s)


def slot_groups(lanes: int) -> list[int]:
    """How many lanes share each lease: one each up to MAX_LEASES lanes, then groups of
    ceil(lanes / MAX_LEASES), the last one the remainder."""
    per = -(-lanes // MAX_LEASES)
    sizes = [per] * (lanes // per)
    return [*sizes, lanes % per] if lanes % per else sizes


@dataclass
class _Video:
    """One job's progress through its attempts (each attempt is a separate, paid task)."""

    job: VideoJob
    request: I2VRequest
    attempt: int = 0
    new_submissions: int = 0


class Producer:
    """Makes and archives the videos of one flow run."""

    def __init__(
        self, target: ArchiveTarget, options: RunOptions, budget: Budget, batch: str | None = None
    ) -> None:
        self.target, self.options, self.budget = target, options, budget
        self.batch = batch
        self.ledger = target.at(options.ledger_prefix) if options.ledger else None
        self.this_run = str(flow_run.id) if flow_run.id else None
        self.progress = Progress(0)  # progress: replaced per run()
        self.cancel = CancelWatch(None, self._on_cancel)
        # Submitted and not yet finished, by prediction id: what a cancellation acts on.
        self._in_flight: dict[str, SubmittedVideo] = {}
        self._lock = threading.Lock()
        # What this run paid for tasks the service then failed (refunded by the service later).
        self.refund_expected = Decimal("0")
        # Set while run() runs: the lanes' loop and the pools of the blocking steps.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._submitters = self._archivers = ThreadPoolExecutor(1)
        self._notices = True

    @property
    def cancelled(self) -> bool:
        return self.cancel.stopped.is_set()

    def _on_cancel(self) -> None:
        with self._lock:
            in_flight = list(self._in_flight)
        if self.options.on_cancel == "detach":
            logger.warning(
                "cancelled with %d prediction(s) in flight, kept: they are in the ledger and "
                "are archived when done (by this run, or by the next run of the same input)",
                len(in_flight),
            )
            return
        client = wavespeed_client(self.options.credentials_block)
        for prediction_id in in_flight:
            try:
                client.cancel(prediction_id)
                logger.warning("cancelled prediction %s at the service", prediction_id)
            except Exception as exc:
                logger.warning("could not cancel prediction %s: %s", prediction_id, exc)

    # -- one video -------------------------------------------------------------------------

    def tags(self, job: VideoJob) -> AbstractContextManager[Any]:
        """Tags for a video's task runs (`batch:<manifest>`, `item:<id>`) when the options ask
        for them, so a batch's videos can be filtered in the UI by tag; events emitted in them
        carry them too. Prefect checks tag concurrency limits for every tagged task run (an
        acquire and a release: six API writes per video), hence opt-in."""
        if not self.options.tag_task_runs:
            return nullcontext()
        names = [f"batch:{self.batch}"] if self.batch else []
        return tags(*names, f"item:{job.item_id or 'video'}")

    async def make(self, video: _Video) -> tuple[SubmittedVideo, Prediction | None]:
        """Submit (or reconnect) and wait; the caller holds an in-flight slot.

        A task the service failed itself (5000/5003/5004), or one that failed in an earlier
        run (re-running is asking to try again), is resubmitted as the next attempt, up to
        `max_attempts` new submissions. The attempt number is part of the request key, so
        later runs find each attempt."""
        with self.tags(video.job):
            return await self._make(video)

    async def _make(self, video: _Video) -> tuple[SubmittedVideo, Prediction | None]:
        opts = self.options
        while True:
            submitted = await self._blocking(self._submitters, self._submit, video)
            if submitted.archived is not None:
                # The ledger knows where this request's video landed: nothing to wait for
                # (the prediction itself may be gone); the archive step finds it there.
                return submitted, None
            fresh = submitted.flow_run_id == self.this_run
            with self._lock:
                self._in_flight[submitted.prediction_id] = submitted
            if self.cancelled and self.options.on_cancel == "cancel_remote":
                # submitted while the cancellation was being handled
                await asyncio.to_thread(self._on_cancel)
            try:
                prediction = await await_prediction(
                    submitted,
                    timeout_s=opts.wait_timeout_s,
                    poll=opts.poll,
                    credentials_block=opts.credentials_block,
                    notices=self._notices,
                )
            except TaskFailedError as exc:
                video.new_submissions += fresh
                if fresh:
                    # Paid now; the service refunds failed tasks (its guide: within about
                    # 3 h). Counted as spent (the budget too) until then, and reported.
                    with self._lock:
                        self.refund_expected += submitted.cost_usd
                if fresh and not exc.retryable:
                    raise
                self._next_attempt(video, exc)
                continue
            finally:
                with self._lock:
                    self._in_flight.pop(submitted.prediction_id, None)
            video.new_submissions += fresh
            return submitted, prediction

    def _submit(self, video: _Video) -> SubmittedVideo:
        opts = self.options
        submitted = submit_i2v(
            video.request,
            variant=video.job.variant,
            attempt=video.attempt,
            item_id=video.job.item_id,
            credentials_block=opts.credentials_block,
            budget=self.budget,
            rate_limit_name=opts.limits.per_minute,
            ledger=self.ledger,
        )
        if submitted.archived is None and submitted.flow_run_id != self.this_run:
            submitted = self._landed_since(submitted)
        return submitted

    def _landed_since(self, submitted: SubmittedVideo) -> SubmittedVideo:
        """A submit made by an earlier run, with where its video landed if the ledger knows.

        A cached submit returns the result stored when it was made, before its video was
        archived: without this a re-run of a finished batch ran (and Prefect recorded) a
        cached wait per video, inside a slot, on top of the cached submit and archive. The
        ledger is what `submit_once` consults when it reconnects, so both paths now skip the
        wait alike. One S3 GET a video, only for submits of earlier runs."""
        if self.ledger is None:
            return submitted
        try:
            entry = open_ledger(self.ledger).read(submitted.request_key)
        except Exception as exc:
            # Only a shortcut: the wait and the archive step (with its retries) still do
            # the job, so a store that fails this read must not fail the video.
            logger.warning("%s: ledger read failed, waiting as usual: %s", submitted.item_id, exc)
            return submitted
        if entry is None or entry.prediction_id != submitted.prediction_id:
            return submitted  # not this prediction's record: the wait and archive decide
        if entry.archived is None or entry.archived.bucket != self.target.bucket:
            return submitted  # not landed where this run archives: the archive step fetches it
        return submitted.model_copy(update={"archived": entry.archived})

    async def _remake(self, video: _Video) -> tuple[SubmittedVideo, Prediction | None]:
        async with in_flight_slot(self.options.limits):
            return await self.make(video)

    def archive(
        self, video: _Video, submitted: SubmittedVideo, prediction: Prediction | None
    ) -> VideoOutcome:
        """Archive outside the slot (in an archive thread); an output that expired before it
        was archived is made again only when the options allow paying for it twice."""
        while True:
            try:
                with self.tags(video.job):
                    archived = archive_to_s3(
                        submitted,
                        prediction,
                        self.target,
                        credentials_block=self.options.credentials_block,
                        ledger=self.ledger,
                        output_lifetime_s=self.options.output_lifetime_s,
                    )
                return archived_outcome(video.job, submitted, archived)
            except OutputExpiredError as exc:
                if not self.options.allow_resubmit_expired:
                    raise OutputExpiredError(
                        f"{exc.message}. Set allow_resubmit_expired to pay for it again.",
                        prediction_id=exc.prediction_id,
                    ) from None
                self._next_attempt(video, exc)
            assert self._loop is not None
            submitted, prediction = asyncio.run_coroutine_threadsafe(
                self._remake(video), self._loop
            ).result()

    def _next_attempt(self, video: _Video, cause: Exception) -> None:
        # A cancelled run pays for no new attempt (a re-run may).
        if video.new_submissions >= self.options.max_attempts or self.cancelled:
            raise cause
        video.attempt += 1
        get_run_logger().warning(
            "%s: resubmitting as attempt %d (a new, paid task)",
            video.job.item_id or "video",
            video.attempt + 1,
        )

    # -- many videos -----------------------------------------------------------------------

    def run(self, jobs: list[VideoJob]) -> list[VideoOutcome]:
        """Every job, in order; failures become outcomes, never exceptions."""
        if not jobs:
            return []
        try:
            lanes = self.lane_count(len(jobs))
        except MissingLimitError as exc:
            return [failed_outcome(job, exc) for job in jobs]
        if self.options.poll.learn_first_poll:
            # In the background: the history call is not on the way to the first submit.
            learn_inference_times(self.options.credentials_block).add_done_callback(_learned)
        # A batch logs one progress line; a single video its "still running" notices.
        self._notices = len(jobs) == 1
        # progress: a line in the run's log (batches) and the CLI's live display.
        self.progress = Progress(
            len(jobs),
            spend=lambda: self.budget.spent,
            log=get_run_logger() if len(jobs) > 1 else None,
        )
        self.cancel = CancelWatch(self.this_run, self._on_cancel)
        with self.cancel, self.progress:
            try:
                outcomes, lane_errors = _run_loop(self._produce(jobs, lanes))
            except BaseException as exc:  # a termination signal, Ctrl-C: as a cancellation
                self.cancel.trigger(f"the run is ending ({type(exc).__name__})")
                raise
        # Jobs no lane took: the run was cancelled, or every slot acquisition failed.
        cause: BaseException
        if self.cancelled:
            cause = RunCancelledError(
                "not started: the flow run was cancelled; nothing was paid for this video. "
                "Re-run to make it."
            )
        else:
            cause = lane_errors[0] if lane_errors else RuntimeError("no lane ran")
        return [
            outcomes[i] if i in outcomes else failed_outcome(job, cause)
            for i, job in enumerate(jobs)
        ]

    def lane_count(self, jobs: int) -> int:
        name = self.options.limits.in_flight
        size = read_limit(name) if name else DEFAULT_LANES
        return max(1, min(size, jobs, MAX_LANES))

    async def _produce(
        self, jobs: list[VideoJob], lanes: int
    ) -> tuple[dict[int, VideoOutcome], list[BaseException]]:
        self._loop = asyncio.get_running_loop()
        pending: deque[tuple[int, VideoJob]] = deque(enumerate(jobs))
        results: dict[int, asyncio.Future[VideoOutcome]] = {}
        lane_errors: list[BaseException] = []
        # The lanes' slot requests paced: at once, they collided on SQLite (limits.py).
        SLOT_REQUESTS.set(RequestWindow())
        self._submitters = ThreadPoolExecutor(min(lanes, MAX_SUBMITTERS), "wan-submit")
        self._archivers = ThreadPoolExecutor(min(lanes, MAX_ARCHIVERS), "wan-archive")
        finished = False
        try:
            await asyncio.gather(
                *(self._slot_group(g, pending, results, lane_errors) for g in slot_groups(lanes))
            )
            outcomes = {index: await outcome for index, outcome in results.items()}
            finished = True
            return outcomes, lane_errors
        finally:
            # On the way out of a cancelled loop, work already started in the pools is left
            # to finish (a submit records its prediction in the ledger); nothing new starts.
            for pool in (self._submitters, self._archivers):
                pool.shutdown(wait=finished, cancel_futures=not finished)
            if not finished:
                keep_client_open_for([self._submitters, self._archivers])
            await close_async_clients()

    async def _slot_group(
        self,
        size: int,
        pending: deque[tuple[int, VideoJob]],
        results: dict[int, asyncio.Future[VideoOutcome]],
        lane_errors: list[BaseException],
    ) -> None:
        """`size` lanes on one lease: take the slots, run the lanes until their turn ends or
        no video is left, give the slots back; again while videos are left.

        Only taking the slots can end a group: whatever goes wrong with one video (its image
        vanished, its URL is malformed, the service refused it) is that video's outcome, and
        the lane goes on with the next."""
        limits = self.options.limits
        while pending and not self.cancelled:
            lanes = min(size, len(pending))
            slot = in_flight_slot(limits, occupy=lanes)
            try:
                await slot.__aenter__()
            except Exception as exc:  # a timeout, or a limit deleted mid-run
                logger.warning("a lane could not take an in-flight slot: %s", exc)
                lane_errors.append(
                    NoSlotError(
                        f"limits.in_flight: no slot of {limits.in_flight!r} could be taken "
                        f"(acquire_timeout_s={limits.acquire_timeout_s}): {type(exc).__name__}: "
                        f"{exc}. Nothing was submitted for this video; re-run when slots are free."
                    )
                )
                return
            try:
                held_since = time.monotonic()
                await asyncio.gather(
                    *(self._lane(held_since, pending, results) for _ in range(lanes))
                )
            finally:
                try:
                    await slot.__aexit__(None, None, None)
                except Exception as exc:  # the server re-counts the slots when the lease ends
                    logger.warning("giving back in-flight slots failed: %s", exc)

    async def _lane(
        self,
        held_since: float,
        pending: deque[tuple[int, VideoJob]],
        results: dict[int, asyncio.Future[VideoOutcome]],
    ) -> None:
        """Video after video, at least one per turn, until the turn ends or none is left."""
        release_after = self.options.limits.release_after_s
        while pending and not self.cancelled:
            index, job = pending.popleft()
            results[index] = await self._make_one(job)
            if release_after is not None and time.monotonic() - held_since >= release_after:
                return

    async def _make_one(self, job: VideoJob) -> asyncio.Future[VideoOutcome]:
        """One video's submit and wait; never raises (a failure is the video's outcome)."""
        self.progress.started()
        try:
            video = _Video(job, derive_seed(job.request, job.variant))
            submitted, prediction = await self.make(video)
        except Exception as exc:
            self.progress.finished(ok=False)
            done: asyncio.Future[VideoOutcome] = asyncio.get_running_loop().create_future()
            done.set_result(failed_outcome(job, exc))
            return done
        return asyncio.wrap_future(
            self._archivers.submit(
                contextvars.copy_context().run,
                self._archive_or_report,
                video,
                submitted,
                prediction,
            )
        )

    def _archive_or_report(
        self, video: _Video, submitted: SubmittedVideo, prediction: Prediction | None
    ) -> VideoOutcome:
        try:
            outcome = self.archive(video, submitted, prediction)
        except Exception as exc:
            outcome = failed_outcome(video.job, exc)
        self.progress.finished(ok=outcome.status == "archived")
        return outcome

    @staticmethod
    async def _blocking(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        # In the pool, with this coroutine's context (the flow run, the video's tags).
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, contextvars.copy_context().run, fn, *args)


def _run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run the lanes' loop here, or in a thread of its own when this thread runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_with_prefect_client(main))
    with ThreadPoolExecutor(1, "wan-lanes") as pool:
        run = contextvars.copy_context().run
        return pool.submit(run, asyncio.run, _with_prefect_client(main)).result()


async def _with_prefect_client(main: Coroutine[Any, Any, T]) -> T:
    # One Prefect client for the loop: without a client context on this loop, every async
    # task run and every slot release made its own (an SSL context each, ~25% of a batch's
    # CPU: bench/growth.py under py-spy).
    async with AsyncClientContext.get_or_create():
        return await main


def keep_client_open_for(pools: list[ThreadPoolExecutor]) -> None:
    """Steps already running in `pools` outlive an unfinished run (a signal, Ctrl-C): hold
    the run's sync Prefect client open until they end. Their task runs share it, and it
    closes when the flow's context does; closed, their ends could not be recorded and the
    task runs stayed Running."""
    ctx = SyncClientContext.get()
    if ctx is None:
        return
    client = ctx.client
    try:
        client.__enter__()  # reentrant: one more holder, the drain below
    except RuntimeError:  # closed already
        return

    def drain() -> None:
        try:
            for pool in pools:
                pool.shutdown(wait=True)
        finally:
            client.__exit__(None, None, None)

    threading.Thread(target=drain, name="wan-drain", daemon=True).start()


def _learned(reading: Future[int]) -> None:
    if not reading.cancelled() and reading.result():
        logger.info("first polls aimed from %d recent tasks in the history", reading.result())


def failed_outcome(job: VideoJob, exc: BaseException) -> VideoOutcome:
    return VideoOutcome(
        item_id=job.item_id,
        row=job.row,
        status="skipped" if isinstance(exc, BudgetExceededError | RunCancelledError) else "failed",
        prediction_id=getattr(exc, "prediction_id", None),
        error_type=type(exc).__name__,
        error=str(exc),
    )
