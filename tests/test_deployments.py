"""The deployments as a user runs them: `prefect server start`, `prefect deploy` with
deployments/prefect.yaml, two process workers, runs from run_deployment and from a schedule.

Not the session's test harness: the stack has its own server and PREFECT_HOME under tmp_path,
and every process gets an explicit environment (conftest's PREFECT_HOME is not inherited).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import boto3
import httpx
import pytest

from deployments.stack import LocalStack
from tests.conftest import SAMPLE

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)  # Prefect sets the root logger to WARNING once a flow runs here

IN_FLIGHT = 2
# Fast polling for a 1 s emulated inference (the defaults suit minutes-long real jobs).
FAST = {"poll": {"first_poll_after": 0.8, "min_interval": 0.3, "max_interval": 0.5, "jitter": 0.0}}
TEST_PREFIX = "videos/test"


def test_served_deployments_match_prefect_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve.py builds the same deployments as prefect.yaml (no server needed)."""
    from prefect.events import DeploymentEventTrigger

    from deployments.serve import REPO, load_deployments, read_config

    monkeypatch.chdir(REPO)
    specs = {d["name"]: d for d in read_config()["deployments"]}
    built = {d.name: d for d in load_deployments()}
    assert set(built) == set(specs) == {"daily", "on-demand", "single", "on-archived"}
    for name, spec in specs.items():
        assert built[name].entrypoint == spec["entrypoint"]
        assert built[name].parameters == spec.get("parameters", {})
    (daily,) = built["daily"].schedules or []
    assert daily.slug == "daily-0600" and getattr(daily.schedule, "cron", None) == "0 6 * * *"
    (trigger,) = built["on-archived"].triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    assert trigger.expect == {"wan.video.archived"}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    began = time.monotonic()
    with LocalStack(
        tmp_path / "stack",
        in_flight=IN_FLIGHT,
        emulator=True,
        emulator_latency_s=1.0,
        emulator_concurrency=10,
        ui=False,
        # The scheduler visits deployments every 2 s instead of 60 s.
        server_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"},
        worker_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"},
    ) as started:
        log.info("stack up in %.1fs", time.monotonic() - began)
        yield started


def _rows(tag: str, n: int) -> list[dict[str, Any]]:
    return [
        {"id": f"{tag}-{i}", "image": str(SAMPLE), "prompt": f"deployments test {tag} {i}"}
        for i in range(1, n + 1)
    ]


@contextlib.contextmanager
def _client_of(stack: LocalStack) -> Iterator[SyncPrefectClient]:
    """This process as a client of the stack's server. Prefect keeps one event worker and one
    log worker per process, bound to the API URL they started with; they are drained on the
    way in and out, so nothing from here reaches another server or the other way round."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def drain() -> None:
        EventsWorker.drain_all(timeout=10)
        APILogWorker.drain_all(timeout=10)

    drain()
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: stack.api_url}),
            get_client(sync_client=True) as client,
        ):
            yield client
            drain()  # while the server is still up
    finally:
        drain()


def _wait_until(what: str, check: Callable[[], bool], timeout_s: float, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        stack.check()  # a dead worker or server fails fast, with its log
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(1.0)


@pytest.mark.slow
def test_deployed_flows_on_two_workers_land_every_video_once(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four runs (two handed over by upstream steps, one single video, one fired by the
    yaml's schedule) on two workers: each video paid for and stored once, the in-flight
    limit held across both, and the downstream trigger fired per video."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import FlowRun
    from prefect.client.schemas.schedules import IntervalSchedule
    from prefect.deployments import run_deployment

    from deployments.pipeline import hand_off, request_videos

    began = time.monotonic()
    # Two workers on the batch queue, one flow run at a time each: concurrent runs must
    # spread over both, so the in-flight limit is shared across processes.
    workers = [
        stack.add_worker(f"w{i}", work_queues=["default"], limit=1, wait=False) for i in (1, 2)
    ]
    stack.deploy()
    stack.wait_for_workers(workers)
    log.info("workers and deploy in %.1fs", time.monotonic() - began)

    assert stack.seaweed is not None
    s3 = stack.seaweed.endpoint.boto3_client()
    bucket = stack.bucket
    shared = {"id": "shared", "image": str(SAMPLE), "prompt": "deployments test shared take"}
    manifests = {
        # The yaml's scheduled location: the scheduled run reads what "upstream" left there.
        "manifests/daily.jsonl": _rows("daily", 3),
        # The same shot in two concurrent batches: it must be paid for and stored once.
        "manifests/test-a.jsonl": [*_rows("a", 3), shared],  # written by request_videos
        "manifests/test-b.jsonl": [*_rows("b", 2), shared],
    }
    for key in ("manifests/daily.jsonl", "manifests/test-b.jsonl"):
        body = "".join(json.dumps(r) + "\n" for r in manifests[key])
        s3.put_object(Bucket=bucket, Key=key, Body=body.encode())
    single_prompt = "deployments test single"
    distinct = {r["prompt"] for rows in manifests.values() for r in rows} | {single_prompt}

    # This process plays the upstream steps: the stack's S3 and server. boto3's default
    # session keeps the first credentials it resolved in this process; a fresh one here, and
    # the previous one back afterwards, keeps this stack's and the session's S3 apart.
    for name, value in stack.env().items():
        if not name.startswith("PREFECT_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    with _client_of(stack) as client:
        deployments = client.read_deployments()
        ids = {d.name: d.id for d in deployments}
        assert {(d.name, d.work_queue_name) for d in deployments} == {
            ("daily", "default"),
            ("on-demand", "default"),
            ("single", "default"),
            ("on-archived", "downstream"),
        }
        # Keep schedules other than the one under test from firing during the test.
        for dep_name, dep_id in ids.items():
            for sched in client.read_deployment_schedules(dep_id):
                if dep_name != "daily":
                    client.update_deployment_schedule(dep_id, sched.id, active=False)
        # Upstream steps hand manifests over, as deployments/pipeline.py shows.
        run_b = hand_off(
            f"s3://{bucket}/manifests/test-b.jsonl", prefix=TEST_PREFIX, options=FAST, wait=False
        )
        single = run_deployment(
            "generate-video/single",
            timeout=0,
            parameters={
                "request": {"image": str(SAMPLE), "prompt": single_prompt},
                "archive": {"prefix": TEST_PREFIX},
                "options": FAST,
            },
        )
        assert isinstance(single, FlowRun)
        # The yaml's daily cron, moved to fire soon; the scheduler (every 2 s here) creates
        # the run ahead of time and a worker picks it up when due and free. The margin is for
        # a loaded machine: a due time already past when the scheduler looks is skipped.
        # Same manifest and prefix as the yaml; fast polling for the test.
        (daily_schedule,) = client.read_deployment_schedules(ids["daily"])
        fire_at = datetime.now(UTC) + timedelta(seconds=15)
        client.update_deployment_schedule(
            ids["daily"],
            daily_schedule.id,
            schedule=IntervalSchedule(interval=timedelta(days=1), anchor_date=fire_at),
            parameters={"options": {**FAST, "budget_usd": "25"}},
        )
        # The example upstream flow, run here: writes its manifest, starts the batch and
        # waits for it (while the others run on the other worker).
        run_a = request_videos(
            manifests["manifests/test-a.jsonl"], "test-a", prefix=TEST_PREFIX, options=FAST
        )

        batch_deployments = DeploymentFilter(
            id=DeploymentFilterId(any_=[ids["daily"], ids["on-demand"], ids["single"]])
        )

        def finished() -> list[FlowRun]:
            every = client.read_flow_runs(deployment_filter=batch_deployments)
            return [r for r in every if r.state is not None and r.state.is_final()]

        _wait_until("4 flow runs to finish", lambda: len(finished()) >= 4, 150, stack)
        done = finished()
        assert len(done) == 4, [(r.name, r.state_name) for r in done]
        assert all(r.state is not None and r.state.is_completed() for r in done), [
            (r.name, r.state_name, r.state.message if r.state else "") for r in done
        ]
        scheduled = [r for r in done if r.deployment_id == ids["daily"]]
        assert len(scheduled) == 1 and scheduled[0].auto_scheduled  # created by the scheduler
        assert {UUID(run_a), run_b.id, single.id} <= {r.id for r in done}

        # Both workers ran batch runs.
        for name in workers:
            submitted = stack.workers[name].output().count("submitting flow run")
            assert submitted >= 1, f"worker {name} ran nothing"

        # Every video is in S3 exactly once: one object per distinct request.
        mp4 = [
            o["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])
            if o["Key"].endswith(".mp4")
        ]
        assert len(mp4) == len(set(mp4)) == len(distinct) == 10
        summaries = [
            o["Key"]
            for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
            if "/batches/" in o["Key"]
        ]
        # The scheduled run took manifest and prefix from the yaml's parameters.
        assert sorted(k.split("/batches/")[0] for k in summaries) == [
            "videos/daily",
            TEST_PREFIX,
            TEST_PREFIX,
        ]
        archived: dict[str, set[str]] = {}
        for key in summaries:
            for line in s3.get_object(Bucket=bucket, Key=key)["Body"].read().splitlines():
                row = json.loads(line)
                assert row["status"] == "archived", row
                archived.setdefault(row["item_id"], set()).add(row["s3_uri"])
        # Every batch item, each at one object ("shared", in both batches, at the same one).
        assert len(archived) == 9 and all(len(uris) == 1 for uris in archived.values())
        item_keys = {uri.removeprefix(f"s3://{bucket}/") for (uri,) in archived.values()}
        assert item_keys <= set(mp4) and len(item_keys) == 9

        # Paid once per distinct video, and never more than the limit at the service at once,
        # across both workers.
        assert stack.emulator_url is not None
        stats = httpx.get(f"{stack.emulator_url}/_emulator/stats", timeout=5).json()
        assert stats["submissions"] == len(distinct)
        # Never above the limit; whether two tasks overlapped at all is the machine's race
        # (on a loaded machine one worker's videos can run one at a time).
        assert 1 <= stats["max_in_flight"] <= IN_FLIGHT
        assert client.read_global_concurrency_limit_by_name("wan-video-in-flight").active_slots == 0

        # Downstream: the wan.video.archived trigger started a catalog run per video (queued
        # on the `downstream` queue, which these workers do not poll).
        uris = {f"s3://{bucket}/{k}" for k in mp4}
        catalog = DeploymentFilter(id=DeploymentFilterId(any_=[ids["on-archived"]]))

        def catalogued() -> set[str]:
            return {
                r.parameters.get("s3_uri", "")
                for r in client.read_flow_runs(deployment_filter=catalog)
            }

        _wait_until("a catalog run per video", lambda: catalogued() >= uris, 30, stack)
        assert catalogued() == uris
    log.info("test body in %.1fs", time.monotonic() - began)
