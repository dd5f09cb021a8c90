"""Emulator settings and the faults it can inject."""

from __future__ import annotations

import random
import threading
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Endpoint = Literal["submit", "result", "upload", "download", "cancel", "history", "balance", "any"]
# What a fault does to a request. "fail:CODE" on submit makes that task fail with CODE.
FAULT_KINDS = ("429", "500", "502", "503", "slow", "drop", "truncate", "expire")


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


class FaultPlan(BaseModel):
    """Faults on demand: seeded rates plus a script of one-shot faults per endpoint.

    `script={"result": ["503", "503"], "submit": ["drop"]}` makes the next two result polls
    answer 503 and the next submit create its task and then drop the connection.
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    rates: FaultRates = Field(default_factory=FaultRates)
    retry_after_s: float = Field(1.0, ge=0)
    slow_s: float = Field(35.0, ge=0)
    script: dict[Endpoint, list[str]] = Field(default_factory=dict)


class EmulatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: str = Field(min_length=1)
    latency_s: float = Field(4.0, ge=0, description="emulated inference time of a task")
    time_scale: float = Field(1.0, gt=0, description="multiplies every emulated delay")
    concurrency: int = Field(3, ge=1, description="tasks processed at once; more queue")
    output_ttl_s: float = Field(7 * 24 * 3600, gt=0, description="outputs 404 after this")
    balance: Decimal = Decimal("1000.00")
    webhook_secret: str = "whsec_emulator-secret"  # noqa: S105 - a fake service's fake secret
    webhook_retries: int = Field(3, ge=0)
    faults: FaultPlan = Field(default_factory=FaultPlan)
    # Fetching an input image over HTTP: only local URLs are reachable from this machine.
    image_fetch_timeout_s: float = Field(10.0, gt=0)


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
