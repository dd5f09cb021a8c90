"""What a batch shows in Prefect: task runs named by what they work on and tagged with the
batch and item, and each archived video as a Prefect asset materialisation (read back through
the API after a real flow run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.assets import Asset

from tests.conftest import SAMPLE, Stack
from wan_tasks.api.policies import PollPolicy
from wan_tasks.flows.options import RunOptions
from wan_tasks.integration.tasks import ARCHIVED_EVENT, ASSET_MATERIALIZED_EVENT, asset_key

FAST = RunOptions(
    poll=PollPolicy(first_poll_after=0.3, min_interval=0.2, max_interval=0.5, jitter=0.0)
)


def test_asset_key_is_the_uri_when_prefect_accepts_it() -> None:
    uri = "s3://videos/wan/2026-01-01/p-1-seed-7.mp4"
    assert asset_key(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "s3://videos/my clips/a.mp4",
        "s3://videos/50%25/a.mp4",
        "s3://videos/a[1]/b?c#d.mp4",
        "s3://videos/" + "x" * 600 + ".mp4",
    ],
)
def test_asset_key_of_an_odd_uri_is_one_prefect_accepts(uri: str) -> None:
    key = asset_key(uri)
    Asset(key=key)  # Prefect's own validation: raises for a key it refuses
    assert key.startswith("s3://videos/")
    assert asset_key(uri + "2") != key  # distinct objects keep distinct keys


def flush_events() -> None:
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)


def read_events(name: str, resource_id: str, expect: int) -> list[Any]:
    """The events of `name` about `resource_id`; the server stores events asynchronously, so
    ask again (a bounded number of times) until `expect` are there."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    flush_events()
    query = EventFilter(
        event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[resource_id])
    )
    events: list[Any] = []
    with get_client(sync_client=True) as client:
        for _ in range(60):
            events = client.read_events(filter=query, limit=50).events
            if len(events) >= expect:
                break
            time.sleep(0.5)
    return events


def task_runs_of(flow_run_id: Any, expect: int = 0, timeout_s: float = 120.0) -> list[Any]:
    """The flow run's task runs as the server has recorded them; with `expect`, once it has
    recorded that many (it records them from events, which fall behind on a loaded
    machine: 89 of 108 right after a batch, in one CI run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            if len(runs) >= expect or time.monotonic() > deadline:
                return runs
            time.sleep(0.5)


def test_batch_task_runs_are_named_and_tagged_and_videos_are_assets(
    stack: Stack, tmp_path: Path
) -> None:
    from wan_tasks.flows.generate import generate_batch

    rows = [
        {"id": f"asset-{i}", "image": str(SAMPLE), "prompt": f"test asset {i}", "seed": 40 + i}
        for i in range(2)
    ]
    manifest = tmp_path / "assets-batch.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

    tagged = FAST.model_copy(update={"tag_task_runs": True})
    state = generate_batch(str(manifest), options=tagged, return_state=True)
    report = state.result()
    assert report.archived == 2, report
    flow_run_id = state.state_details.flow_run_id

    # Task runs: named by their item / prediction, tagged with the batch and the item.
    runs = {r.name: r for r in task_runs_of(flow_run_id, expect=2 * 3)}
    for outcome in report.outcomes:
        item = outcome.item_id
        expected = {f"submit-i2v[{item}]", f"wait[{outcome.prediction_id}]", f"archive[{item}]"}
        assert expected <= set(runs), sorted(runs)
        for name in expected:
            assert {"batch:assets-batch.jsonl", f"item:{item}"} <= set(runs[name].tags), (
                name,
                runs[name].tags,
            )

    # Assets: one materialisation per archived object, with what made it, related to the run.
    for outcome, row in zip(report.outcomes, rows, strict=True):
        assert outcome.s3_uri
        (event,) = read_events(ASSET_MATERIALIZED_EVENT, asset_key(outcome.s3_uri), expect=1)
        assert event.payload["prompt"] == row["prompt"]
        assert event.payload["seed"] == row["seed"]
        assert event.payload["sha256"] == outcome.sha256
        assert event.payload["cost_usd"] == str(outcome.cost_usd)
        related = {(r.id, r.role) for r in event.related}
        assert (f"prefect.flow-run.{flow_run_id}", "flow-run") in related
        assert (f"prefect.tag.item:{outcome.item_id}", "tag") in related
        assert ("prefect.tag.batch:assets-batch.jsonl", "tag") in related
        # The package's own event is still there for existing automations.
        assert read_events(ARCHIVED_EVENT, outcome.s3_uri, expect=1)

    # A re-run archives nothing new, so it materialises nothing (as a cached task would not).
    again = generate_batch(str(manifest), options=FAST)
    assert again.archived == 2 and again.new_spend_usd == 0
    # Events sent after the re-run's are stored once this one is readable.
    from prefect.events import emit_event

    sentinel = f"test.sentinel.{flow_run_id}"
    emit_event(event="test.sentinel", resource={"prefect.resource.id": sentinel})
    assert read_events("test.sentinel", sentinel, expect=1)
    for outcome in report.outcomes:
        assert outcome.s3_uri
        assert len(read_events(ASSET_MATERIALIZED_EVENT, asset_key(outcome.s3_uri), 0)) == 1
