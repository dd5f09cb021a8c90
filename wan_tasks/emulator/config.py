"""Emulator settings: account tiers, clocks, upload limits and the faults it can inject.

Faults come in three families, all set through `FaultPlan` (in `EmulatorConfig.faults`, with
`Emulator.set_faults()` or `POST /_emulator/faults`):

* Seeded rates (`FaultPlan.rates`): per request, or per task for task failures.
* One-shot script entries (`FaultPlan.script`), per endpoint (`submit`, `result`, `upload`,
  `download`, `cancel`, `delete`, `history`, `balance`, `models`, `pricing` or `any`), each
  used once, in order:

  - ``"429"``, ``"500"``, ``"502"``, ``"503"``: answer that HTTP status, do nothing.
  - ``"slow"``: answer after `slow_s` real seconds. ``"drop"``: close without answering (on
    submit: after the task was created and billed). On downloads: ``"truncate"`` (half the
    bytes of a declared length), ``"truncate_unsized"`` (half the bytes with no Content-Length,
    then the connection closes: the body looks complete), ``"expire"``, ``"redirect"`` (302 to
    the same object).
  - ``"fail:CODE"`` (submit): the task fails with task code CODE (1200, 1400, 1401, 1402,
    1403, 1405, 5000, 5003, 5004, or any int).
  - ``"end:cancelled"`` / ``"end:timeout"`` (submit): the task ends with that status
    (`timeout` carries code 5004).
  - ``"status=VALUE"`` (any answer carrying a prediction): that one answer shows status VALUE,
    e.g. ``"status=pending"`` or ``"status=queued"`` (the task itself is not changed).
  - ``"shape:NAME"``: that one answer gets the shape NAME (see `Shape` below).
  - ``"error_code:STATUS"``: an HTTP STATUS error whose body carries `message` and
    `error_code` (``{"code": STATUS, "message": ..., "error_code": "E<STATUS>", "data": null}``).
  - ``"envelope_error:CODE"``: HTTP 200 whose envelope says ``"code": CODE`` with an error
    message and ``"data": null`` (nothing done).
* Persistent shapes, applied to every prediction the emulator sends while set:
  `FaultPlan.shapes` (a list of `Shape` names) and `FaultPlan.status_alias` (shown status ->
  sent status, e.g. ``{"created": "pending", "processing": "queued"}``).

`Shape` names: ``extra_fields`` (unknown keys in the envelope and in `data`), ``nanos``
(`created_at` with nanoseconds, ``...T12:00:00.123456789Z``), ``code0`` (`data.code` 0 on
tasks without an error code), ``execution_time`` (`data.executionTime` in ms).
"""

from __future__ import annotations

import random
import threading
from decimal import Decimal
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Endpoint = Literal[
    "submit",
    "result",
    "upload",
    "download",
    "cancel",
    "delete",
    "history",
    "balance",
    "models",
    "pricing",
    "any",
]
Shape = Literal["extra_fields", "nanos", "code0", "execution_time"]
SHAPES: tuple[str, ...] = get_args(Shape)
Tier = Literal["test", "bronze", "silver", "gold", "ultra"]
# What a fault does to a request; see the module docstring for the parameterised ones.
FAULT_KINDS = (
    "429",
    "500",
    "502",
    "503",
    "slow",
    "drop",
    "truncate",
    "truncate_unsized",
    "expire",
    "redirect",
)
FAULT_PREFIXES = ("fail:", "end:", "status=", "shape:", "error_code:", "envelope_error:")

# WaveSpeed's documented account tiers: (tasks processed at once, video submissions a minute).
# "test" is the emulator's own default: 3 at once and no per-minute cap, so tests stay fast.
TIERS: dict[str, tuple[int, int | None]] = {
    "test": (3, None),
    "bronze": (2, 2),
    "silver": (300, 500),
    "gold": (3000, 3000),
    "ultra": (10000, 5000),
}
MB = 1024 * 1024


class FaultRates(BaseModel):
    """Seeded probabilities, applied per request (or per task for task failures)."""

    model_config = ConfigDict(extra="forbid")

    rate_limit: float = Field(0.0, ge=0, le=1, description="429 with Retry-After")
    server_error: float = Field(0.0, ge=0, le=1, description="500/502/503, nothing done")
    slow: float = Field(0.0, ge=0, le=1, description="answer after slow_s seconds")
    submit_drop: float = Field(
        0.0, ge=0, le=1, description="submit creates the task, then drops the connection"
    )
    task_retryable_failure: float = Field(0.0, ge=0, le=1, description="fails with 5000/5003/5004")
    task_permanent_failure: float = Field(0.0, ge=0, le=1, description="fails with 1403/1200")
    download_expired: float = Field(0.0, ge=0, le=1, description="output download answers 404")
    download_truncated: float = Field(0.0, ge=0, le=1, description="download cut off half way")
    download_truncated_unsized: float = Field(
        0.0, ge=0, le=1, description="half the bytes with no Content-Length, then a clean close"
    )


class FaultPlan(BaseModel):
    """Faults on demand: seeded rates, a script of one-shot faults per endpoint, and
    persistent odd shapes (see the module docstring for every kind).

    `script={"result": ["503", "status=pending"], "submit": ["drop"]}` makes the next result
    poll answer 503, the one after show status `pending`, and the next submit create its task
    and then drop the connection.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    rates: FaultRates = Field(default_factory=FaultRates)
    retry_after_s: float = Field(1.0, ge=0)
    slow_s: float = Field(35.0, ge=0)
    script: dict[Endpoint, list[str]] = Field(default_factory=dict)
    shapes: list[Shape] = Field(default_factory=list, description="on every prediction sent")
    status_alias: dict[str, str] = Field(
        default_factory=dict, description="status -> status sent, on every prediction"
    )

    @model_validator(mode="after")
    def _known_kinds(self) -> FaultPlan:
        for endpoint, kinds in self.script.items():
            for kind in kinds:
                if kind not in FAULT_KINDS and not kind.startswith(FAULT_PREFIXES):
                    raise ValueError(f"script.{endpoint}: unknown fault {kind!r}")
                if kind.startswith("shape:") and kind[6:] not in SHAPES:
                    raise ValueError(f"script.{endpoint}: unknown shape {kind[6:]!r}")
                if kind.startswith("end:") and kind[4:] not in ("cancelled", "timeout"):
                    raise ValueError(f"script.{endpoint}: {kind!r}: end:cancelled|end:timeout")
                if kind.startswith(("fail:", "error_code:", "envelope_error:")):
                    try:
                        int(kind.split(":", 1)[1])
                    except ValueError:
                        raise ValueError(
                            f"script.{endpoint}: {kind!r} needs an integer code"
                        ) from None
        return self


class UploadLimits(BaseModel):
    """Upload size caps by kind (the service's: 20 MB image, 100 MB video, 50 MB audio)."""

    model_config = ConfigDict(extra="forbid")

    image: int = Field(20 * MB, ge=1)
    video: int = Field(100 * MB, ge=1)
    audio: int = Field(50 * MB, ge=1)


class EmulatorConfig(BaseModel):
    """Everything an emulator does. Delays marked "scaled" are multiplied by `time_scale`.

    `tier` sets `concurrency` and `submits_per_minute` to the account tier's caps unless they
    are given: bronze 2 / 2, silver 300 / 500, gold 3,000 / 3,000, ultra 10,000 / 5,000;
    the default tier "test" is 3 at once with no per-minute cap. Past `concurrency`, tasks
    queue in `created`; past `submits_per_minute` video submissions within one window of
    `rate_window_s` (scaled; the window starts with its first submission), submits answer 429
    with Retry-After = the window's remaining (scaled) seconds.
    """

    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1)
    tier: Tier = "test"
    latency_s: float = Field(4.0, ge=0, description="emulated inference time of a task")
    latency_jitter_s: float = Field(
        0.0,
        ge=0,
        description="each task's inference time is drawn uniformly from latency_s +- this "
        "(seeded by latency_seed), as the real service's vary (the model page: 50-65 s); 0: "
        "every task takes exactly latency_s",
    )
    latency_seed: int = Field(0, description="seeds the draws of latency_jitter_s")
    time_scale: float = Field(1.0, gt=0, description="multiplies every emulated delay")
    concurrency: int = Field(3, ge=1, description="tasks processed at once; more queue")
    submits_per_minute: int | None = Field(None, ge=1, description="None: no cap")
    rate_window_s: float = Field(60.0, gt=0, description="the per-minute window (scaled)")
    sync_timeout_s: float = Field(90.0, gt=0, description="enable_sync_mode wait (scaled)")
    output_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="outputs 404 after this")
    history_window_s: float = Field(
        7 * 24 * 3600, gt=0, description="history lists tasks this recent (scaled)"
    )
    history_page_cap: int = Field(
        100, ge=1, description="most rows a history page returns whatever page_size asks"
    )
    upload_limits: UploadLimits = Field(default_factory=UploadLimits)
    max_body_bytes: int = Field(110 * MB, ge=1, description="larger request bodies: 413")
    render_once: bool = Field(
        False, description="render each distinct input once; later tasks reuse the MP4"
    )
    signed_outputs: bool = Field(
        False,
        description="output URLs carry Expires and Signature, as a CDN's do; a download "
        "without a valid signature answers 403",
    )
    balance: Decimal = Decimal("1000.00")
    webhook_secret: str = "whsec_emulator-secret"  # noqa: S105 - a fake service's fake secret
    webhook_retries: int = Field(3, ge=0)
    faults: FaultPlan = Field(default_factory=FaultPlan)
    # Fetching an input image over HTTP: only local URLs are reachable from this machine.
    image_fetch_timeout_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _jitter_within_latency(self) -> EmulatorConfig:
        if self.latency_jitter_s > self.latency_s:
            raise ValueError(
                f"latency_jitter_s: {self.latency_jitter_s} is more than latency_s "
                f"({self.latency_s}); an inference time cannot be negative"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _tier_caps(cls, data: Any) -> Any:
        if isinstance(data, dict):
            tier = data.get("tier", "test")
            if tier in TIERS:
                concurrency, per_minute = TIERS[tier]
                data = dict(data)
                data.setdefault("concurrency", concurrency)
                data.setdefault("submits_per_minute", per_minute)
        return data


class FaultDecider:
    """Thread-safe: picks the fault (if any) for each request, from the script then the dice."""

    def __init__(self, plan: FaultPlan) -> None:
        self._lock = threading.Lock()
        self.replace(plan)

    def replace(self, plan: FaultPlan) -> None:
        with self._lock:
            self.plan = plan
            self._rng = random.Random(plan.seed)
            self._script: dict[str, list[str]] = {k: list(v) for k, v in plan.script.items()}

    def pick(self, endpoint: Endpoint) -> str | None:
        with self._lock:
            for key in (endpoint, "any"):
                queue = self._script.get(key)
                if queue:
                    return str(queue.pop(0))
            r = self.plan.rates
            roll = self._rng.random
            if endpoint == "download":
                if roll() < r.download_expired:
                    return "expire"
                if roll() < r.download_truncated:
                    return "truncate"
                if roll() < r.download_truncated_unsized:
                    return "truncate_unsized"
                return None
            if roll() < r.rate_limit:
                return "429"
            if roll() < r.server_error:
                return self._rng.choice(("500", "502", "503"))
            if roll() < r.slow:
                return "slow"
            if endpoint == "submit" and roll() < r.submit_drop:
                return "drop"
            return None

    def task_failure(self) -> int | None:
        with self._lock:
            r = self.plan.rates
            if self._rng.random() < r.task_retryable_failure:
                return self._rng.choice((5000, 5003, 5004))
            if self._rng.random() < r.task_permanent_failure:
                return self._rng.choice((1403, 1200))
            return None
