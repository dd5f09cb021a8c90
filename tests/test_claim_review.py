"""Review of the cross-machine claim: interleavings that pay twice or lose a reservation.

Each test stages the interleaving by writing ledger records itself (as an older release or
another machine would) or with emulator faults, against the real emulator and SeaweedFS.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.test_flows import req
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.core.budget import Budget
from wan_tasks.core.identity import derive_seed, legacy_request_key, request_key
from wan_tasks.core.ledger import LedgerEntry, S3Ledger, input_fingerprint
from wan_tasks.core.submit import submit_once
from wan_tasks.errors import SubmissionUncertainError
from wan_tasks.storage.place import S3Place

REPO = Path(__file__).resolve().parents[1]


def _ledger(stack: Stack, s3_store: Any) -> S3Ledger:
    return S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_r/{uuid.uuid4().hex}")
    )


def _legacy_entry(key: str, model: str, payload: dict[str, Any], **kw: Any) -> LedgerEntry:
    """A record as a release before claims wrote it: no owner, no lease."""
    fingerprint = input_fingerprint(payload)
    assert fingerprint is not None
    fields: dict[str, Any] = {
        "request_key": key,
        "model": model,
        "intent_at": datetime.now(UTC),
        "input_fingerprint": fingerprint,
        "payload": payload,
    }
    return LedgerEntry(**(fields | kw))


def test_a_transient_error_checking_a_legacy_prediction_does_not_pay_again(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    """An older release recorded a paid prediction under the legacy key. The upgrade checks
    it with a GET; a 503 on that GET is not "the prediction is gone"."""
    stack = make_stack()
    ledger = _ledger(stack, s3_store)
    request = derive_seed(req("legacy-503"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        payload = client.prepare(request)
        paid = client.submit_payload(payload)  # the older release's submit
        legacy = legacy_request_key(request, model=client.ops.model)
        assert ledger.create(
            _legacy_entry(
                legacy,
                client.ops.model,
                payload,
                prediction_id=paid.id,
                submitted_at=datetime.now(UTC),
            )
        )
        stack.emulator.set_faults({"script": {"result": ["503"] * 8}})
        try:
            got = submit_once(client, request, ledger=ledger, settle_s=(0.2,))
        except Exception:
            got = None  # failing loudly is acceptable; paying again is not
    assert stack.stats()["submissions"] == 1
    assert got is None or got.prediction_id == paid.id


def test_a_legacy_intent_without_an_id_is_reconciled_before_submitting(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    """An older release wrote its intent, its POST created the task, and it died before it
    recorded the id. The upgrade must search the history, not submit blind."""
    stack = make_stack()
    ledger = _ledger(stack, s3_store)
    request = derive_seed(req("legacy-intent"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        payload = client.prepare(request)
        legacy = legacy_request_key(request, model=client.ops.model)
        assert ledger.create(_legacy_entry(legacy, client.ops.model, payload))
        paid = client.submit_payload(payload)  # the older release's POST, answer never recorded
        got = submit_once(client, request, ledger=ledger, settle_s=(0.2,))
    assert stack.stats()["submissions"] == 1
    assert got.prediction_id == paid.id


def test_a_cancel_mid_post_keeps_the_budget_reservation(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    """Ctrl-C (or a cancel) while the POST is in flight: the task may exist and be billed
    (here it does), so the budget must still count it, as for a lost answer."""
    stack = make_stack(faults={"script": {"submit": ["slow"]}, "slow_s": 4.0})
    ledger = _ledger(stack, s3_store)
    request = derive_seed(req("cancel-mid-post"))
    budget = Budget(100)
    arrived = threading.Event()

    def interrupt_when_the_post_arrives() -> None:
        while stack.stats()["faults_injected"] < 1:
            time.sleep(0.05)
        arrived.set()
        os.kill(os.getpid(), signal.SIGINT)

    # Ctrl-C as a terminal delivers it, whatever this process inherited: a test run started
    # in the background from a script (`cmd &`, nohup) inherits SIGINT ignored, and the
    # POST then simply finished.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
            client.prepare(request)  # uploads first: the interrupt must land in the POST
            killer = threading.Thread(target=interrupt_when_the_post_arrives, daemon=True)
            killer.start()
            with pytest.raises(KeyboardInterrupt):
                submit_once(client, request, ledger=ledger, budget=budget)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert arrived.is_set()
    while stack.stats()["submissions"] < 1:  # the service goes on and creates the task
        time.sleep(0.1)
    assert budget.spent == request.cost_usd


@pytest.mark.timeout(180)
def test_a_claim_is_not_taken_over_while_its_owners_post_is_in_flight(
    make_stack: Callable[..., Stack], s3_store: Any, tmp_path: Path
) -> None:
    """Machine A (a process with WAN_TASKS_CLAIM_LEASE_S=5, a legal setting) claims and
    POSTs; the service takes longer than the lease to answer. Machine B comes by after the
    lease ran out, while A's POST is still in flight: B must not pay a second time."""
    stack = make_stack(faults={"script": {"submit": ["slow"]}, "slow_s": 25.0})
    place = S3Place(bucket=stack.bucket, prefix=f"_r/{uuid.uuid4().hex}")
    ledger = S3Ledger(s3_store.boto3_client(), place)
    request = derive_seed(req("lease-shorter-than-post"))
    script = tmp_path / "machine_a.py"
    script.write_text(
        "import json, sys\n"
        "import boto3\n"
        "from wan_tasks.api.client import WaveSpeedClient\n"
        "from wan_tasks.api.models import I2VRequest\n"
        "from wan_tasks.core.ledger import S3Ledger\n"
        "from wan_tasks.core.submit import submit_once\n"
        "from wan_tasks.storage.place import S3Place\n"
        "cfg = json.loads(sys.argv[1])\n"
        "s3 = boto3.client('s3', **cfg['s3'])\n"
        "ledger = S3Ledger(s3, S3Place(bucket=cfg['bucket'], prefix=cfg['prefix']))\n"
        "request = I2VRequest.model_validate(cfg['request'])\n"
        "with WaveSpeedClient(cfg['key'], cfg['url']) as client:\n"
        "    got = submit_once(client, request, ledger=ledger, settle_s=(0.2,))\n"
        "print(got.prediction_id)\n"
    )
    import json

    cfg = {
        "s3": {
            "endpoint_url": s3_store.endpoint_url,
            "region_name": s3_store.region,
            "aws_access_key_id": s3_store.access_key_id,
            "aws_secret_access_key": s3_store.secret_access_key,
        },
        "bucket": stack.bucket,
        "prefix": place.prefix,
        "request": request.model_dump(mode="json"),
        "key": stack.emulator.api_key,
        "url": stack.emulator.base_url,
    }
    env = {k: v for k, v in os.environ.items()} | {
        "WAN_TASKS_CLAIM_LEASE_S": "5",
        "PYTHONPATH": str(REPO),
    }
    a = subprocess.Popen(
        [sys.executable, str(script), json.dumps(cfg)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
            key = request_key(request, service=client.service_id)
            # A's POST has reached the service (it is answering slowly) ...
            while stack.stats()["faults_injected"] < 1:
                assert a.poll() is None, a.communicate()
                time.sleep(0.1)
            claim = ledger.read(key)
            assert claim is not None and claim.lease_until is not None
            assert claim.prediction_id is None and claim.pid == a.pid
            # ... and the configured lease has run out; A is alive, waiting for the answer.
            while datetime.now(UTC) < claim.intent_at + timedelta(seconds=5.5):
                time.sleep(0.1)
            assert stack.stats()["submissions"] == 0 and a.poll() is None
            # B giving up (the claim stays A's) is acceptable; B paying again is not.
            with contextlib.suppress(SubmissionUncertainError):
                submit_once(client, request, ledger=ledger, settle_s=(0.2,), claim_wait_s=1.0)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    assert a.returncode == 0, err
    assert stack.stats()["submissions"] == 1, err
