"""Fan-out of a batch over the work pool (wan_tasks.flows.fanout).

In memory: the split into shards, the digest a child checks, the budget shares, the decision
to fan out, and the aggregation of the children's reports. Against the real stack: a
process work pool with two `prefect worker start` processes on the session's Prefect server,
an emulator and the session's SeaweedFS; a batch run from a deployment is split into shards
that run as child flow runs, and a re-run after a shard failed re-runs only that shard.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

import pytest

from tests.conftest import FAST_POLL, SAMPLE, TEST_BUCKET
from wan_tasks.api.models import I2VRequest
from wan_tasks.errors import ConfigurationError, ManifestError
from wan_tasks.flows.fanout import (
    ShardReport,
    ShardRun,
    ShardSpec,
    aggregate,
    landed_report,
    shard_budget,
    shard_digest,
    shard_jobs,
    should_fan_out,
    split,
    write_shard_report,
)
from wan_tasks.flows.models import VideoJob, VideoOutcome
from wan_tasks.storage.archive import ArchiveTarget

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun

    from wan_tasks.emulator import Emulator

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

REPO = Path(__file__).resolve().parents[1]
CONTEXT = json.dumps({"service": "test-service", "key_template": "t"})

# Its module-scoped servers are started once, on one test process.
pytestmark = pytest.mark.xdist_group("fanout")


def _jobs(n: int, tag: str = "u") -> list[VideoJob]:
    return [
        VideoJob(
            request=I2VRequest(image=str(SAMPLE), prompt=f"fan-out {tag} {i}"),
            item_id=f"{tag}-{i}",
            row=i + 1,
        )
        for i in range(n)
    ]


# -- in memory ------------------------------------------------------------------------------


def test_split_is_contiguous_even_and_covers_every_video() -> None:
    jobs = _jobs(7)
    shards = split(jobs, 3, CONTEXT)
    assert [(s.start, s.stop) for s in shards] == [(0, 3), (3, 5), (5, 7)]
    assert [s.index for s in shards] == [0, 1, 2] and {s.count for s in shards} == {3}
    assert len({s.digest for s in shards}) == 3
    # At most shard_size each, as even as possible (21 at 10: 7, 7, 7).
    sizes = [s.stop - s.start for s in split(_jobs(21), 10, CONTEXT)]
    assert sizes == [7, 7, 7]  # not 10, 10 and 1
    assert [(s.start, s.stop) for s in split(jobs, 10, CONTEXT)] == [(0, 7)]
    assert split([], 10, CONTEXT) == []


def test_a_shards_digest_follows_its_content() -> None:
    jobs = _jobs(4)
    same = shard_digest(jobs, CONTEXT)
    assert shard_digest(_jobs(4), CONTEXT) == same  # stable across processes and parses
    edited = [*jobs[:3], jobs[3].model_copy(update={"variant": "take-2"})]
    assert shard_digest(edited, CONTEXT) != same
    other_service = json.dumps({"service": "real", "key_template": "t"})
    assert shard_digest(jobs, other_service) != same  # a dry run never stands in for a paid one


def test_a_child_refuses_a_shard_the_manifest_no_longer_matches() -> None:
    jobs = _jobs(6)
    first, second = split(jobs, 3, CONTEXT)
    assert [j.item_id for j in shard_jobs(jobs, second, CONTEXT)] == ["u-3", "u-4", "u-5"]
    edited = [*jobs[:4], jobs[4].model_copy(update={"variant": "x"}), jobs[5]]
    with pytest.raises(ManifestError, match=r"shard 2/2: the manifest's valid rows 4-6"):
        shard_jobs(edited, second, CONTEXT)
    with pytest.raises(ManifestError, match="shard 2/2"):
        shard_jobs(jobs[:5], second, CONTEXT)  # rows removed
    assert shard_jobs(edited, first, CONTEXT) == jobs[:3]  # the other shard is unaffected


def test_shard_spec_rules_name_the_field() -> None:
    with pytest.raises(ValueError, match="stop"):
        ShardSpec(index=0, count=1, start=3, stop=3, digest="a" * 64)
    with pytest.raises(ValueError, match="index"):
        ShardSpec(index=1, count=1, start=0, stop=3, digest="a" * 64)


def test_budget_shares_never_add_up_to_more_than_the_budget() -> None:
    shares = [shard_budget(Decimal("1.00"), n, 7) for n in (3, 2, 2)]
    assert shares == [Decimal("0.42"), Decimal("0.28"), Decimal("0.28")]
    assert sum(s for s in shares if s is not None) <= Decimal("1.00")
    assert shard_budget(None, 3, 7) is None


def test_fan_out_decision() -> None:
    base: dict[str, Any] = {
        "shard_size": 500,
        "deployment": "dep-id",
        "embedded": False,
        "own_deployment_limited": False,
    }
    assert should_fan_out("auto", videos=501, **base)
    assert not should_fan_out("auto", videos=500, **base)  # small batches: one process
    assert should_fan_out(True, videos=3, **base)
    assert not should_fan_out(False, videos=10_000, **base)
    assert not should_fan_out("auto", videos=10_000, **{**base, "deployment": None})
    assert not should_fan_out("auto", videos=10_000, **{**base, "embedded": True})
    assert not should_fan_out("auto", videos=10_000, **{**base, "own_deployment_limited": True})
    with pytest.raises(ConfigurationError, match=r"fan_out.enabled: .*not from a deployment"):
        should_fan_out(True, videos=3, **{**base, "deployment": None})
    with pytest.raises(ConfigurationError, match=r"fan_out.enabled: .*embedded"):
        should_fan_out(True, videos=3, **{**base, "embedded": True})
    with pytest.raises(ConfigurationError, match=r"fan_out.enabled: .*concurrency limit"):
        should_fan_out(True, videos=3, **{**base, "own_deployment_limited": True})


def _archived(job: VideoJob, cost: str = "0.30") -> VideoOutcome:
    return VideoOutcome(
        item_id=job.item_id,
        status="archived",
        row=None,
        cost_usd=Decimal(cost),
        s3_uri=f"s3://b/{job.item_id}.mp4",
    )


def test_aggregate_takes_each_childs_report_and_says_which_shard_left_none() -> None:
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Crashed

    jobs = _jobs(6)
    shards = split(jobs, 2, CONTEXT)
    runs = [ShardRun(s, jobs[s.start : s.stop]) for s in shards]
    # Shard 1 landed in an earlier run (its report reused: already archived, nothing spent).
    runs[0].reused = True
    runs[0].report = ShardReport(
        shard=shards[0],
        flow_run_id="old",
        outcomes=[_archived(j) for j in runs[0].jobs],
        new_spend_usd=Decimal("0.60"),
    )
    # Shard 2 ran now: one archived, one failed.
    runs[1].flow_run = FlowRun(flow_id=UUID(int=1), name="b-shard-2-of-3")
    runs[1].report = ShardReport(
        shard=shards[1],
        flow_run_id=str(runs[1].flow_run.id),
        outcomes=[
            _archived(runs[1].jobs[0]),
            VideoOutcome(item_id=runs[1].jobs[1].item_id, status="failed", error="boom"),
        ],
        new_spend_usd=Decimal("0.60"),
        refund_expected_usd=Decimal("0.30"),
        rate_limit_wait_s=1.5,
    )
    # Shard 3's child crashed before it wrote a report.
    runs[2].flow_run = FlowRun(
        flow_id=UUID(int=1), name="b-shard-3-of-3", state=Crashed(message="killed")
    )
    produced = aggregate(runs)
    by_id = {o.item_id: o for o in produced.outcomes}
    assert len(produced.outcomes) == 6 and set(by_id) == {j.item_id for j in jobs}
    assert [by_id[j.item_id].status for j in jobs] == [
        "archived",
        "archived",
        "archived",
        "failed",
        "failed",
        "failed",
    ]
    assert all(by_id[j.item_id].already_archived for j in runs[0].jobs)
    assert not by_id["u-2"].already_archived
    assert all(o.row == j.row for j, o in ((j, by_id[j.item_id]) for j in jobs))
    lost = by_id["u-5"]
    assert lost.error_type == "RunIncompleteError"
    assert "shard 3/3 (flow run b-shard-3-of-3) ended Crashed: killed" in (lost.error or "")
    # Spend only from this run's children.
    assert produced.spent == Decimal("0.60")
    assert produced.refund_expected == Decimal("0.30")
    assert produced.rate_limit_wait_s == 1.5
    assert produced.shard_runs == [str(runs[1].flow_run.id), str(runs[2].flow_run.id)]


def test_landed_report_is_found_among_a_shards_earlier_reports(s3_store: Any) -> None:
    """Reports in the (real) archive bucket: a re-run takes a shard as landed only from a
    report in which all its videos landed, never from an incomplete one or another shard's."""
    from wan_tasks import settings

    jobs = _jobs(4, tag=f"landed-{time.time_ns()}")
    first, second = split(jobs, 2, CONTEXT)
    target = ArchiveTarget(bucket=TEST_BUCKET, prefix="videos/fanout-unit")
    ids = [j.item_id for j in jobs[:2]]
    with settings.override(**_s3_settings(s3_store)):
        assert landed_report(target, "m.jsonl", first, ids) is None
        incomplete = ShardReport(
            shard=first,
            flow_run_id="run-1",
            outcomes=[_archived(jobs[0]), VideoOutcome(item_id=ids[1], status="failed")],
        )
        uri = write_shard_report(target, "m.jsonl", incomplete)
        assert uri.endswith(f"/batches/m/shards/{first.digest}/run-1.json")
        assert landed_report(target, "m.jsonl", first, ids) is None
        # Another shard's complete report does not count for this one.
        write_shard_report(
            target,
            "m.jsonl",
            ShardReport(
                shard=second, flow_run_id="run-1", outcomes=[_archived(j) for j in jobs[2:]]
            ),
        )
        assert landed_report(target, "m.jsonl", first, ids) is None
        done = ShardReport(
            shard=first, flow_run_id="run-2", outcomes=[_archived(j) for j in jobs[:2]]
        )
        write_shard_report(target, "m.jsonl", done)
        found = landed_report(target, "m.jsonl", first, ids)
        assert found is not None and found.flow_run_id == "run-2"
        assert landed_report(target, "other.jsonl", first, ids) is None


def _s3_settings(s3_store: Any) -> dict[str, Any]:
    from wan_tasks.settings import S3Connection

    return {
        "bucket": TEST_BUCKET,
        "s3": S3Connection(
            endpoint_url=s3_store.endpoint_url,
            access_key_id=s3_store.access_key_id,
            secret_access_key=s3_store.secret_access_key,
            region=s3_store.region,
        ),
    }


# -- on a work pool -------------------------------------------------------------------------

POOL = "wan-fanout-test"
DEPLOYMENT = "generate-batch/fanout-test"
# A deployment on a pool without workers: runs sent there wait, Scheduled.
PARKED_POOL = "wan-fanout-parked"
PARKED = "generate-batch/fanout-parked"
IN_FLIGHT = 3
FAST = {
    "poll": FAST_POLL.model_dump(mode="json"),
    # The default 60 s turn would keep a lane's slot for the whole (short) shard anyway.
    "limits": {"release_after_s": None},
}


@dataclass
class Pool:
    emulator: Emulator
    workers: list[Any]  # ManagedProcess
    s3: Any

    def check(self) -> None:
        for worker in self.workers:
            if not worker.alive():
                raise worker.failure("exited")


@pytest.fixture(scope="module")
def pool(
    prefect_server: None, s3_store: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    """The session's Prefect server, a process work pool with a deployment of generate-batch,
    two workers (their flow runs share a PREFECT_HOME, as on one machine), an emulator."""
    from prefect.settings import PREFECT_API_URL

    from deployments.pool import deploy_generate_batch
    from wan_tasks.devstack.prefect_server import clean_env, executable
    from wan_tasks.devstack.processes import ManagedProcess
    from wan_tasks.emulator import Emulator, EmulatorConfig
    from wan_tasks.integration.limits import ensure_limits

    root = tmp_path_factory.mktemp("fanout")
    emulator = Emulator(
        EmulatorConfig(api_key="fanout-key-0123456789abcdef", latency_s=0.5, concurrency=10)
    ).start()
    workers: list[ManagedProcess] = []
    try:
        ensure_limits(IN_FLIGHT, None)
        deploy_generate_batch(POOL, "fanout-test", REPO)
        deploy_generate_batch(PARKED_POOL, "fanout-parked", REPO)
        env = {
            **clean_env(),
            "PREFECT_API_URL": PREFECT_API_URL.value(),
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            **s3_store.env(),
            "WAN_TASKS_BUCKET": TEST_BUCKET,
            "WAN_TASKS_HOME": str(root / "wan-home"),
            "WAN_TASKS_NO_EMBEDDED": "1",
            "WAVESPEED_API_KEY": emulator.api_key,
            "WAVESPEED_BASE_URL": emulator.base_url,
        }
        for i in (1, 2):
            cmd = [executable("prefect"), "worker", "start", "--pool", POOL, "--name", f"fan-{i}"]
            workers.append(
                ManagedProcess(
                    f"worker fan-{i}",
                    [*cmd, "--type", "process"],
                    log=root / f"w{i}.log",
                    env=env,
                    cwd=REPO,
                )
            )
        pool = Pool(emulator, workers, s3_store.boto3_client())
        _wait_for_workers(pool, 2)
        yield pool
    finally:
        for worker in workers:
            worker.stop()
        emulator.stop()


def _wait_for_workers(pool: Pool, n: int, timeout_s: float = 120) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            online = [w for w in client.read_workers_for_work_pool(POOL) if w.status == "ONLINE"]
            if len(online) >= n:
                return
            pool.check()
            assert time.monotonic() < deadline, "the workers did not come online"
            time.sleep(0.5)


def _manifest(path: Path, tag: str, n: int) -> Path:
    rows = [
        {"id": f"{tag}-{i}", "image": str(SAMPLE), "prompt": f"fan-out {tag} {i}"} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_batch(
    pool: Pool, client: SyncPrefectClient, params: dict[str, Any], timeout_s: float = 180
) -> FlowRun:
    from prefect.deployments import run_deployment

    began = time.monotonic()
    run = run_deployment(DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
    assert not isinstance(run, type(None))
    while True:
        run = client.read_flow_run(run.id)
        if run.state is not None and run.state.is_final():
            log.info(
                "batch %s ended %s in %.1fs", run.name, run.state.name, time.monotonic() - began
            )
            return run
        pool.check()
        assert time.monotonic() - began < timeout_s, f"batch still {run.state_name}"
        time.sleep(0.5)


def _children(client: SyncPrefectClient, parent: FlowRun) -> list[FlowRun]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
        )
    )
    return sorted(runs, key=lambda r: r.parameters["shard"]["index"])


def _summaries(pool: Pool, prefix: str) -> list[list[dict[str, Any]]]:
    listed = pool.s3.list_objects_v2(Bucket=TEST_BUCKET, Prefix=f"{prefix}/batches/")
    keys = sorted(
        (o["LastModified"], o["Key"])
        for o in listed.get("Contents", [])
        if o["Key"].endswith(".jsonl")
    )
    return [
        [
            json.loads(line)
            for line in pool.s3.get_object(Bucket=TEST_BUCKET, Key=k)["Body"].read().splitlines()
        ]
        for _, k in keys
    ]


def _client() -> Any:
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.mark.slow
@pytest.mark.timeout(600)  # two batches of three process start-ups each, on a loaded machine
def test_a_batch_in_shards_lands_every_video_once_and_a_rerun_runs_only_the_failed_shard(
    pool: Pool, tmp_path: Path
) -> None:
    """6 videos in 3 shards on two workers; the first task submitted fails for good (1403),
    so one shard does not fully land. Then a re-run: only that shard starts again, and in it
    only its missing video is paid for. (One test for both: every batch run here costs
    two rounds of flow-run process start-ups on the loaded machine.)"""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    prefix = "videos/fanout"
    params = {
        "manifest": str(_manifest(tmp_path / "fan.jsonl", "f", 6)),
        "archive": {"prefix": prefix},
        "options": {**FAST, "artifact_key": "fanout"},
        "fan_out": {"shard_size": 2, "poll_interval_s": 1},
    }
    pool.emulator.set_faults({"script": {"submit": ["fail:1403"]}})
    before = pool.emulator.stats()
    with _client() as client:
        first = _run_batch(pool, client, params)
        assert first.state is not None and first.state.is_failed()  # BatchIncompleteError
        children = _children(client, first)
        spans = [(c.parameters["shard"]["start"], c.parameters["shard"]["stop"]) for c in children]
        assert spans == [(0, 2), (2, 4), (4, 6)]
        # One table, the parent's (the children publish none), with a row per video.
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fanout"]))
        )
        assert len(json.loads(str(table.data))) == 6
        assert client.read_global_concurrency_limit_by_name("wan-video-in-flight").active_slots == 0
        mid = pool.emulator.stats()
        assert mid["submissions"] - before["submissions"] == 6  # one task per video
        assert mid["max_in_flight"] <= IN_FLIGHT  # 3 children x 2 lanes shared the one limit
        (summary,) = _summaries(pool, prefix)  # one summary, the parent's, of every video
        assert sorted(r["item_id"] for r in summary) == [f"f-{i}" for i in range(6)]
        failed = [r for r in summary if r["status"] != "archived"]
        assert len(failed) == 1 and failed[0]["error_type"] == "TaskFailedError", failed
        failed_index = int(failed[0]["item_id"].removeprefix("f-"))
        failed_shard = failed_index // 2
        assert children[failed_shard].state is not None and children[failed_shard].state.is_failed()

        pool.emulator.set_faults({})
        second = _run_batch(pool, client, params)
        assert second.state is not None and second.state.is_completed(), second.state
        # Only the shard that did not land ran again...
        assert [c.parameters["shard"]["index"] for c in _children(client, second)] == [failed_shard]
        # ...and in it only its missing video was paid for (its shard-mate is in the ledger).
        assert pool.emulator.stats()["submissions"] - mid["submissions"] == 1
    first_summary, second_summary = _summaries(pool, prefix)
    assert first_summary == summary
    assert sorted(r["item_id"] for r in second_summary) == [f"f-{i}" for i in range(6)]
    assert all(r["status"] == "archived" for r in second_summary)
    # The other shards' videos come from their earlier reports, as already archived.
    reused = {r["item_id"] for r in second_summary if r["already_archived"]}
    assert {f"f-{i}" for i in range(6) if i // 2 != failed_shard} <= reused
    assert f"f-{failed_index}" not in reused
    # Every video at one object of its own, there.
    uris = {r["s3_uri"] for r in second_summary}
    assert len(uris) == 6
    for uri in uris:
        pool.s3.head_object(Bucket=TEST_BUCKET, Key=uri.removeprefix(f"s3://{TEST_BUCKET}/"))


@pytest.mark.slow
def test_cancelling_the_parent_cancels_its_children(pool: Pool, tmp_path: Path) -> None:
    """The shards go to a deployment on a pool no worker polls, so they wait, Scheduled; the
    parent is cancelled (its worker ends it): the parent cancels them itself, nothing paid."""
    params = {
        "manifest": str(_manifest(tmp_path / "cancel.jsonl", "c", 4)),
        "archive": {"prefix": "videos/fanout-cancel"},
        "options": FAST,
        "fan_out": {"shard_size": 2, "poll_interval_s": 1, "deployment": PARKED},
    }
    before = pool.emulator.stats()
    with _client() as client:
        from prefect.deployments import run_deployment
        from prefect.states import Cancelling

        parent = run_deployment(DEPLOYMENT, parameters=params, timeout=0, as_subflow=False)
        _until(pool, "two shard runs", lambda: len(_children(client, parent)) == 2)
        client.set_flow_run_state(parent.id, Cancelling(message="test cancels the batch"))

        def final() -> bool:
            runs = [client.read_flow_run(parent.id), *_children(client, parent)]
            return all(r.state is not None and r.state.is_final() for r in runs)

        _until(pool, "the parent and its children to end", final)
        assert client.read_flow_run(parent.id).state_name == "Cancelled"
        for child in _children(client, parent):
            assert child.state is not None and child.state.is_cancelled(), child.state
            # Moved there by the parent, not (later) by the server's cancellation service.
            assert "the parent batch run" in (child.state.message or ""), child.state
    assert pool.emulator.stats()["submissions"] == before["submissions"]


def _until(pool: Pool, what: str, check: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        pool.check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
