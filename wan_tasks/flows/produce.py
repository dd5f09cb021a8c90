"""Running videos: submit -> wait inside an in-flight slot, archive outside it.

The in-flight slot (the account's concurrent-task cap) is held from before submit until the
wait ends, so it counts what the service counts. Slots are held by *lanes*: K threads (K = the
limit's size) each take one slot and, holding it, submit and wait for video after video from a
shared queue (giving it back for a new turn every `release_after_s`); finished videos go to a
separate archive pool. Taking a Prefect slot per video instead costs several API writes per
video, serialised in the process and sleeping the server's Retry-After while the service sits
idle (BENCHMARKS.md: +18% makespan vs +7%).

The per-video steps are plain functions, not tasks: tasks nested in a task share its
transaction, so a failed or crashed parent would roll back the submit's cache record and a
re-run would pay again. Run from the flow, each task commits its record when it succeeds.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from prefect import get_run_logger, tags
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
from wan_tasks.integration.limits import LimitSettings, read_limit
from wan_tasks.integration.runtime import wavespeed_client
from wan_tasks.integration.tasks import (
    archive_to_s3,
    learn_inference_times,
    submit_i2v,
    wait_for_prediction,
)
from wan_tasks.storage.archive import ArchiveTarget

logger = logging.getLogger(__name__)

# Lanes when no in-flight limit is set, and at most (threads mostly sleep in waits).
DEFAULT_LANES = 32
MAX_LANES = 256
MAX_ARCHIVERS = 16


def in_flight_slot(limits: LimitSettings) -> AbstractContextManager[Any]:
    if not limits.in_flight:
        return nullcontext()
    from prefect.concurrency.sync import concurrency

    # strict: a missing limit fails loudly instead of throttling nothing. A failed lease
    # renewal does not abort the lane: its videos are paid for, and the slot is re-counted
    # by the server when the lease expires.
    return concurrency(
        limits.in_flight,
        occupy=1,
        strict=True,
        timeout_seconds=limits.acquire_timeout_s,
        raise_on_lease_renewal_failure=False,
    )


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
        """Tags for a video's task runs (`batch:<manifest>`, `item:<id>`), so a batch's videos
        can be told apart and filtered in the UI; events emitted in them carry them too."""
        names = [f"batch:{self.batch}"] if self.batch else []
        return tags(*names, f"item:{job.item_id or 'video'}")

    def make(self, video: _Video) -> tuple[SubmittedVideo, Prediction | None]:
        """Submit (or reconnect) and wait; the caller holds an in-flight slot.

        A task the service failed itself (5000/5003/5004), or one that failed in an earlier
        run (re-running is asking to try again), is resubmitted as the next attempt, up to
        `max_attempts` new submissions. The attempt number is part of the request key, so
        later runs find each attempt."""
        with self.tags(video.job):
            return self._make(video)

    def _make(self, video: _Video) -> tuple[SubmittedVideo, Prediction | None]:
        opts = self.options
        while True:
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
            if submitted.archived is not None:
                # The ledger knows where this request's video landed: nothing to wait for
                # (the prediction itself may be gone); the archive step finds it there.
                return submitted, None
            fresh = submitted.flow_run_id == self.this_run
            with self._lock:
                self._in_flight[submitted.prediction_id] = submitted
            if self.cancelled and self.options.on_cancel == "cancel_remote":
                self._on_cancel()  # submitted while the cancellation was being handled
            try:
                prediction = wait_for_prediction(
                    submitted,
                    timeout_s=opts.wait_timeout_s,
                    poll=opts.poll,
                    credentials_block=opts.credentials_block,
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

    def archive(
        self, video: _Video, submitted: SubmittedVideo, prediction: Prediction | None
    ) -> VideoOutcome:
        """Archive outside the slot; an output that expired before it was archived is made
        again only when the options allow paying for it twice."""
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
            with in_flight_slot(self.options.limits):
                submitted, prediction = self.make(video)

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
            learned = learn_inference_times(self.options.credentials_block)
            if learned:
                logger.info("first polls aimed from %d recent tasks in the history", learned)
        pending: queue.Queue[tuple[int, VideoJob]] = queue.Queue()
        for index, job in enumerate(jobs):
            pending.put((index, job))
        results: dict[int, Future[VideoOutcome]] = {}
        lane_errors: list[BaseException] = []
        # progress: a line in the run's log (batches) and the CLI's live display.
        self.progress = Progress(
            len(jobs),
            spend=lambda: self.budget.spent,
            log=get_run_logger() if len(jobs) > 1 else None,
        )
        self.cancel = CancelWatch(self.this_run, self._on_cancel)
        with (
            self.cancel,
            self.progress,
            ThreadPoolExecutor(min(lanes, MAX_ARCHIVERS), "wan-archive") as archivers,
            ThreadPoolExecutor(lanes, "wan-lane") as lane_pool,
        ):
            running = [
                lane_pool.submit(
                    contextvars.copy_context().run,
                    self._lane,
                    pending,
                    archivers,
                    results,
                    lane_errors,
                )
                for _ in range(lanes)
            ]
            try:
                for lane in running:
                    lane.result()
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
            results[i].result() if i in results else failed_outcome(job, cause)
            for i, job in enumerate(jobs)
        ]

    def lane_count(self, jobs: int) -> int:
        name = self.options.limits.in_flight
        size = read_limit(name) if name else DEFAULT_LANES
        return max(1, min(size, jobs, MAX_LANES))

    def _lane(
        self,
        pending: queue.Queue[tuple[int, VideoJob]],
        archivers: ThreadPoolExecutor,
        results: dict[int, Future[VideoOutcome]],
        lane_errors: list[BaseException],
    ) -> None:
        """Hold one in-flight slot and make video after video until none is left, giving the
        slot back for a new turn every `release_after_s` so flows sharing the limit (a one-off
        video beside a long batch) get slots too.

        Only taking the slot can end a lane: whatever goes wrong with one video (its image
        vanished, its URL is malformed, the service refused it) is that video's outcome, and
        the lane goes on with the next."""
        limits = self.options.limits
        release_after = limits.release_after_s
        while not pending.empty():
            slot = in_flight_slot(limits)
            try:
                slot.__enter__()
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
                while True:  # at least one video per turn
                    if self.cancelled:
                        return
                    try:
                        index, job = pending.get_nowait()
                    except queue.Empty:
                        return
                    results[index] = self._make_one(job, archivers)
                    if release_after is not None and time.monotonic() - held_since >= release_after:
                        break
            finally:
                try:
                    slot.__exit__(None, None, None)
                except Exception as exc:  # the server re-counts the slot when its lease ends
                    logger.warning("giving back an in-flight slot failed: %s", exc)

    def _make_one(self, job: VideoJob, archivers: ThreadPoolExecutor) -> Future[VideoOutcome]:
        """One video's submit and wait; never raises (a failure is the video's outcome)."""
        self.progress.started()
        try:
            video = _Video(job, derive_seed(job.request, job.variant))
            submitted, prediction = self.make(video)
        except Exception as exc:
            self.progress.finished(ok=False)
            return _done(failed_outcome(job, exc))
        return archivers.submit(
            contextvars.copy_context().run, self._archive_or_report, video, submitted, prediction
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


def failed_outcome(job: VideoJob, exc: BaseException) -> VideoOutcome:
    return VideoOutcome(
        item_id=job.item_id,
        row=job.row,
        status="skipped" if isinstance(exc, BudgetExceededError | RunCancelledError) else "failed",
        prediction_id=getattr(exc, "prediction_id", None),
        error_type=type(exc).__name__,
        error=str(exc),
    )


def _done(outcome: VideoOutcome) -> Future[VideoOutcome]:
    future: Future[VideoOutcome] = Future()
    future.set_result(outcome)
    return future
