"""`wan-video batch FILE --dry-run`: what a batch would do and cost, without doing it.

Nothing here talks to the WaveSpeed service or starts a server. Each valid row's request key
(the one `submit-i2v` caches on) is looked up where earlier runs leave a trace: the submission
ledger in the bucket, when a store is configured and answers, and this machine's Prefect result
storage (the task cache). A row found in either costs nothing; a row neither can vouch for is
priced as new, so the bill is an upper bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from wan_tasks.core.identity import derive_seed, request_key
from wan_tasks.core.ledger import DEFAULT_LEDGER_PREFIX, S3Ledger
from wan_tasks.core.manifest import ManifestItem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedRow:
    item: ManifestItem
    cost_usd: Decimal  # what this run would pay for it
    status: str  # "new", "duplicate of <id>", "submitted before (...)", "cached", "invalid"


@dataclass(frozen=True)
class Plan:
    rows: list[PlannedRow]
    ledger: str  # where the ledger was read, or why it was not

    @property
    def bill_usd(self) -> Decimal:
        return sum((r.cost_usd for r in self.rows), Decimal("0"))


def _result_storage() -> Path | None:
    try:
        from prefect.settings import get_current_settings

        return Path(get_current_settings().results.local_storage_path)
    except Exception:  # no usable Prefect settings: the cache is simply not consulted
        logger.debug("no Prefect result storage", exc_info=True)
        return None


def _open_ledger(bucket: str | None, ledger_prefix: str) -> tuple[S3Ledger | None, str]:
    if not bucket:
        return None, (
            "unknown: no store configured (WAN_TASKS_BUCKET or --bucket); the "
            "embedded store is not started for a dry run"
        )
    from wan_tasks.integration.runtime import s3_client
    from wan_tasks.storage.place import S3Place

    place = S3Place(bucket=bucket, prefix=ledger_prefix)
    return S3Ledger(s3_client(), place), f"s3://{bucket}/{ledger_prefix}/"


def _service_id() -> str:
    """The identity the batch would run under: the configured key, else the embedded
    emulator's (nothing is started for a dry run)."""
    from wan_tasks import settings
    from wan_tasks.api.config import resolve_base_url, service_fingerprint
    from wan_tasks.devstack.embedded import embedded_service_id

    key = settings.current().api_key
    if key is None:
        return embedded_service_id()
    return service_fingerprint(resolve_base_url(None), key)


def plan_batch(
    items: list[ManifestItem], *, bucket: str | None, ledger_prefix: str = DEFAULT_LEDGER_PREFIX
) -> Plan:
    ledger, where = _open_ledger(bucket, ledger_prefix)
    storage = _result_storage()
    service = _service_id()
    first_of: dict[str, str] = {}
    rows: list[PlannedRow] = []
    for item in items:
        if item.request is None:
            rows.append(PlannedRow(item, Decimal("0"), "invalid"))
            continue
        request = derive_seed(item.request, item.variant)
        key = request_key(request, service=service)
        if key in first_of:  # identical requests submit once
            rows.append(PlannedRow(item, Decimal("0"), f"same request as {first_of[key]}"))
            continue
        first_of[key] = item.item_id
        status = "new"
        if ledger is not None:
            try:
                entry = ledger.read(key)
            except Exception as exc:  # unreachable store: say so once, price as new
                where = f"unknown: the store did not answer ({type(exc).__name__}: {exc})"
                ledger = None
                entry = None
            if entry is not None and entry.prediction_id:
                status = f"submitted before (prediction {entry.prediction_id}; $0 unless it failed)"
            elif entry is not None and not entry.released:
                # A claim without an id: being submitted elsewhere right now, or a submit
                # that died mid-POST, which the next run reconciles before paying.
                status = (
                    f"being submitted now by {entry.owner()}"
                    if not entry.owner_gone()
                    else "submitted before (being reconciled)"
                )
        if status == "new" and storage is not None and (storage / f"wan-submit-{key}").exists():
            status = "cached"
        rows.append(PlannedRow(item, request.cost_usd if status == "new" else Decimal("0"), status))
    return Plan(rows, where)
