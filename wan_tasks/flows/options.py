"""Flow parameters, as pydantic models so the Prefect UI renders them as forms."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from wan_tasks.api.policies import PollPolicy
from wan_tasks.core.ledger import DEFAULT_LEDGER_PREFIX
from wan_tasks.flows.cancel import OnCancel
from wan_tasks.integration.limits import LimitSettings
from wan_tasks.storage.keys import DEFAULT_TEMPLATE, validate_template

# Prefect's artifact key rule: lowercase letters, digits and dashes.
ARTIFACT_KEY_PATTERN = r"^[a-z0-9-]+$"
DEFAULT_ARTIFACT_KEY = "wan-videos"


class ArchiveOptions(BaseModel):
    """Where the videos go. `bucket` empty: $WAN_TASKS_BUCKET, else the embedded store."""

    model_config = ConfigDict(extra="forbid")

    bucket: str | None = None
    s3_block: str | None = Field(
        None, description="a saved prefect-aws S3Bucket block (bucket and credentials)"
    )
    prefix: str = "videos"
    key_template: str = Field(
        DEFAULT_TEMPLATE,
        description="fields: "
        + ", ".join(
            [
                "prefix",
                "model_slug",
                "date",
                "prediction_id",
                "seed",
                "sha256",
                "item_id",
                "duration",
            ]
        ),
    )
    presign_expiry_s: int = Field(
        3600,
        ge=60,
        le=7 * 24 * 3600,
        description="lifetime of the links in the results and artifacts (default 1 h)",
    )
    contact_sheet: bool = True

    def model_post_init(self, __context: object) -> None:
        validate_template(self.key_template)


class RunOptions(BaseModel):
    """How the videos are made."""

    model_config = ConfigDict(extra="forbid")

    credentials_block: str | None = Field(
        None, description="name of a saved WaveSpeedCredentials block; empty: the environment"
    )
    wait_timeout_s: float = Field(1800.0, gt=0)
    poll: PollPolicy = Field(default_factory=PollPolicy)
    max_attempts: int = Field(
        2,
        ge=1,
        le=5,
        description="submissions per video when the service fails a task with 5000/5003/5004",
    )
    budget_usd: Decimal | None = Field(None, ge=0, description="cap on new spend per flow run")
    limits: LimitSettings = Field(default_factory=LimitSettings)
    ledger: bool = Field(
        True, description="record intents and prediction ids in the archive bucket"
    )
    ledger_prefix: str = Field(DEFAULT_LEDGER_PREFIX, min_length=1)
    artifact_key: str = Field(
        DEFAULT_ARTIFACT_KEY,
        pattern=ARTIFACT_KEY_PATTERN,
        max_length=200,
        description="key of the run's table artifact (the contact sheets: {key}-sheets); one "
        "per deployment keeps each one's history apart. Lowercase letters, digits, dashes",
    )
    allow_resubmit_expired: bool = Field(
        False,
        description="pay again for a video whose output expired (7 days) before it was archived",
    )
    on_cancel: OnCancel = Field(
        "detach",
        description="when the flow run is cancelled: 'detach' keeps predictions already paid "
        "for (archived when done, or by the next run through the ledger); 'cancel_remote' "
        "cancels them at the service",
    )
    tag_task_runs: bool = Field(
        False,
        description="tag each video's task runs batch:<manifest> and item:<id> (their names "
        "already say which item they work on). Off by default: a tagged task run costs two "
        "Prefect API writes (its tag-limit check) and a tag per item floods the UI's tags",
    )
    output_lifetime_s: float = Field(
        7 * 24 * 3600.0,
        ge=0,
        description="how long the service keeps outputs; a 404 on a younger one is retried, "
        "never taken for an expired output",
    )
