"""The durable submission ledger: never pay twice, across crashes, lost caches and machines.

Before a submit leaves the machine, the request key's record is *claimed*: created only if it
does not exist (S3's `If-None-Match: *`; a hard link on a local folder), carrying its owner
(host, boot, pid, flow run) and a lease. Right after the service answers, the *prediction id*
is written over the claim, only if the record is still the one this owner wrote (S3's
`If-Match` on the ETag). The record lives in durable storage that outlives the process and the
machine (the archive bucket; a local folder only for one machine). Every submit reads it first:

- a recorded prediction id: reconnect to it, no POST;
- a live claim of another owner (a second machine, or another thread, submitting the same
  request right now): wait for its prediction id and reconnect; nothing is sent;
- a claim whose owner is gone (a dead pid on this machine, or a lease that ran out) is taken
  over with a compare-and-swap, so exactly one taker goes on; it reconciles the earlier
  claim through the service's history (model, time window, exact input) before anything is
  resubmitted.

This follows Airflow's resumable jobs (store the remote job id before waiting; reconnect
instead of resubmitting), with the claim as the only coordination: no Redis, no lock server.
SeaweedFS and AWS S3 both honour If-None-Match and If-Match on PutObject (`wan-video check`
probes the bucket); a store that ignores them is refused by that probe, not trusted silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.models import I2VRequest, Prediction, PredictionStatus
from wan_tasks.errors import SubmissionUncertainError
from wan_tasks.redact import redact_payload
from wan_tasks.storage.place import S3Place

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

DEFAULT_LEDGER_PREFIX = "_wan-tasks/ledger"
# The service's clock and ours differ; and its history may show a task a little late.
CLOCK_SLACK = timedelta(minutes=2)


class ArchivedAt(BaseModel):
    """Where a request's video was archived: found again by any later run, whatever the key
    template (a content-addressed key cannot be derived without the bytes)."""

    bucket: str
    key: str
    sha256: str
    size: int


class LedgerEntry(BaseModel):
    """One request key's record: its claim (owner and lease), then its prediction id, then
    where its video was archived. `version` is the store's version of the record as read
    (an S3 ETag), never stored in it."""

    request_key: str
    model: str
    intent_at: datetime
    input_fingerprint: str
    payload: dict[str, Any]  # redacted copy, for people; matching uses the fingerprint
    prediction_id: str | None = None
    submitted_at: datetime | None = None
    item_id: str = ""
    seed: int | None = None
    flow_run_id: str | None = None
    host: str = ""
    pid: int = 0
    boot_id: str = Field(
        "", description="the owner's kernel boot: pids are only comparable within one"
    )
    lease_until: datetime | None = Field(
        None, description="the claim is the owner's until then (None: an older release's intent)"
    )
    released: bool = Field(False, description="the owner's submit ended without creating a task")
    archived: ArchivedAt | None = None
    _version: str | None = PrivateAttr(None)

    @property
    def version(self) -> str | None:
        return self._version

    def with_version(self, version: str | None) -> LedgerEntry:
        self._version = version
        return self

    def owned_here(self) -> bool:
        """The claim belongs to this process (an earlier attempt of it, or another thread)."""
        return (self.host, self.boot_id, self.pid) == (_HOST, _BOOT_ID, os.getpid())

    def owner_gone(self, now: datetime | None = None) -> bool:
        """Nobody will finish this claim: released, its lease ran out, an older release's
        intent (no lease), or its owner's process on this machine is dead."""
        if self.released or self.lease_until is None:
            return True
        if (now or datetime.now(UTC)) >= self.lease_until:
            return True
        same_machine = self.host == _HOST and self.boot_id and self.boot_id == _BOOT_ID
        return bool(same_machine) and not process_alive(self.pid)

    def owner(self) -> str:
        run = f", flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"{self.host or '?'} pid {self.pid}{run}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


_HOST = socket.gethostname()
# Pids are comparable only within one boot and one pid namespace: containers sharing a host's
# network (so its hostname) and boot have pids of their own, and a live claim of one must
# never look dead to another.
_BOOT_ID = f"{_boot_id()}/{_pid_namespace()}" if _boot_id() else ""


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def input_fingerprint(body: dict[str, Any]) -> str | None:
    """A fingerprint of a submitted body that survives the service echoing it back with
    defaults filled in (empty LoRA lists, blank negative prompt, default duration)."""
    try:
        canonical = I2VRequest.model_validate(
            {k: v for k, v in body.items() if k in I2VRequest.model_fields}
        ).to_payload()
    except (ValidationError, ValueError):
        return None
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class Ledger(ABC):
    """Where claims and prediction ids are kept. Implementations must be durable, and
    `create` and `replace` atomic against every other writer of the same store."""

    @abstractmethod
    def read(self, request_key: str) -> LedgerEntry | None:
        """The record with its `version` set, or None."""

    @abstractmethod
    def create(self, entry: LedgerEntry) -> LedgerEntry | None:
        """Write `entry` only if the key has no record: the written entry (version set), or
        None when another writer's record is already there."""

    @abstractmethod
    def replace(self, entry: LedgerEntry, *, expected: LedgerEntry) -> LedgerEntry | None:
        """Write `entry` only if the record is still `expected` (same version): the written
        entry, or None when someone changed it since (read it again)."""

    def claim(
        self,
        request_key: str,
        model: str,
        payload: dict[str, Any],
        *,
        item_id: str = "",
        seed: int | None = None,
        flow_run_id: str | None = None,
        lease_s: float = 300.0,
        over: LedgerEntry | None = None,
    ) -> LedgerEntry | None:
        """Claim `request_key` for this process until `lease_s` from now: create its record,
        or take `over` a record whose owner is gone. None: another writer got there first."""
        fingerprint = input_fingerprint(payload)
        if fingerprint is None:
            raise ValueError("cannot fingerprint the submit body")
        now = datetime.now(UTC)
        entry = LedgerEntry(
            request_key=request_key,
            model=model,
            intent_at=now,
            input_fingerprint=fingerprint,
            payload=redact_payload(payload),
            item_id=item_id,
            seed=seed,
            flow_run_id=flow_run_id,
            host=_HOST,
            pid=os.getpid(),
            boot_id=_BOOT_ID,
            lease_until=now + timedelta(seconds=lease_s),
            archived=over.archived if over is not None else None,
        )
        return self.create(entry) if over is None else self.replace(entry, expected=over)

    def record_intent(
        self,
        request_key: str,
        model: str,
        payload: dict[str, Any],
        *,
        item_id: str = "",
        seed: int | None = None,
        flow_run_id: str | None = None,
    ) -> LedgerEntry:
        """Claim `request_key`, whatever is there (tests and tools that stage a crash)."""
        current = self.read(request_key)
        entry = self.claim(
            request_key,
            model,
            payload,
            item_id=item_id,
            seed=seed,
            flow_run_id=flow_run_id,
            over=current,
        )
        if entry is None:
            raise SubmissionUncertainError(f"request {request_key[:12]}: claimed meanwhile")
        return entry

    def record_prediction(
        self, entry: LedgerEntry, prediction_id: str, *, at: datetime | None = None
    ) -> LedgerEntry | None:
        """Write the prediction id (submitted `at`; None: now) over this owner's claim. None:
        the claim was taken over meanwhile (its lease ran out); the caller reads what is there
        now."""
        done = entry.model_copy(
            update={
                "prediction_id": prediction_id,
                "submitted_at": at if at is not None else datetime.now(UTC),
            }
        )
        return self.replace(done, expected=entry)

    def release(self, entry: LedgerEntry, *, created_nothing: bool) -> LedgerEntry | None:
        """End this owner's claim now, so a waiter elsewhere need not wait out the lease.
        `created_nothing`: its submit certainly created no task (refused, or never sent), so
        the next taker need not search the history; else the taker reconciles first."""
        ended = entry.model_copy(
            update={"released": created_nothing, "lease_until": datetime.now(UTC)}
        )
        return self.replace(ended, expected=entry)

    def record_archived(
        self, request_key: str, archived: ArchivedAt, *, known: LedgerEntry | None = None
    ) -> None:
        """Note where the video of `request_key` landed (nothing when it has no entry).
        `known`: the record as the caller just read it (with its version), written over
        without reading it again; if it changed since, it is read and tried again."""
        entry = known if known is not None and known.version is not None else None
        for _ in range(CAS_ROUNDS):
            if entry is None:
                entry = self.read(request_key)
            if entry is None or entry.archived == archived:
                return
            if self.replace(entry.model_copy(update={"archived": archived}), expected=entry):
                return
            entry = None
        logger.warning("request %s: could not note its archive location", request_key[:12])


# A record rewritten by others between our read and our write is read again this many times.
CAS_ROUNDS = 8


class FileLedger(Ledger):
    """A local folder (fsync'd files, created with a hard link, replaced under a lock). For
    one machine only: a folder shared over NFS does not make `create` atomic across hosts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read(self, request_key: str) -> LedgerEntry | None:
        try:
            data = self._path(request_key).read_bytes()
        except FileNotFoundError:
            return None
        return LedgerEntry.model_validate_json(data).with_version(_digest(data))

    def _staged(self, entry: LedgerEntry) -> tuple[Path, bytes]:
        path = self._path(entry.request_key)
        data = entry.model_dump_json(indent=2).encode()
        # One staging file per writer thread: writers of one key never share it.
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp, data

    def create(self, entry: LedgerEntry) -> LedgerEntry | None:
        tmp, data = self._staged(entry)
        try:
            os.link(tmp, self._path(entry.request_key))  # fails if the record exists
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        return entry.model_copy().with_version(_digest(data))

    def replace(self, entry: LedgerEntry, *, expected: LedgerEntry) -> LedgerEntry | None:
        import fcntl

        path = self._path(entry.request_key)
        with open(path.with_suffix(".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return None
            if _digest(current) != expected.version:
                return None
            tmp, data = self._staged(entry)
            tmp.replace(path)
        return entry.model_copy().with_version(_digest(data))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3Ledger(Ledger):
    """One small JSON object per request key, at a place in S3 (by default the archive
    bucket, under `_wan-tasks/ledger`), created with If-None-Match and replaced with If-Match."""

    def __init__(self, s3: S3Client, place: S3Place) -> None:
        self.s3 = s3
        self.place = place
        self.bucket = place.bucket

    def _key(self, request_key: str) -> str:
        return self.place.key(f"{request_key}.json")

    def read(self, request_key: str) -> LedgerEntry | None:
        try:
            got = self.s3.get_object(Bucket=self.bucket, Key=self._key(request_key))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return LedgerEntry.model_validate_json(got["Body"].read()).with_version(got["ETag"])

    def create(self, entry: LedgerEntry) -> LedgerEntry | None:
        return self._put(entry, IfNoneMatch="*")

    def replace(self, entry: LedgerEntry, *, expected: LedgerEntry) -> LedgerEntry | None:
        if expected.version is None:
            return None
        return self._put(entry, IfMatch=expected.version)

    def _put(self, entry: LedgerEntry, **condition: str) -> LedgerEntry | None:
        import base64

        body = entry.model_dump_json(indent=2).encode()
        for round in range(CAS_ROUNDS):
            try:
                put = self.s3.put_object(
                    Bucket=self.bucket,
                    Key=self._key(entry.request_key),
                    Body=body,
                    ContentType="application/json",
                    ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
                    **condition,  # type: ignore[arg-type]
                )
            except ClientError as exc:
                code = _code(exc)
                if code in ("PreconditionFailed", "412"):
                    return None  # someone else's record is there (or it changed)
                if code in ("ConditionalRequestConflict", "409") and round + 1 < CAS_ROUNDS:
                    # S3: a conflicting conditional write is in flight; its outcome decides.
                    time.sleep(0.05 * (round + 1))
                    continue
                raise
            return entry.model_copy().with_version(put["ETag"])
        return None


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


# The service's history is searched page by page until a page comes back empty (a short
# page is not proof of the end: the service may cap page_size below what was asked); a window
# that cannot be covered in this many pages is an uncertain answer, never "no such task".
HISTORY_PAGE_SIZE = 100
MAX_HISTORY_PAGES = 2000


def _preference(prediction: Prediction) -> int:
    """Completed first (a paid video to archive), then live, then failed or gone."""
    if prediction.status is PredictionStatus.COMPLETED:
        return 0
    if not prediction.status.is_terminal:
        return 1
    return 2


def reconcile(
    client: WaveSpeedClient,
    entry: LedgerEntry,
    *,
    settle_s: float = 0.0,
    exclude: Collection[str] = (),
    max_pages: int = MAX_HISTORY_PAGES,
) -> Prediction | None:
    """Find the task an intent created, through the service's history.

    Matches the model, a window from the intent (minus clock slack) to now, and the exact
    input. Tasks in `exclude` belong to other attempts of the same request (a deliberate
    resubmission sends the same body again) and never match. Of several matches (an earlier
    uncontrolled retry), a completed task wins over a live one and a live one over a failed
    one; then the earliest. Returns None only when the whole window was searched and holds no
    such task; raises SubmissionUncertainError when it could not be searched to its end.
    `settle_s` waits first, for a history that lags behind submissions.
    """
    if settle_s:
        time.sleep(settle_s)
    after = (entry.intent_at - CLOCK_SLACK).isoformat()
    before = (datetime.now(UTC) + CLOCK_SLACK).isoformat()
    matches: list[Prediction] = []
    seen: set[str] = set()
    for page in range(1, max_pages + 1):
        result = client.history(
            created_after=after,
            created_before=before,
            model=entry.model,
            page=page,
            page_size=HISTORY_PAGE_SIZE,
        )
        fresh = [item for item in result.items if item.id not in seen]
        if not fresh:  # an empty page (or one repeating the last): the window is covered
            break
        for item in fresh:
            seen.add(item.id)
            if (
                item.id not in exclude
                and item.input is not None
                and input_fingerprint(item.input) == entry.input_fingerprint
            ):
                matches.append(item)
    else:
        raise SubmissionUncertainError(
            f"request {entry.request_key[:12]}: the service's history from {after} holds more "
            f"than {max_pages} pages; could not tell whether the submit created a task, so "
            "nothing was sent again. Re-run later, or reconcile by hand."
        )
    if not matches:
        return None
    latest = datetime.max.replace(tzinfo=UTC)
    matches.sort(key=lambda p: (_preference(p), p.created_at or latest))
    if len(matches) > 1:
        logger.warning(
            "request %s matches %d tasks in history (%s): using %s (%s)",
            entry.request_key[:12],
            len(matches),
            ", ".join(m.id for m in matches),
            matches[0].id,
            matches[0].status.value,
        )
    return matches[0]
