"""Never pay twice: the ledger reconnects, reconciles lost answers, and guards expired outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Stack, run_video
from tests.test_flows import FAST, req
from wan_tasks import MODEL_ID, WaveSpeedClient
from wan_tasks.core.identity import derive_seed, request_key
from wan_tasks.core.ledger import DEFAULT_LEDGER_PREFIX, FileLedger, input_fingerprint, reconcile
from wan_tasks.errors import VideoFailedError
from wan_tasks.integration.runtime import open_ledger
from wan_tasks.storage.place import S3Place


def ledger_place(stack: Stack) -> S3Place:
    return S3Place(bucket=stack.bucket, prefix=DEFAULT_LEDGER_PREFIX)


def client_for(stack: Stack) -> WaveSpeedClient:
    return WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url)


def test_crash_between_accept_and_record_is_reconciled(stack: Stack) -> None:
    """The process died after the service accepted the task, before the id was recorded."""
    request = derive_seed(req("crash-window"))
    ledger = open_ledger(ledger_place(stack))
    with client_for(stack) as client:
        key = request_key(request, service=client.service_id)
        payload = client.prepare(request)
        entry = ledger.record_intent(key, MODEL_ID, payload)
        lost = client.submit_payload(payload)  # accepted and billed; then the "crash"
    assert ledger.read(key).prediction_id is None  # type: ignore[union-attr]
    out = run_video(req("crash-window"), options=FAST)
    assert out.prediction_id == lost.id
    assert stack.stats()["submissions"] == 1  # reconnected, not paid again
    assert ledger.read(key).prediction_id == lost.id  # type: ignore[union-attr]
    assert entry.input_fingerprint == input_fingerprint(payload)


def test_intent_that_never_reached_the_service_is_submitted(stack: Stack) -> None:
    request = derive_seed(req("never-sent"))
    ledger = open_ledger(ledger_place(stack))
    with client_for(stack) as client:
        key = request_key(request, service=client.service_id)
        ledger.record_intent(key, MODEL_ID, client.prepare(request))
    out = run_video(req("never-sent"), options=FAST)
    assert out.status == "archived" and stack.stats()["submissions"] == 1


def test_lost_submit_answer_is_found_in_history(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(faults={"script": {"submit": ["drop"]}})
    out = run_video(req("dropped-answer"), options=FAST)
    assert out.status == "archived"
    assert stack.stats()["submissions"] == 1
    assert stack.stats()["history_queries"] >= 1


def test_ledger_reconnects_when_the_cache_is_gone(stack: Stack) -> None:
    from prefect.logging import disable_run_logger

    from wan_tasks.integration.tasks import submit_i2v

    first = run_video(req("cache-gone"), options=FAST)
    with disable_run_logger():  # .fn: the task body, without Prefect's cache
        again = submit_i2v.fn(req("cache-gone"), ledger=ledger_place(stack))
    assert again.prediction_id == first.prediction_id
    assert stack.stats()["submissions"] == 1


def test_expired_output_is_resubmitted_only_when_allowed(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(faults={"script": {"download": ["expire", "expire"]}})
    # The emulator's `expire` stands in for a week-old output: a lifetime of 0 makes every
    # 404 an expired output (a younger one is retried: tests/test_hostile_runs.py).
    aged = FAST.model_copy(update={"output_lifetime_s": 0})
    with pytest.raises(VideoFailedError, match="allow_resubmit_expired"):
        run_video(req("expired"), options=aged)
    assert stack.stats()["submissions"] == 1
    allowed = aged.model_copy(update={"allow_resubmit_expired": True})
    out = run_video(req("expired"), options=allowed)
    assert out.status == "archived" and stack.stats()["submissions"] == 2


def test_reconcile_picks_the_earliest_of_duplicates(stack: Stack, tmp_path: Path) -> None:
    request = derive_seed(req("duplicates"))
    ledger = FileLedger(tmp_path)
    with client_for(stack) as client:
        payload = client.prepare(request)
        entry = ledger.record_intent(
            request_key(request, service=client.service_id), MODEL_ID, payload
        )
        first = client.submit_payload(payload)
        client.submit_payload(payload)
        other = dict(payload, prompt="something else")
        client.submit_payload(other)
        found = reconcile(client, entry)
    assert found is not None and found.id == first.id
    assert ledger.read(entry.request_key) == entry  # reconcile itself writes nothing


def test_fingerprint_ignores_echoed_defaults() -> None:
    sent = {"image": "https://x/a.png", "prompt": "p", "seed": 3}
    echoed = {
        **sent,
        "duration": 5,
        "negative_prompt": "",
        "loras": [],
        "high_noise_loras": [],
        "low_noise_loras": [],
    }
    assert input_fingerprint(sent) == input_fingerprint(echoed)
    assert input_fingerprint(sent) != input_fingerprint({**sent, "seed": 4})
    assert input_fingerprint({"prompt": "no image"}) is None


def test_submit_refused_with_5xx_is_resubmitted_after_history_check(
    make_stack: Callable[..., Stack],
) -> None:
    """A 503 on submit is ambiguous; once history confirms no task exists, it is sent again."""
    stack = make_stack(faults={"script": {"submit": ["503"]}})
    out = run_video(req("refused-5xx"), options=FAST)
    assert out.status == "archived"
    stats = stack.stats()
    assert stats["submissions"] == 1 and stats["history_queries"] >= 4
