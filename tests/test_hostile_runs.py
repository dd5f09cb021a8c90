"""Scenario classes a hostile run found: a second payment, a paid video never archived, the
wrong video returned, one bad row sinking its neighbours. Each over the real servers, each
asserting on what the service was asked to do (the emulator's counts) and what landed."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prefect import flow

from tests.conftest import SAMPLE, Stack, run_video
from tests.test_flows import FAST, req
from wan_tasks.core.budget import Budget
from wan_tasks.flows.generate import resolve_target
from wan_tasks.flows.models import VideoJob, VideoOutcome
from wan_tasks.flows.options import ArchiveOptions, RunOptions
from wan_tasks.flows.produce import Producer


def run_jobs(jobs: list[VideoJob], options: RunOptions = FAST) -> list[VideoOutcome]:
    @flow(name="hostile-jobs")
    def jobs_flow() -> list[VideoOutcome]:
        target = resolve_target(ArchiveOptions())
        return Producer(target, options, Budget(options.budget_usd)).run(jobs)

    return jobs_flow()


def uploaded(stack: Stack) -> str:
    """The sample image as a URL the emulator serves."""
    from wan_tasks.api.client import WaveSpeedClient

    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        return client.upload(SAMPLE)


# -- one bad row must not fail the others ----------------------------------------------------


def test_a_vanished_image_fails_its_video_and_the_lane_goes_on(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """One lane (in-flight limit 1): the second video's image is deleted before its turn.
    It fails with its own reason; the videos after it in the same lane are made."""
    stack = make_stack(in_flight=1)
    doomed = tmp_path / "doomed.png"
    shutil.copy(SAMPLE, doomed)
    jobs = [VideoJob(request=req(f"lane-{i}"), item_id=f"v{i}") for i in range(4)]
    jobs[1] = VideoJob(request=req("lane-doomed", image=str(doomed)), item_id="doomed")
    os.unlink(doomed)
    outcomes = {o.item_id: o for o in run_jobs(jobs)}
    assert outcomes["doomed"].status == "failed"
    assert outcomes["doomed"].error_type != "NoSlotError"
    assert "doomed.png" in (outcomes["doomed"].error or "")
    assert [outcomes[f"v{i}"].status for i in (0, 2, 3)] == ["archived"] * 3
    assert stack.stats()["submissions"] == 3


# -- a second payment, or a paid video never archived ---------------------------------------


def test_a_lost_answer_on_a_resubmission_finds_that_attempts_task(
    make_stack: Callable[..., Stack],
) -> None:
    """Attempt 0 fails with 5003; the answer to attempt 1's POST is lost. Reconciliation
    must find attempt 1's task (the same body), not attempt 0's failed one."""
    stack = make_stack(faults={"script": {"submit": ["fail:5003", "drop"]}})
    # An image URL (not a local file uploaded anew per attempt): both attempts send the
    # very same body.
    out = run_video(req("resubmit-lost", image=uploaded(stack)), options=FAST)
    assert out.status == "archived"
    assert stack.stats()["submissions"] == 2  # attempt 0 and attempt 1, no third task


def test_a_503_on_a_resubmission_sends_the_resubmission(make_stack: Callable[..., Stack]) -> None:
    """Attempt 0 fails with 5003; attempt 1's POST answers 503. Attempt 0's failed task must
    not be taken for attempt 1: attempt 1 is sent once the history shows it was not."""
    stack = make_stack(faults={"script": {"submit": ["fail:5003", "503"]}})
    out = run_video(req("resubmit-503", image=uploaded(stack)), options=FAST)
    assert out.status == "archived"
    assert stack.stats()["submissions"] == 2


def test_a_young_404_on_the_output_is_retried_not_paid_again(
    make_stack: Callable[..., Stack],
) -> None:
    """A transient 404 on a seconds-old output is not an expired output, even where paying
    again for expired outputs is allowed."""
    stack = make_stack(faults={"script": {"download": ["expire"]}})
    allowed = FAST.model_copy(update={"allow_resubmit_expired": True})
    out = run_video(req("young-404"), options=allowed)
    assert out.status == "archived"
    assert stack.stats()["submissions"] == 1


def test_a_refused_intent_write_releases_the_budget(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """The ledger cannot be written for the first video (nothing is sent): its reservation
    is given back, so the second fits the budget of one video, and the reported spend is
    what was submitted."""
    from wan_tasks.api.client import WaveSpeedClient
    from wan_tasks.core.identity import derive_seed, request_key
    from wan_tasks.core.ledger import FileLedger
    from wan_tasks.core.submit import submit_once

    stack = make_stack()
    ledger = FileLedger(tmp_path / "ledger")
    budget = Budget(Decimal("0.10"))
    blocked = derive_seed(req("intent-refused"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        # A directory where the intent's temporary file must go: the write fails for real.
        key = request_key(blocked, service=client.service_id)
        (ledger.root / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp").mkdir()
        with pytest.raises(OSError):
            submit_once(client, blocked, ledger=ledger, budget=budget)
        assert budget.spent == 0 and stack.stats()["submissions"] == 0
        submit_once(client, derive_seed(req("intent-fine")), ledger=ledger, budget=budget)
    assert budget.spent == Decimal("0.10") and stack.stats()["submissions"] == 1


def test_the_emulator_and_the_real_service_never_share_an_identity(
    make_stack: Callable[..., Stack],
) -> None:
    """A free run on one service (or account) and the same request on another must not
    reconnect to each other's predictions: each is submitted to its own service."""
    first = make_stack(api_key="account-one")
    run_video(req("two-services", seed=5), options=FAST)
    second = make_stack(api_key="account-two")  # another account; same bucket and ledger
    out = run_video(req("two-services", seed=5), options=FAST)
    assert out.status == "archived"
    assert first.stats()["submissions"] == 1
    assert second.stats()["submissions"] == 1


def test_service_identity_names_host_and_account_not_a_local_port() -> None:
    from pydantic import SecretStr

    from wan_tasks.api.config import service_fingerprint

    key = SecretStr("k1")
    real = service_fingerprint("https://api.wavespeed.ai", key)
    local = service_fingerprint("http://127.0.0.1:8700", key)
    assert real != local  # the emulator is never the real service
    assert real != service_fingerprint("https://api.wavespeed.ai", SecretStr("k2"))
    # A local emulator restarted on another port is the same (free) account.
    assert local == service_fingerprint("http://127.0.0.1:9911", key)
    assert "k1" not in real


def test_an_image_replaced_in_place_is_a_new_request(stack: Stack, tmp_path: Path) -> None:
    """Same path, same size, same mtime, new bytes: a new video, not the old one."""
    from PIL import Image

    image = tmp_path / "frame.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(image)
    first = run_video(req("replaced", image=str(image), seed=9), options=FAST)
    st = image.stat()
    Image.new("RGB", (64, 48), (10, 10, 200)).save(image)
    assert image.stat().st_size == st.st_size
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = run_video(req("replaced", image=str(image), seed=9), options=FAST)
    assert stack.stats()["submissions"] == 2
    assert second.prediction_id != first.prediction_id


def test_a_long_history_is_searched_to_its_end(
    make_emulator: Callable[..., Any], tmp_path: Path
) -> None:
    """The task a crashed submit created sits pages deep in a history whose pages hold fewer
    rows than were asked for: it is found, not paid for again; a window that cannot be
    searched to its end is uncertain (nothing is sent), never "no such task"."""
    from wan_tasks.api.client import WaveSpeedClient
    from wan_tasks.core.identity import derive_seed, request_key
    from wan_tasks.core.ledger import FileLedger, reconcile
    from wan_tasks.core.submit import submit_once
    from wan_tasks.errors import SubmissionUncertainError

    emu = make_emulator(latency_s=0.2, concurrency=20, history_page_cap=5)
    ledger = FileLedger(tmp_path / "ledger")
    with WaveSpeedClient(emu.api_key, emu.base_url) as client:
        lost = derive_seed(req("deep-in-history"))
        payload = client.prepare(lost)
        entry = ledger.record_intent(
            request_key(lost, service=client.service_id), client.ops.model, payload
        )
        accepted = client.submit_payload(payload)  # the answer "never reached" the ledger
        for i in range(12):  # newer tasks push it to the third page
            client.submit_payload(client.prepare(derive_seed(req(f"newer-{i}"))))
        with pytest.raises(SubmissionUncertainError):
            reconcile(client, entry, max_pages=2)
        found = submit_once(client, lost, ledger=ledger, settle_s=(0.1,))
    assert found.prediction_id == accepted.id
    assert emu.stats()["submissions"] == 13


# -- a video lost, or the wrong video -------------------------------------------------------


def test_a_download_cut_short_without_content_length_is_never_archived(
    make_stack: Callable[..., Stack],
) -> None:
    """Half the bytes, no Content-Length, a clean close: the body looks complete and its
    SHA-256 is fine, but it is not a whole MP4. It is refused and fetched again."""
    from wan_tasks.storage.mp4check import Mp4Structure

    stack = make_stack(faults={"script": {"download": ["truncate_unsized"]}})
    out = run_video(req("unsized-truncation"), options=FAST)
    assert out.status == "archived" and out.s3_uri
    data, _ = stack.object(out.s3_uri)
    whole = Mp4Structure()
    whole.feed(data)
    assert whole.problem() is None
    assert stack.stats()["downloads"] >= 2 and stack.stats()["submissions"] == 1


def test_an_output_behind_a_redirect_is_archived(make_stack: Callable[..., Stack]) -> None:
    """A CDN answering 302 for the output: followed (with no Authorization header), not a
    failure for good."""
    stack = make_stack(faults={"script": {"download": ["redirect"]}}, signed_outputs=True)
    out = run_video(req("redirected"), options=FAST)
    assert out.status == "archived"
    assert stack.stats()["downloads"] == 2 and stack.stats()["submissions"] == 1


def test_signed_outputs_are_not_asked_for_again_to_archive(
    make_stack: Callable[..., Stack], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait's stored result keeps a signed output URL scrubbed; the archive step asked
    the service for the prediction again to get the live URL: a call per video. The live
    URL now goes from the wait to the archive in memory. A download that fails with it
    (here a 404 from the CDN) is retried with a URL asked afresh."""
    from wan_tasks.api.client import WaveSpeedClient

    asked: list[str] = []
    get_prediction = WaveSpeedClient.get_prediction

    def counted(self: WaveSpeedClient, prediction_id: str) -> Any:
        asked.append(prediction_id)
        return get_prediction(self, prediction_id)

    monkeypatch.setattr(WaveSpeedClient, "get_prediction", counted)
    stack = make_stack(signed_outputs=True)
    out = run_video(req("signed, in memory"), options=FAST)
    assert out.status == "archived" and asked == []
    stack.emulator.set_faults({"script": {"download": ["expire"]}})
    again = run_video(req("signed, stale"), options=FAST)
    assert again.status == "archived" and asked == [again.prediction_id]
    assert stack.stats()["downloads"] == 3  # one, then a 404 and its retry


def test_live_outputs_keep_only_signed_urls_and_not_past_their_time() -> None:
    """Only a URL whose signature the stored copy lost is kept (one merely re-encoded by the
    scrub is usable as stored), taken once, and nothing stays past `keep_s` (a URL nobody
    took: its archive ran in another process) or beyond the bound."""
    from wan_tasks.api.models import Prediction
    from wan_tasks.integration import tasks

    now = [0.0]
    live = tasks.LiveOutputs(keep_s=60.0, most=3, clock=lambda: now[0])
    signed = "https://cdn.test/v.mp4?Expires=1&Signature=abc"

    def waited(pid: str, url: str) -> list[str]:
        done = Prediction.model_validate({"id": pid, "status": "completed", "outputs": [url]})
        return tasks._stored_outputs(done, live)

    waited("plain", "https://cdn.test/v.mp4?v=1&x")  # the scrub re-encodes it, nothing more
    assert len(live) == 0
    assert "abc" not in waited("signed", signed)[0]
    assert live.take("signed") == [signed] and live.take("signed") is None
    waited("old", signed)
    now[0] = 61.0
    waited("new", signed)
    assert len(live) == 1 and live.take("old") is None  # dropped when "new" came
    for i in range(5):
        waited(f"many {i}", signed)
    assert len(live) == 3


def _forget_prefect_cache() -> None:
    """What a new worker (another Prefect home, no shared result storage) starts with."""
    from prefect.settings import get_current_settings

    storage = Path(get_current_settings().results.local_storage_path)
    for path in storage.glob("wan-*"):
        path.unlink()


def test_a_content_addressed_video_is_found_after_its_output_expired(
    make_stack: Callable[..., Stack],
) -> None:
    """Archived under a key made of its SHA-256; re-run where the cache is gone and the
    service's output has expired: the ledger knows where it is; nothing is paid again."""
    stack = make_stack()
    archive = ArchiveOptions(key_template="{prefix}/sha256/{sha256}.mp4")
    first = run_video(req("content-addressed", seed=4), archive=archive, options=FAST)
    _forget_prefect_cache()
    stack.emulator.set_faults({"script": {"download": ["expire"] * 5}})
    paying = FAST.model_copy(update={"allow_resubmit_expired": True, "output_lifetime_s": 0})
    again = run_video(req("content-addressed", seed=4), archive=archive, options=paying)
    assert again.status == "archived" and again.s3_uri == first.s3_uri
    assert stack.stats()["submissions"] == 1


def test_failed_tasks_are_reported_as_refunds_due_and_still_count_as_spent(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """One task fails for good (1403), one fails with 5003 and is made again: three paid
    submissions, two of them failed tasks the service refunds later. The report says so, and
    until then the budget counts them (conservative)."""
    from tests.test_flows import write_manifest
    from wan_tasks.flows.generate import generate_batch

    stack = make_stack(faults={"script": {"submit": ["fail:1403", "fail:5003"]}})
    rows = [
        {"id": f"refund{i}", "image": uploaded(stack), "prompt": f"refund {i}"} for i in range(2)
    ]
    report = generate_batch(
        write_manifest(tmp_path / "refunds.jsonl", rows),
        options=FAST,
        fail_on_item_error=False,
    )
    assert stack.stats()["submissions"] == 3
    assert (report.archived, report.failed) == (1, 1)
    assert report.new_spend_usd == Decimal("0.30")
    assert report.refund_expected_usd == Decimal("0.20")
