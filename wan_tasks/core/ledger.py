"""The durable submission ledger: never pay twice, even across crashes and lost caches.

Before a submit leaves the machine, an *intent* is recorded under the request key; right after
the service answers, the *prediction id*. Both live in durable storage that outlives the process
and the machine (the archive bucket; a local folder only for tests and client-only use). Every
submit reads the ledger first:

- a recorded prediction id: reconnect to it, no POST;
- an intent without an id (the process died between the service accepting the task and the id
  being recorded, or the answer was lost): reconcile through the service's history, matching
  model, time window and the exact submitted input, before anything is resubmitted.

This follows Airflow's resumable jobs: store the remote job id before waiting; reconnect
instead of resubmitting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, ValidationError

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
    archived: ArchivedAt | None = None


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
    """Where intents and prediction ids are kept. Implementations must be durable."""

    @abstractmethod
    def read(self, request_key: str) -> LedgerEntry | None: ...

    @abstractmethod
    def write(self, entry: LedgerEntry) -> None: ...

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
        fingerprint = input_fingerprint(payload)
        if fingerprint is None:
            raise ValueError("cannot fingerprint the submit body")
        entry = LedgerEntry(
            request_key=request_key,
            model=model,
            intent_at=datetime.now(UTC),
            input_fingerprint=fingerprint,
            payload=redact_payload(payload),
            item_id=item_id,
            seed=seed,
            flow_run_id=flow_run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        self.write(entry)
        return entry

    def record_prediction(self, entry: LedgerEntry, prediction_id: str) -> LedgerEntry:
        done = entry.model_copy(
            update={"prediction_id": prediction_id, "submitted_at": datetime.now(UTC)}
        )
        self.write(done)
        return done

    def record_archived(self, request_key: str, archived: ArchivedAt) -> None:
        """Note where the video of `request_key` landed (nothing when it has no entry)."""
        entry = self.read(request_key)
        if entry is not None and entry.archived != archived:
            self.write(entry.model_copy(update={"archived": archived}))


class FileLedger(Ledger):
    """A local folder (fsync'd, atomically replaced files). For one machine only."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def read(self, request_key: str) -> LedgerEntry | None:
        path = self._path(request_key)
        if not path.exists():
            return None
        return LedgerEntry.model_validate_json(path.read_bytes())

    def write(self, entry: LedgerEntry) -> None:
        path = self._path(entry.request_key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            fh.write(entry.model_dump_json(indent=2).encode())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)


class S3Ledger(Ledger):
    """One small JSON object per request key, at a place in S3 (by default the archive
    bucket, under `_wan-tasks/ledger`)."""

    def __init__(self, s3: S3Client, place: S3Place) -> None:
        self.s3 = s3
        self.place = place
        self.bucket = place.bucket

    def _key(self, request_key: str) -> str:
        return self.place.key(f"{request_key}.json")

    def read(self, request_key: str) -> LedgerEntry | None:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(request_key))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return LedgerEntry.model_validate_json(body.read())

    def write(self, entry: LedgerEntry) -> None:
        import base64

        body = entry.model_dump_json(indent=2).encode()
        self.s3.put_object(
            Bucket=self.bucket,
            Key=self._key(entry.request_key),
            Body=body,
            ContentType="application/json",
            ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
        )


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
