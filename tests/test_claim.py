"""The ledger's claim: one request, many machines, one payment.

The claim is a conditional create (S3 If-None-Match) of the request key's record, with an
owner and a lease; every later write is a compare-and-swap (If-Match). These tests drive it
against the real SeaweedFS and the emulator: exclusive creates under a race, a live claim of
another machine waited for (no second POST), dead and expired owners taken over and
reconciled, refusals that give the claim back, and two worker processes with separate Prefect
homes running one manifest at the same moment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Stack
from tests.test_flows import req, write_manifest
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.core.identity import derive_seed, request_key
from wan_tasks.core.ledger import FileLedger, Ledger, LedgerEntry, S3Ledger, input_fingerprint
from wan_tasks.core.submit import submit_once
from wan_tasks.devstack.processes import ManagedProcess
from wan_tasks.errors import InvalidRequestError
from wan_tasks.flows.models import BatchReport
from wan_tasks.storage.place import S3Place

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["s3", "file"])
def ledger(request: pytest.FixtureRequest, s3_store: Any, tmp_path: Path) -> Ledger:
    if request.param == "file":
        return FileLedger(tmp_path / "ledger")
    from tests.conftest import TEST_BUCKET

    place = S3Place(bucket=TEST_BUCKET, prefix=f"_claims/{uuid.uuid4().hex[:8]}")
    return S3Ledger(s3_store.boto3_client(), place)


def entry_for(key: str, **kw: Any) -> LedgerEntry:
    payload = {"prompt": "p", "image": "https://example.com/a.png", "seed": 1}
    fingerprint = input_fingerprint(payload)
    assert fingerprint is not None
    fields: dict[str, Any] = {
        "request_key": key,
        "model": "m",
        "intent_at": datetime.now(UTC),
        "input_fingerprint": fingerprint,
        "payload": payload,
    }
    return LedgerEntry(**(fields | kw))


def test_only_one_of_many_racing_creates_wins(ledger: Ledger) -> None:
    for round in range(5):
        key = f"race-{round}-{uuid.uuid4().hex[:6]}"
        barrier = threading.Barrier(8)
        won: list[LedgerEntry] = []

        def create(
            i: int,
            key: str = key,
            barrier: threading.Barrier = barrier,
            won: list[LedgerEntry] = won,
        ) -> None:
            barrier.wait()
            got = ledger.create(entry_for(key, item_id=f"writer-{i}"))
            if got is not None:
                won.append(got)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1
        stored = ledger.read(key)
        assert stored is not None and stored.item_id == won[0].item_id


def test_a_stale_version_cannot_overwrite(ledger: Ledger) -> None:
    first = ledger.create(entry_for("cas"))
    assert first is not None and first.version
    second = ledger.replace(first.model_copy(update={"item_id": "b"}), expected=first)
    assert second is not None and second.version != first.version
    # `first` is what a slower writer read before `second` landed: its write is refused.
    assert ledger.replace(first.model_copy(update={"item_id": "c"}), expected=first) is None
    stored = ledger.read("cas")
    assert stored is not None and stored.item_id == "b"


def _counting_reads(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    read = ledger.read

    def counted(request_key: str) -> LedgerEntry | None:
        reads.append(request_key)
        return read(request_key)

    monkeypatch.setattr(ledger, "read", counted)
    return reads


def test_the_archive_is_recorded_over_the_record_just_read_without_reading_it_again(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_tasks.core.ledger import ArchivedAt

    key = f"known-{uuid.uuid4().hex[:6]}"
    assert ledger.create(entry_for(key, prediction_id="p1")) is not None
    known = ledger.read(key)
    where = ArchivedAt(bucket="b", key="v/p1.mp4", sha256="ab" * 32, size=10)
    reads = _counting_reads(ledger, monkeypatch)
    ledger.record_archived(key, where, known=known)
    assert reads == []  # the archive task read it a moment ago: no second read
    stored = ledger.read(key)
    assert stored is not None and stored.archived == where and stored.prediction_id == "p1"


def test_a_record_changed_since_it_was_read_is_read_again_and_loses_nothing(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_tasks.core.ledger import ArchivedAt

    key = f"stale-{uuid.uuid4().hex[:6]}"
    first = ledger.create(entry_for(key))
    assert first is not None
    known = ledger.read(key)
    # Another writer lands meanwhile: the known version is stale.
    assert ledger.record_prediction(first, "p2") is not None
    where = ArchivedAt(bucket="b", key="v/p2.mp4", sha256="cd" * 32, size=11)
    reads = _counting_reads(ledger, monkeypatch)
    ledger.record_archived(key, where, known=known)
    assert reads == [key]
    stored = ledger.read(key)
    assert stored is not None and stored.archived == where and stored.prediction_id == "p2"


class _Waiting(logging.Handler):
    """Sets `seen` when the submit says it is waiting for another owner's claim."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for its prediction id" in record.getMessage():
            self.seen.set()


@pytest.fixture
def waiting_log() -> Iterator[tuple[logging.Logger, _Waiting]]:
    log = logging.getLogger(f"test-claim-{uuid.uuid4().hex[:6]}")
    handler = _Waiting()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield log, handler
    log.removeHandler(handler)


def foreign_claim(ledger: Ledger, key: str, payload: dict[str, Any], **kw: Any) -> LedgerEntry:
    """A claim as another machine writes it."""
    fingerprint = input_fingerprint(payload)
    assert fingerprint is not None
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "request_key": key,
        "model": "wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast",
        "intent_at": now,
        "input_fingerprint": fingerprint,
        "payload": payload,
        "host": "worker-b",
        "pid": 4242,
        "boot_id": "another-machine",
        "lease_until": now + timedelta(seconds=600),
    }
    created = ledger.create(LedgerEntry(**(fields | kw)))
    assert created is not None
    return created


def test_a_live_claim_of_another_machine_is_waited_for_not_paid_again(
    make_stack: Callable[..., Stack],
    s3_store: Any,
    waiting_log: tuple[logging.Logger, _Waiting],
) -> None:
    """Machine B finds machine A's live claim without an id: B sends nothing, waits, and
    reconnects to the prediction A records."""
    stack = make_stack()
    log, waiting = waiting_log
    ledger = S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_c/{uuid.uuid4().hex}")
    )
    request = derive_seed(req("claimed-elsewhere"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        key = request_key(request, service=client.service_id)
        payload = client.prepare(request)
        theirs = foreign_claim(ledger, key, payload)
        result: list[Any] = []
        b = threading.Thread(
            target=lambda: result.append(submit_once(client, request, ledger=ledger, log=log))
        )
        b.start()
        while not waiting.seen.is_set() and b.is_alive():
            waiting.seen.wait(0.1)
        assert waiting.seen.is_set(), "machine B did not wait for machine A's claim"
        # Machine A's submit lands now, and it records its id.
        accepted = client.submit_payload(payload)
        assert ledger.record_prediction(theirs, accepted.id) is not None
        b.join(timeout=120)
    assert not b.is_alive()
    assert result[0].prediction_id == accepted.id
    assert stack.stats()["submissions"] == 1


def test_an_expired_claim_is_taken_over_and_reconciled_first(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    """Machine A died after its POST was accepted; its lease ran out. B takes the claim over
    and finds A's task in the history: nothing is paid twice, and the record is B's now."""
    stack = make_stack()
    ledger = S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_c/{uuid.uuid4().hex}")
    )
    request = derive_seed(req("expired-elsewhere"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        key = request_key(request, service=client.service_id)
        payload = client.prepare(request)
        past = datetime.now(UTC) - timedelta(seconds=30)
        foreign_claim(ledger, key, payload, intent_at=past, lease_until=past)
        accepted = client.submit_payload(payload)  # A's POST, answered after A was gone
        got = submit_once(client, request, ledger=ledger, settle_s=(0.2,))
    assert got.prediction_id == accepted.id
    assert stack.stats()["submissions"] == 1 and stack.stats()["history_queries"] >= 1
    stored = ledger.read(key)
    assert stored is not None and stored.prediction_id == accepted.id
    assert stored.pid == os.getpid()


def test_a_dead_owner_on_this_machine_is_not_waited_for(
    make_stack: Callable[..., Stack],
    s3_store: Any,
    waiting_log: tuple[logging.Logger, _Waiting],
) -> None:
    """A claim of a process on this machine that is gone (kill -9) is taken over at once,
    although its lease has an hour to run."""
    stack = make_stack()
    log, waiting = waiting_log
    ledger = S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_c/{uuid.uuid4().hex}")
    )
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(gone.stdout)
    from wan_tasks.core import ledger as ledger_module

    request = derive_seed(req("dead-owner"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        key = request_key(request, service=client.service_id)
        foreign_claim(
            ledger,
            key,
            client.prepare(request),
            host=ledger_module._HOST,
            boot_id=ledger_module._BOOT_ID,
            pid=dead_pid,
            lease_until=datetime.now(UTC) + timedelta(hours=1),
        )
        got = submit_once(
            client, request, ledger=ledger, settle_s=(0.2,), log=log, claim_wait_s=2.0
        )
    assert not waiting.seen.is_set()
    assert stack.stats()["submissions"] == 1
    stored = ledger.read(key)
    assert stored is not None and stored.prediction_id == got.prediction_id


def test_a_refused_submit_gives_its_claim_back(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    """A 400 created nothing: the claim is released at once (a waiter elsewhere goes on
    without waiting out the lease), and the next taker does not search the history."""
    stack = make_stack(faults={"script": {"submit": ["error_code:400"]}})
    ledger = S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_c/{uuid.uuid4().hex}")
    )
    request = derive_seed(req("refused-once"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        key = request_key(request, service=client.service_id)
        with pytest.raises(InvalidRequestError):
            submit_once(client, request, ledger=ledger)
        stored = ledger.read(key)
        assert stored is not None and stored.released and stored.owner_gone()
        before = stack.stats()["history_queries"]
        got = submit_once(client, request, ledger=ledger)
    assert stack.stats()["submissions"] == 1
    assert stack.stats()["history_queries"] == before
    stored = ledger.read(key)
    assert stored is not None and stored.prediction_id == got.prediction_id


def test_the_submit_time_is_the_services_answer_not_the_ledgers_write(
    make_stack: Callable[..., Stack], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first poll is aimed from `submitted_at`: taken after the ledger's record of the
    id, every first poll came that write's round trip late. It is the time the POST was
    answered: after the answer, before the write; the ledger records the same time."""
    stack = make_stack()
    ledger = FileLedger(tmp_path / "ledger")
    answers: list[datetime] = []
    writes: list[datetime] = []
    submit, record = WaveSpeedClient.submit_payload, ledger.record_prediction

    def submit_payload(self: WaveSpeedClient, *args: Any, **kw: Any) -> Any:
        prediction = submit(self, *args, **kw)
        answers.append(datetime.now(UTC))
        return prediction

    def recording(entry: LedgerEntry, prediction_id: str, **kw: Any) -> LedgerEntry | None:
        writes.append(datetime.now(UTC))
        return record(entry, prediction_id, **kw)

    monkeypatch.setattr(WaveSpeedClient, "submit_payload", submit_payload)
    monkeypatch.setattr(ledger, "record_prediction", recording)
    request = derive_seed(req("answered-at"))
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        got = submit_once(client, request, ledger=ledger)
        key = request_key(request, service=client.service_id)
    assert len(answers) == len(writes) == 1
    assert answers[0] <= got.submitted_at <= writes[0]
    stored = ledger.read(key)
    assert stored is not None and stored.submitted_at == got.submitted_at


def test_threads_of_one_process_submit_one_request_once(
    make_stack: Callable[..., Stack], s3_store: Any
) -> None:
    stack = make_stack(faults={"script": {"submit": ["slow"]}, "slow_s": 1.0})
    ledger = S3Ledger(
        s3_store.boto3_client(), S3Place(bucket=stack.bucket, prefix=f"_c/{uuid.uuid4().hex}")
    )
    request = derive_seed(req("four-threads"))
    ids: list[str] = []
    with WaveSpeedClient(stack.emulator.api_key, stack.emulator.base_url) as client:
        barrier = threading.Barrier(4)

        def go() -> None:
            barrier.wait()
            ids.append(submit_once(client, request, ledger=ledger).prediction_id)

        threads = [threading.Thread(target=go) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert len(ids) == 4 and len(set(ids)) == 1
    assert stack.stats()["submissions"] == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_workers_with_separate_prefect_homes_pay_once(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    """Issue 13's hostile run: two worker processes, each with its own Prefect home (own
    locks, own local cache), one bucket, one manifest, started at the same moment. Every
    item is submitted once and archived."""
    from prefect.settings import get_current_settings

    # Each worker's first uploads (the local image, before its submits) answer after 4 s, so
    # both workers read the ledger before either has written to it, whichever starts first.
    stack = make_stack(
        in_flight=6,
        latency_s=1.0,
        concurrency=12,
        faults={"script": {"upload": ["slow"] * 12}, "slow_s": 4.0},
    )
    items = [
        {"id": f"w{i}", "prompt": f"two workers {i}", "image": str(req("x").image)}
        for i in range(6)
    ]
    manifest = write_manifest(tmp_path / "shared.jsonl", items)  # type: ignore[arg-type]
    options = '{"poll": {"first_poll_after": 0.5, "min_interval": 0.3, "max_interval": 1.0}}'
    api_url = str(get_current_settings().api.url)
    procs: list[ManagedProcess] = []
    try:
        for name in ("a", "b"):
            home = tmp_path / f"home-{name}"
            home.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
            env |= {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url, "PYTHONPATH": str(REPO)}
            procs.append(
                ManagedProcess(
                    f"worker {name}",
                    [
                        sys.executable,
                        "-m",
                        "reliability.batch_child",
                        manifest,
                        options,
                        str(tmp_path / f"report-{name}.json"),
                    ],
                    log=tmp_path / f"worker-{name}.log",
                    env=env,
                    cwd=REPO,
                )
            )
        codes = [proc.wait(timeout=480) for proc in procs]
    finally:
        for proc in procs:
            proc.stop()
    logs = "\n".join(proc.tail() for proc in procs)
    assert codes == [0, 0], logs
    assert stack.stats()["submissions"] == 6, logs
    reports = [
        BatchReport.model_validate_json((tmp_path / f"report-{n}.json").read_text()) for n in "ab"
    ]
    landed = [{o.item_id: (o.prediction_id, o.s3_uri) for o in r.outcomes} for r in reports]
    assert all(r.archived == 6 for r in reports)
    # Both workers name the same prediction and the same archived object for every item.
    assert landed[0] == landed[1]
    for _, uri in landed[0].values():
        assert uri is not None
        stack.object(uri)  # it is there


def test_the_dry_run_tells_a_claim_being_submitted_from_one_that_created_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """A live claim of another machine costs this run nothing (it will reconnect); a claim
    given back after a refusal is priced as new."""
    from wan_tasks.cli.dryrun import _service_id, plan_batch
    from wan_tasks.core.ledger import DEFAULT_LEDGER_PREFIX
    from wan_tasks.core.manifest import ManifestItem
    from wan_tasks.integration.runtime import open_ledger

    ledger = open_ledger(S3Place(bucket=stack.bucket, prefix=DEFAULT_LEDGER_PREFIX))
    items = [
        ManifestItem(item_id=name, row=i + 1, request=req(f"dry {name}"), error=None)
        for i, name in enumerate(("busy", "refused"))
    ]
    for item in items:
        assert item.request is not None
        request = derive_seed(item.request, item.variant)
        key = request_key(request, service=_service_id())
        payload = {"prompt": request.prompt, "image": "https://example.com/a.png", "seed": 1}
        claim = foreign_claim(ledger, key, payload)
        if item.item_id == "refused":
            assert ledger.release(claim, created_nothing=True) is not None
    plan = {row.item.item_id: row for row in plan_batch(items, bucket=stack.bucket).rows}
    assert plan["busy"].status.startswith("being submitted now by worker-b pid 4242")
    assert plan["busy"].cost_usd == 0
    assert plan["refused"].status == "new" and plan["refused"].cost_usd > 0


def test_a_process_in_another_pid_namespace_has_another_owner_identity() -> None:
    """Containers sharing a host's network (so its hostname) and boot have pids of their
    own: a claim written in another pid namespace must never be judged by this namespace's
    pids. A process started in a new pid namespace (unshare) gets another identity."""
    import shutil

    from wan_tasks.core import ledger as ledger_module

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root to make a pid namespace")
    code = "from wan_tasks.core.ledger import _BOOT_ID, _HOST; print(_HOST, _BOOT_ID)"
    other = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.split()
    assert other[0] == ledger_module._HOST  # the same host name...
    assert other[1] != ledger_module._BOOT_ID  # ...but not the same pids
    lease = datetime.now(UTC) + timedelta(hours=1)
    theirs = entry_for("k", host=other[0], boot_id=other[1], pid=999_999, lease_until=lease)
    assert not theirs.owner_gone()  # its pid says nothing here: live until its lease ends


def test_the_settle_times_of_a_lost_answer_are_a_setting(
    make_emulator: Callable[..., Any],
    make_client: Callable[..., WaveSpeedClient],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """WAN_TASKS_RECONCILE_SETTLE_S (a JSON list) replaces the default 1, 3, 10 s; each history
    search of a lost answer waits its time first."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from wan_tasks import settings
    from wan_tasks.core import submit
    from wan_tasks.core.submit import RECONCILE_SETTLE_S

    monkeypatch.delenv("WAN_TASKS_RECONCILE_SETTLE_S")
    assert settings.current().reconcile_settle_s == RECONCILE_SETTLE_S == (1.0, 3.0, 10.0)
    for bad in ("[-1]", "[]", "[601]"):
        monkeypatch.setenv("WAN_TASKS_RECONCILE_SETTLE_S", bad)
        with pytest.raises(ValidationError, match="WAN_TASKS_RECONCILE_SETTLE_S"):
            settings.current()
    monkeypatch.setenv("WAN_TASKS_RECONCILE_SETTLE_S", "three")  # not JSON
    with pytest.raises(SettingsError, match="reconcile_settle_s"):
        settings.current()

    monkeypatch.setenv("WAN_TASKS_RECONCILE_SETTLE_S", "[0, 0.1]")
    waited: list[float] = []
    real_reconcile = submit.reconcile

    def reconcile(*args: Any, **kwargs: Any) -> Any:
        waited.append(kwargs["settle_s"])
        return real_reconcile(*args, **kwargs)

    monkeypatch.setattr(submit, "reconcile", reconcile)
    # The answer is lost: the first search (after 0 s) finds the task the POST created.
    emu = make_emulator(faults={"script": {"submit": ["drop"]}})
    ledger = FileLedger(tmp_path / "ledger")
    got = submit_once(make_client(emu), derive_seed(req("settle setting")), ledger=ledger)
    assert waited == [0.0] and emu.stats()["submissions"] == 1
    assert ledger.read(got.request_key).prediction_id == got.prediction_id  # type: ignore[union-attr]
