"""Real Prefect flow runs against the emulator over HTTP and SeaweedFS.

Every test uses prompts unique to itself: the task cache is shared across the session, as it
would be across runs of a real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE, Stack, run_video
from wan_tasks import I2VRequest, PollPolicy
from wan_tasks.core.identity import derive_seed
from wan_tasks.emulator.render import probe_mp4
from wan_tasks.errors import BatchIncompleteError, VideoFailedError
from wan_tasks.flows.generate import generate_batch
from wan_tasks.flows.options import RunOptions
from wan_tasks.integration.limits import LimitSettings

FAST = RunOptions(
    poll=PollPolicy(first_poll_after=0.3, min_interval=0.2, max_interval=0.5, jitter=0.0)
)


def req(name: str, **kw: Any) -> I2VRequest:
    kw.setdefault("image", str(SAMPLE))
    return I2VRequest(prompt=f"test {name}", **kw)


def write_manifest(path: Path, rows: list[dict[str, Any] | str]) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_generate_video_archives_a_verified_object(stack: Stack) -> None:
    out = run_video(req("verified", seed=21), options=FAST)
    assert out.status == "archived" and out.s3_uri and out.sidecar_uri
    data, answer = stack.object(out.s3_uri)
    manifest = json.loads(stack.object(out.sidecar_uri)[0])
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"] == out.sha256
    assert len(data) == manifest["size"] == out.size
    assert answer["ContentType"] == "video/mp4"
    meta = answer["Metadata"]
    assert meta["prediction-id"] == out.prediction_id and meta["seed"] == "21"
    assert meta["sha256"] == out.sha256 and meta["model"].endswith("i2v-480p-lora-ultra-fast")
    assert manifest["prediction_id"] == out.prediction_id and manifest["seed"] == 21
    assert manifest["prefect"]["flow_run_id"] and manifest["prefect"]["task_run_id"]
    assert manifest["cost_usd"] == "0.10" and manifest["timings"]["inference_ms"] >= 500
    assert manifest["request"]["image"] == str(SAMPLE.resolve())
    assert probe_mp4(data).frames == 81
    sheet, sheet_answer = stack.object(out.contact_sheet_uri or "")
    assert sheet[:2] == b"\xff\xd8" and sheet_answer["ContentType"] == "image/jpeg"
    assert httpx.get(out.presigned_url or "", timeout=10).content == data
    stats = stack.stats()
    assert stats["submissions"] == 1 and stats["downloads"] == 1


def test_one_video_shares_one_prefect_client(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Prefect client loads the CA bundle (25-50 ms of CPU, BENCHMARKS.md). The
    single-video flow's sync task runs, limit read, artifacts and cancel watch share the
    run's one client; Prefect's engine makes the other (its result-storage lookup)."""
    from prefect.client.orchestration import SyncPrefectClient

    made: list[str] = []
    real = SyncPrefectClient.__init__

    def counting(self: SyncPrefectClient, *args: Any, **kwargs: Any) -> None:
        made.append(threading.current_thread().name)
        real(self, *args, **kwargs)

    monkeypatch.setattr(SyncPrefectClient, "__init__", counting)
    out = run_video(req("one client"), options=FAST)
    assert out.status == "archived"
    assert len(made) <= 2, made


def test_second_run_submits_nothing(stack: Stack) -> None:
    first = run_video(req("rerun"), options=FAST)
    before = stack.stats()
    second = run_video(req("rerun"), options=FAST)
    after = stack.stats()
    assert second.s3_uri == first.s3_uri and second.sha256 == first.sha256
    for counter in ("submissions", "result_polls", "uploads", "downloads"):
        assert after[counter] == before[counter], counter
    assert before["submissions"] == 1


def test_a_rerun_of_a_finished_batch_waits_for_nothing(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached submit's stored result predates its video's archiving; the ledger knows it
    landed, so a re-run goes from the cached submit to the archive without a wait task run
    (before, it ran a cached wait per video, inside a slot). Videos that had not landed are
    still waited for (tests/test_crash_resume.py)."""
    from wan_tasks.flows import produce

    waited: list[str] = []
    real = produce.await_prediction

    async def counting(submitted: Any, **kwargs: Any) -> Any:
        waited.append(submitted.item_id)
        return await real(submitted, **kwargs)

    monkeypatch.setattr(produce, "await_prediction", counting)
    rows = [
        {"id": f"landed-{i}", "image": str(SAMPLE), "prompt": f"test landed rerun {i}"}
        for i in range(3)
    ]
    manifest = write_manifest(tmp_path / "landed.jsonl", rows)
    first = generate_batch(manifest, options=FAST)
    assert first.archived == 3 and sorted(waited) == ["landed-0", "landed-1", "landed-2"]

    waited.clear()
    before = stack.stats()
    again = generate_batch(manifest, options=FAST)
    assert again.archived == 3 and again.new_spend_usd == 0, again
    assert waited == []
    after = stack.stats()
    for counter in ("submissions", "result_polls", "downloads"):
        assert after[counter] == before[counter], counter
    assert [o.sha256 for o in again.outcomes] == [o.sha256 for o in first.outcomes]
    assert [o.s3_uri for o in again.outcomes] == [o.s3_uri for o in first.outcomes]

    # The shortcut's read failing costs the shortcut, not the videos: they wait as before.
    class Unreadable:
        def read(self, request_key: str) -> None:
            raise OSError("store unavailable")

    monkeypatch.setattr(produce, "open_ledger", lambda place: Unreadable())
    third = generate_batch(manifest, options=FAST)
    assert third.archived == 3, third
    assert sorted(waited) == ["landed-0", "landed-1", "landed-2"]
    assert stack.stats()["submissions"] == before["submissions"]


def test_the_rerun_shortcut_takes_only_this_predictions_record_in_this_bucket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In memory: a submit of an earlier run goes straight to the archive step only when the
    ledger says *its* prediction landed in the bucket this run archives to."""
    from datetime import UTC, datetime

    from wan_tasks.core.budget import Budget
    from wan_tasks.core.ledger import ArchivedAt, LedgerEntry
    from wan_tasks.core.submit import SubmittedVideo
    from wan_tasks.flows import produce
    from wan_tasks.storage.archive import ArchiveTarget

    now = datetime.now(UTC)
    producer = produce.Producer(ArchiveTarget(bucket="videos"), RunOptions(), Budget(None))
    producer.this_run = "run-2"
    submitted = SubmittedVideo(
        request_key="k",
        prediction_id="p1",
        model="m",
        seed=1,
        duration=5,
        cost_usd=Decimal("0.10"),
        submitted_at=now,
        flow_run_id="run-1",
        redacted_request={},
        redacted_payload={},
    )
    records: dict[str, LedgerEntry] = {}

    class Book:
        def read(self, request_key: str) -> LedgerEntry | None:
            return records.get(request_key)

    def landed(bucket: str, prediction_id: str = "p1") -> LedgerEntry:
        where = ArchivedAt(bucket=bucket, key="v.mp4", sha256="0" * 64, size=1)
        return LedgerEntry(
            request_key="k",
            model="m",
            intent_at=now,
            input_fingerprint="f",
            payload={},
            prediction_id=prediction_id,
            archived=where,
        )

    monkeypatch.setattr(produce, "open_ledger", lambda place: Book())
    assert producer._landed_since(submitted).archived is None  # no record
    records["k"] = landed("videos")
    found = producer._landed_since(submitted).archived
    assert found is not None and found.key == "v.mp4"
    records["k"] = landed("elsewhere")
    assert producer._landed_since(submitted).archived is None
    records["k"] = landed("videos", prediction_id="p2")
    assert producer._landed_since(submitted).archived is None


def test_seed_minus_one_records_the_concrete_seed(stack: Stack) -> None:
    request = req("seed-minus-one")
    out = run_video(request, options=FAST)
    expected = derive_seed(request).seed
    assert out.seed == expected != -1
    manifest = json.loads(stack.object(out.sidecar_uri or "")[0])
    assert manifest["seed"] == expected and manifest["payload"]["seed"] == expected
    (sent,) = stack.emulator._server.engine.tasks.values()
    assert sent.input["seed"] == expected
    other = run_video(req("seed-minus-one"), variant="take-2", options=FAST)
    assert other.seed != expected and stack.stats()["submissions"] == 2


def test_transient_faults_mid_wait_do_not_resubmit(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(
        faults={"script": {"result": ["503", "drop", "429", "500", "502"]}, "retry_after_s": 0.2}
    )
    out = run_video(req("faults-mid-wait"), options=FAST)
    assert out.status == "archived"
    stats = stack.stats()
    assert stats["submissions"] == 1 and stats["faults_injected"] == 5


def test_identical_concurrent_requests_submit_once(stack: Stack, tmp_path: Path) -> None:
    row = {"image": str(SAMPLE), "prompt": "test identical twins", "seed": 5}
    manifest = write_manifest(
        tmp_path / "twins.jsonl", [{**row, "id": f"twin-{i}"} for i in range(3)]
    )
    report = generate_batch(manifest, options=FAST)
    assert report.archived == 3
    assert len({o.s3_uri for o in report.outcomes}) == 1
    assert stack.stats()["submissions"] == 1


def test_batch_with_bad_items_archives_the_rest(stack: Stack, tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path / "mixed.jsonl",
        [
            {"id": "good-1", "image": str(SAMPLE), "prompt": "test mixed 1"},
            {"id": "bad-duration", "image": str(SAMPLE), "prompt": "test mixed 2", "duration": 6},
            {"id": "good-2", "image": str(SAMPLE), "prompt": "test mixed 3", "duration": 8},
            "{not json",
            {"id": "unreachable", "image": "https://unreachable.invalid/x.png", "prompt": "t m 4"},
            {"id": "good-3", "image": str(SAMPLE), "prompt": "test mixed 5"},
        ],
    )
    with pytest.raises(BatchIncompleteError, match="3 of 6 videos did not land"):
        generate_batch(manifest, options=FAST)
    state = generate_batch(manifest, options=FAST, fail_on_item_error=False, return_state=True)
    report = state.result()
    by_id = {o.item_id: o for o in report.outcomes}
    assert [by_id[i].status for i in ("good-1", "good-2", "good-3")] == ["archived"] * 3
    # The run's table and contact-sheet artifacts exist (made from the flow's worker thread).
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )
    assert sorted(a.key or "" for a in artifacts) == ["wan-videos", "wan-videos-sheets"]
    assert by_id["bad-duration"].status == "invalid"
    assert "duration" in (by_id["bad-duration"].error or "")
    assert by_id["row-00004"].status == "invalid"
    assert by_id["unreachable"].status == "failed"
    assert by_id["unreachable"].error_type == "MediaAccessError"
    assert (report.archived, report.invalid, report.failed) == (3, 2, 1)
    # Only the four valid rows ever reached the service, once each across both runs.
    assert stack.stats()["submissions"] == 4
    assert report.new_spend_usd == Decimal("0")  # the second run paid for nothing new
    lines = stack.object(report.summary_uri or "")[0].decode().splitlines()
    assert len(lines) == 6
    assert {json.loads(line)["item_id"] for line in lines} == set(by_id)


def test_in_flight_limit_holds(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    stack = make_stack(in_flight=2, latency_s=0.6)
    rows = [{"id": f"v{i}", "image": str(SAMPLE), "prompt": f"test limit {i}"} for i in range(6)]
    report = generate_batch(write_manifest(tmp_path / "limit.jsonl", rows), options=FAST)
    assert report.archived == 6
    stats = stack.stats()
    assert stats["submissions"] == 6
    # Never above the limit. (Whether both slots were busy at one moment is a race of the
    # machine's load; that the batch ran in two lanes is tests below.)
    assert 1 <= stats["max_in_flight"] <= 2


def test_budget_cap_refuses_the_rest(stack: Stack, tmp_path: Path) -> None:
    rows = [{"id": f"b{i}", "image": str(SAMPLE), "prompt": f"test budget {i}"} for i in range(4)]
    options = FAST.model_copy(update={"budget_usd": Decimal("0.25")})
    report = generate_batch(
        write_manifest(tmp_path / "budget.jsonl", rows), options=options, fail_on_item_error=False
    )
    assert (report.archived, report.skipped) == (2, 2)
    assert report.new_spend_usd == Decimal("0.20")
    assert stack.stats()["submissions"] == 2
    skipped = [o for o in report.outcomes if o.status == "skipped"]
    assert all("budget" in (o.error or "") for o in skipped)


def test_retryable_task_failure_is_resubmitted(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(faults={"script": {"submit": ["fail:5003"]}})
    out = run_video(req("retryable-failure"), options=FAST)
    assert out.status == "archived" and stack.stats()["submissions"] == 2


def test_permanent_failure_fails_fast_and_rerun_retries_it(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    stack = make_stack(faults={"script": {"submit": ["fail:1403"]}})
    manifest = write_manifest(
        tmp_path / "perm.jsonl",
        [{"id": "only", "image": str(SAMPLE), "prompt": "test permanent failure"}],
    )
    first = generate_batch(manifest, options=FAST, fail_on_item_error=False)
    assert first.failed == 1 and first.outcomes[0].error_type == "TaskFailedError"
    assert "1403" in (first.outcomes[0].error or "")
    assert stack.stats()["submissions"] == 1  # 1403 is not retried within the run
    second = generate_batch(manifest, options=FAST)
    assert second.archived == 1 and stack.stats()["submissions"] == 2


def test_missing_limit_fails_loudly(stack: Stack) -> None:
    options = FAST.model_copy(update={"limits": LimitSettings(in_flight="no-such-limit")})
    with pytest.raises(VideoFailedError, match="no-such-limit"):
        run_video(req("missing-limit"), options=options)
    assert stack.stats()["submissions"] == 0


def test_cli_rejects_bad_input_before_spending(stack: Stack, capsys: Any) -> None:
    from wan_tasks.cli.main import main

    code = main(["generate", "--image", str(SAMPLE), "--prompt", "x", "--duration", "6"])
    assert code == 2
    assert "duration: Input should be 5 or 8" in capsys.readouterr().err
    assert stack.stats()["submissions"] == 0


# A real prefect-aws S3Bucket block: tests/test_prefect_aws.py.


def test_lanes_take_one_slot_each_for_many_videos(
    make_stack: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots are held per lane (one acquisition per lane, K = the limit), not per video:
    per-video acquisitions leave the service idle between videos (BENCHMARKS.md)."""
    import wan_tasks.flows.produce as produce

    stack = make_stack(in_flight=2, latency_s=0.3)
    taken: list[str | None] = []
    real = produce.in_flight_slot

    def counting(limits: LimitSettings, occupy: int = 1) -> Any:
        taken.append(limits.in_flight)
        return real(limits, occupy)

    monkeypatch.setattr(produce, "in_flight_slot", counting)
    rows = [{"id": f"l{i}", "image": str(SAMPLE), "prompt": f"test lanes {i}"} for i in range(8)]
    report = generate_batch(write_manifest(tmp_path / "lanes.jsonl", rows), options=FAST)
    assert report.archived == 8 and stack.stats()["submissions"] == 8
    assert taken == ["wan-video-in-flight"] * 2
    # The limit held (whether the two lanes' tasks overlapped is a race of the machine's load).
    assert stack.stats()["max_in_flight"] <= 2
    # release_after_s=0: a slot per video, the way to share a limit turn by turn.
    taken.clear()
    per_video = FAST.model_copy(update={"limits": LimitSettings(release_after_s=0)})
    rows = [
        {"id": f"r{i}", "image": str(SAMPLE), "prompt": f"test lanes turn {i}"} for i in range(4)
    ]
    report = generate_batch(write_manifest(tmp_path / "turns.jsonl", rows), options=per_video)
    assert report.archived == 4 and 4 <= len(taken) <= 4 + 2  # (+ a lane's last, empty turn)


def test_no_slot_no_spend(make_stack: Callable[..., Stack], tmp_path: Path) -> None:
    """When no slot frees up in time, every video fails naming why, and nothing is paid."""
    from prefect.concurrency.sync import concurrency

    stack = make_stack(in_flight=1)
    rows = [{"id": f"t{i}", "image": str(SAMPLE), "prompt": f"test no slot {i}"} for i in range(3)]
    options = FAST.model_copy(update={"limits": LimitSettings(acquire_timeout_s=1.0)})
    with concurrency("wan-video-in-flight", occupy=1, strict=True):  # someone else holds it
        report = generate_batch(
            write_manifest(tmp_path / "noslot.jsonl", rows),
            options=options,
            fail_on_item_error=False,
        )
    assert report.failed == 3 and stack.stats()["submissions"] == 0
    for outcome in report.outcomes:
        assert outcome.error_type == "NoSlotError"
        error = outcome.error or ""
        assert "wan-video-in-flight" in error and "timed out" in error


def test_rate_limit_is_opt_in_and_strict(stack: Stack) -> None:
    assert LimitSettings().per_minute is None
    options = FAST.model_copy(update={"limits": LimitSettings(per_minute="no-such-rate")})
    with pytest.raises(VideoFailedError, match="no-such-rate"):
        run_video(req("missing-rate-limit"), options=options)
    assert stack.stats()["submissions"] == 0


def test_first_poll_learns_the_inference_time(
    make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    import wan_tasks.integration.tasks as tasks
    from wan_tasks.api.models import MODEL_ID
    from wan_tasks.core.inference_times import InferenceTimes

    stack = make_stack(latency_s=0.4)
    learned = InferenceTimes()
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    slow_first = FAST.model_copy(
        update={"poll": FAST.poll.model_copy(update={"first_poll_after": 120.0})}
    )
    for s in (0.4, 0.4, 0.4):  # as if three videos had been seen in this process
        learned.record(MODEL_ID, 5, s)
    began = time.monotonic()
    out = run_video(req("learned-first-poll"), options=slow_first)
    # Polled once, just after the learned 0.4 s, not after the configured 120 s.
    assert time.monotonic() - began < 60
    assert out.status == "archived" and stack.stats()["result_polls"] == 1
    assert learned.expected(MODEL_ID, 5) == pytest.approx(0.4, abs=0.1)
    off = slow_first.poll.model_copy(update={"learn_first_poll": False, "first_poll_after": 0.6})
    run_video(req("unlearned-first-poll"), options=FAST.model_copy(update={"poll": off}))
    assert stack.stats()["result_polls"] == 2


def test_credentials_from_a_saved_block(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Teams keep the key in a block; the flow loads it (also from its worker thread)."""
    from pydantic import SecretStr

    from wan_tasks.integration.blocks import WaveSpeedCredentials

    WaveSpeedCredentials(
        api_key=SecretStr(stack.emulator.api_key), base_url=stack.emulator.base_url
    ).save("team-key", overwrite=True)
    monkeypatch.setenv("WAVESPEED_API_KEY", "not-the-key")  # the block's key must be used
    loads = [0]
    real_load = WaveSpeedCredentials.load.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, *args: Any, **kwargs: Any) -> Any:
        loads[0] += 1
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(WaveSpeedCredentials, "load", classmethod(counting))
    options = FAST.model_copy(update={"credentials_block": "team-key"})
    out = run_video(req("credentials-block"), options=options)
    assert out.status == "archived" and stack.stats()["submissions"] == 1
    # Read once, not per step: submit, its cache key, wait and archive each asked for it
    # (a Prefect API read each); a re-saved block is read again after BLOCK_REFRESH_S.
    assert loads[0] == 1


def test_a_runs_two_artifacts_are_written_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table and the contact-sheet page are two Prefect API writes at the end of every
    run (~0.1 s of a single video's, one after the other): they now go out together, each
    with the run's context. Each write here waits for the other to start."""
    from wan_tasks.flows import reporting
    from wan_tasks.storage.archive import ArchiveTarget

    both = threading.Barrier(2, timeout=30)
    written: list[str] = []

    def write() -> Callable[..., None]:
        def create(*, key: str, **kwargs: Any) -> None:
            both.wait()  # broken (an error) if the other write is not under way
            written.append(key)

        return create

    monkeypatch.setattr(reporting, "create_table_artifact", write())
    monkeypatch.setattr(reporting, "create_markdown_artifact", write())
    reporting.publish_artifacts([], title="t", target=ArchiveTarget(bucket="videos"), key="k")
    assert sorted(written) == ["k", "k-sheets"]


def test_when_both_artifacts_fail_the_first_is_raised_and_the_second_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from wan_tasks.flows import reporting
    from wan_tasks.storage.archive import ArchiveTarget

    def failing(what: str) -> Callable[..., None]:
        def create(**kwargs: Any) -> None:
            raise RuntimeError(f"{what} refused")

        return create

    monkeypatch.setattr(reporting, "create_table_artifact", failing("table"))
    monkeypatch.setattr(reporting, "create_markdown_artifact", failing("sheets"))
    with pytest.raises(RuntimeError, match="table refused"):
        reporting.publish_artifacts([], title="t", target=ArchiveTarget(bucket="videos"), key="k")
    assert "sheets refused" in caplog.text
