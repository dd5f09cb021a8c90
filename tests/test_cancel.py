"""Cancelling a running batch through the Prefect API never orphans paid work: every prediction
the service made ends up archived (by the cancelled run or its re-run) or cancelled at the
service, and none is paid for twice."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLE, Stack
from tests.test_flows import FAST, write_manifest
from wan_tasks.flows.generate import generate_batch
from wan_tasks.flows.options import RunOptions

VIDEOS = 8


def _until(what: Callable[[], Any], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def _running_batch() -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["generate-batch"])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
            ),
        )
    return str(runs[0].id) if runs else None


def _archived_prediction_ids(stack: Stack) -> set[str]:
    ids = set()
    for page in stack.s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".mp4"):
                head = stack.s3.head_object(Bucket=stack.bucket, Key=obj["Key"])
                ids.add(head["Metadata"].get("prediction-id", ""))
    return ids


def _cancel_mid_batch(stack: Stack, manifest: str, options: RunOptions) -> str:
    """Start the batch, cancel it through the API once two videos are paid for; return the
    flow run's id after the run has ended."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    def run() -> None:
        # A cancelled run raises from its final state; the test reads the state instead.
        with contextlib.suppress(BaseException):
            generate_batch(manifest, options=options, fail_on_item_error=False)

    worker = threading.Thread(target=run)
    worker.start()
    _until(lambda: stack.stats()["submissions"] >= 2)
    run_id = _until(_running_batch)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
    worker.join(timeout=300)
    assert not worker.is_alive(), "the cancelled run did not end"
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None and state.is_cancelled(), state
    return str(run_id)


def _manifest(tmp_path: Path, name: str) -> str:
    rows = [
        {"id": f"{name}{i}", "image": str(SAMPLE), "prompt": f"{name} {i}"} for i in range(VIDEOS)
    ]
    return write_manifest(tmp_path / f"{name}.jsonl", rows)


@pytest.mark.slow
def test_cancel_detaches_and_the_rerun_archives_everything_once(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack(in_flight=2, latency_s=2.0)
    manifest = _manifest(tmp_path, "detach")
    _cancel_mid_batch(stack, manifest, FAST)
    paid = stack.stats()["submissions"]
    assert paid < VIDEOS  # the cancelled run started no new videos
    assert stack.stats()["cancels"] == 0  # detach: nothing was cancelled at the service
    report = generate_batch(manifest, options=FAST)
    assert report.archived == VIDEOS
    assert stack.stats()["submissions"] == VIDEOS  # the re-run paid only for the rest
    made = {p.id for p in _history(stack)}
    assert made <= _archived_prediction_ids(stack)  # none completed and unarchived


@pytest.mark.slow
def test_cancel_remote_cancels_in_flight_predictions_at_the_service(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack(in_flight=2, latency_s=3.0)
    manifest = _manifest(tmp_path, "remote")
    options = FAST.model_copy(update={"on_cancel": "cancel_remote"})
    _cancel_mid_batch(stack, manifest, options)
    assert stack.stats()["cancels"] >= 1
    report = generate_batch(manifest, options=options)
    assert report.archived == VIDEOS
    archived = _archived_prediction_ids(stack)
    for prediction in _history(stack):
        # Every task the service made was either cancelled there or archived.
        assert prediction.id in archived or prediction.status in ("deleted", "cancelled"), (
            prediction.id,
            prediction.status,
        )


def _history(stack: Stack) -> list[Any]:
    from wan_tasks.api.client import WaveSpeedClient

    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        items, page = [], 1
        while True:
            got = client.history(page=page, page_size=100).items
            if not got:
                return items
            items += got
            page += 1


def test_steps_left_running_by_an_ended_run_keep_its_prefect_client(prefect_server: None) -> None:
    """A run ended by a signal leaves its running submits and archives to finish (a submit
    records its prediction in the ledger). Their task runs share the run's Prefect client,
    which closes with the flow's context: the run holds it open for them, so they still
    record their end, and it closes when the last of them has."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect.context import SyncClientContext

    from wan_tasks.flows.produce import keep_client_open_for

    release = threading.Event()
    pool = ThreadPoolExecutor(1)
    with SyncClientContext.get_or_create() as ctx:
        client = ctx.client

        def step() -> int:  # a step still running when the run ends
            release.wait(30)
            return client.hello().status_code

        running = pool.submit(step)
        pool.shutdown(wait=False)
        keep_client_open_for([pool])
    release.set()  # the run's context has ended
    assert running.result(timeout=30) == 200
    assert _until(lambda: client._closed, timeout=30)
