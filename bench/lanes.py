"""A prototype of the recommended batch structure, measured beside `generate_batch` (it is not
part of the library; see BENCHMARKS.md, "What should change").

`generate_batch` takes one in-flight slot per video: every video pays a Prefect slot
acquisition (an API write, serialised per process, that sleeps the server's Retry-After when
no slot is free) while the service sits idle. Here K "lanes" each take one slot once and
keep it while they submit and wait for video after video from a shared queue; archiving runs
beside them, outside the slots, as in `generate_batch`. The same tasks (submit_i2v,
wait_for_prediction, archive_to_s3), caching, limits and reporting are used.
"""

from __future__ import annotations

import contextvars
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

from prefect import flow
from prefect.concurrency.sync import concurrency

from flows.generate import _report, _run_label, load_manifest, resolve_target
from flows.models import BatchReport, VideoJob, VideoOutcome, archived_outcome
from flows.reporting import publish_artifacts, write_summary
from flows.settings import ArchiveOptions, RunOptions
from wan_tasks.budget import Budget
from wan_tasks.fingerprint import derive_seed
from wan_tasks.storage.archive import ArchiveTarget
from wan_tasks.tasks import archive_to_s3, submit_i2v, wait_for_prediction


def _archive(job: VideoJob, submitted: Any, prediction: Any, target: ArchiveTarget
             ) -> VideoOutcome:
    return archived_outcome(job, submitted, prediction,
                            archive_to_s3(submitted, prediction, target))


def _lane(jobs: queue.Queue[VideoJob], archive_pool: ThreadPoolExecutor,
          results: list[Future[VideoOutcome]], target: ArchiveTarget, options: RunOptions,
          budget: Budget) -> None:
    """Hold one in-flight slot and run submit -> wait for job after job until none is left."""
    if jobs.empty():
        return
    name = options.limits.in_flight
    with concurrency(name, occupy=1, strict=True) if name else nullcontext():
        while True:
            try:
                job = jobs.get_nowait()
            except queue.Empty:
                return
            request = derive_seed(job.request, job.variant)
            submitted = submit_i2v(request, variant=job.variant, item_id=job.item_id,
                                   budget=budget, rate_limit_name=options.limits.per_minute)
            prediction = wait_for_prediction(submitted, timeout_s=options.wait_timeout_s,
                                             poll=options.poll)
            results.append(archive_pool.submit(contextvars.copy_context().run, _archive, job,
                                               submitted, prediction, target))


@flow(name="generate-batch-lanes")
def generate_batch_lanes(manifest: str, lanes: int, archive: ArchiveOptions | None = None,
                         options: RunOptions | None = None) -> BatchReport:
    """Like generate_batch (no resubmission of failed tasks, no budget skips: a prototype)."""
    archive, options = archive or ArchiveOptions(), options or RunOptions()
    target = resolve_target(archive)
    items = [i for i in load_manifest(manifest) if i.request is not None]
    jobs: queue.Queue[VideoJob] = queue.Queue()
    for item in items:
        assert item.request is not None
        jobs.put(VideoJob(request=item.request, item_id=item.item_id, variant=item.variant,
                          row=item.row))
    budget = Budget(options.budget_usd)
    results: list[Future[VideoOutcome]] = []
    lanes = max(1, min(lanes, len(items)))
    with ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="archive") as archive_pool, \
            ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane") as lane_pool:
        running = [lane_pool.submit(contextvars.copy_context().run, _lane, jobs, archive_pool,
                                    results, target, options, budget) for _ in range(lanes)]
        for lane in running:
            lane.result()
    outcomes = sorted((f.result() for f in results), key=lambda o: (o.row or 0, o.item_id))
    report = _report(manifest, outcomes, budget.spent)
    report.summary_uri = write_summary(target, manifest, outcomes, _run_label())
    publish_artifacts(outcomes, title=f"Batch {manifest}")
    return report
