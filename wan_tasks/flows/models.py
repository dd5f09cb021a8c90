"""What the flows take and return."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from wan_tasks.api.models import I2VRequest
from wan_tasks.core.submit import SubmittedVideo
from wan_tasks.storage.archive import ArchiveResult

Status = Literal["archived", "failed", "invalid", "skipped"]


class VideoJob(BaseModel):
    request: I2VRequest
    item_id: str = ""
    variant: str = ""
    row: int | None = None


class VideoOutcome(BaseModel):
    """One row of a batch report (and of its JSONL summary)."""

    item_id: str
    status: Status
    row: int | None = None
    prediction_id: str | None = None
    seed: int | None = None
    cost_usd: Decimal = Decimal("0")
    s3_uri: str | None = None
    sidecar_uri: str | None = None
    presigned_url: str | None = None
    contact_sheet_uri: str | None = None
    sha256: str | None = None
    size: int | None = None
    already_archived: bool = False
    error_type: str | None = None
    error: str | None = None


class BatchReport(BaseModel):
    manifest: str
    total: int
    archived: int
    failed: int
    invalid: int
    skipped: int
    cost_usd: Decimal = Field(description="what the archived videos cost when made")
    new_spend_usd: Decimal = Field(
        description="what this run submitted (re-runs: 0), failed tasks included: the budget "
        "counts them until they are refunded"
    )
    refund_expected_usd: Decimal = Field(
        Decimal("0"),
        description="of new_spend_usd, what went to tasks the service failed; it refunds failed "
        "tasks (within about 3 h), so the charge that stays is new_spend_usd minus this",
    )
    summary_uri: str | None = None
    rate_limit_wait_s: float = Field(
        0.0, description="seconds slept on the service's 429s (Retry-After), summed over lanes"
    )
    outcomes: list[VideoOutcome] = Field(default_factory=list)


def archived_outcome(
    job: VideoJob, submitted: SubmittedVideo, archived: ArchiveResult
) -> VideoOutcome:
    return VideoOutcome(
        item_id=job.item_id,
        status="archived",
        row=job.row,
        prediction_id=submitted.prediction_id,
        seed=submitted.seed,
        cost_usd=submitted.cost_usd,
        s3_uri=archived.s3_uri,
        sidecar_uri=archived.sidecar_uri,
        presigned_url=archived.presigned_url,
        contact_sheet_uri=archived.contact_sheet_uri,
        sha256=archived.sha256,
        size=archived.size,
        already_archived=archived.already_archived,
    )
