"""`wan-video check`: what to verify before a batch spends money, as typed results.

`check_account()` asks the configured service (the settings, or a `WaveSpeedCredentials`
block) whether the key authenticates, what the balance is, whether the model exists and costs
what the project's price table (`PRICE_USD`) says, compares the account tier's caps with the
Prefect limits the flows take slots from, and writes and deletes a probe object in the archive
bucket (conditionally, `If-None-Match: *`, as the archive writes). None of that submits a task
or uploads a file: only with `spend=True` does it make one real 5 s video end to end (the
flows' own submit, wait and archive tasks, in a `wan-video-check` flow run), and only when
every other check passed. Each check's result is ok, warn, fail or skip (it could not be
run because an earlier one failed, or was not asked for); warnings alone still pass.

The tier is an input: the API does not say which tier an account is on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import httpx
from prefect import flow
from pydantic import BaseModel, Field, SecretStr

from wan_tasks import settings
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.api.config import resolve_api_key, resolve_base_url
from wan_tasks.api.models import MODEL_ID, PRICE_USD, I2VRequest
from wan_tasks.api.operations import Timeouts
from wan_tasks.api.policies import RetryPolicy
from wan_tasks.api.protocol import API_PREFIX, envelope_data
from wan_tasks.core.inference_times import InferenceTimes
from wan_tasks.core.ledger import DEFAULT_LEDGER_PREFIX
from wan_tasks.errors import (
    AuthenticationError,
    MissingLimitError,
    WanTasksError,
    WaveSpeedError,
)
from wan_tasks.integration.limits import DEFAULT_RATE_LIMIT, LimitSettings, read_limit
from wan_tasks.storage.archive import ArchiveTarget

logger = logging.getLogger(__name__)

Status = Literal["ok", "warn", "fail", "skip"]
Tier = Literal["bronze", "silver", "gold", "ultra"]
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "sample.png"
DEFAULT_INFERENCE_S = 60.0
# Lanes a flow runs when it has no in-flight limit (wan_tasks.flows.produce.DEFAULT_LANES).
_LANES_WITHOUT_LIMIT = 32
_PRICE_TABLE = "the project's table (wan_tasks.api.models.PRICE_USD)"


@dataclass(frozen=True)
class TierLimits:
    """An account tier's caps: tasks processed at once, video submissions a minute."""

    concurrent: int
    videos_per_minute: int


# WaveSpeed's account levels (docs "account-levels"): past `concurrent` tasks queue; past
# `videos_per_minute` submits answer 429 until the minute resets.
TIERS: dict[str, TierLimits] = {
    "bronze": TierLimits(2, 2),
    "silver": TierLimits(300, 500),
    "gold": TierLimits(3000, 3000),
    "ultra": TierLimits(10000, 5000),
}


class CheckResult(BaseModel):
    name: str
    status: Status
    message: str


class CheckReport(BaseModel):
    """Every check's result, in the order they ran. Never holds the key."""

    base_url: str = ""
    tier: Tier | None = None
    results: list[CheckResult] = Field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        """0 when nothing failed (warnings alone pass), else 1."""
        return 0 if self.ok else 1

    def result(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no check named {name!r}")

    def add(self, name: str, status: Status, message: str) -> CheckResult:
        result = CheckResult(name=name, status=status, message=message)
        self.results.append(result)
        log = logger.warning if status in ("warn", "fail") else logger.info
        log("check %s: %s: %s", name, status, message)
        return result

    def lines(self) -> list[str]:
        """For people: one line per check, then the verdict."""
        out = [f"[{r.status:^4}] {r.name:<8} {r.message}" for r in self.results]
        verdict = f"{len(self.failed)} check(s) failed" if self.failed else "all checks passed"
        if self.warnings:
            verdict += f", {len(self.warnings)} warning(s)"
        return [*out, verdict]


class _Api:
    """The few read-only calls the client has no method for (catalogue, pricing)."""

    def __init__(self, api_key: SecretStr, base_url: str, timeout_s: float) -> None:
        self._key, self.base_url = api_key, base_url
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def call(self, method: str, path: str, body: Any = None) -> Any:
        response = self._http.request(
            method,
            f"{self.base_url}{API_PREFIX}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self._key.get_secret_value()}"},
        )
        return envelope_data(response, operation=f"{method} {API_PREFIX}{path}")

    def close(self) -> None:
        self._http.close()


def _credentials(credentials_block: str | None) -> tuple[SecretStr, str]:
    if credentials_block:
        from wan_tasks.integration.blocks import WaveSpeedCredentials

        creds: WaveSpeedCredentials = WaveSpeedCredentials.load(  # type: ignore[call-arg,assignment]
            credentials_block, _sync=True
        )
        return resolve_api_key(creds.api_key), resolve_base_url(creds.base_url)
    return resolve_api_key(None), resolve_base_url(None)


def check_account(
    *,
    credentials_block: str | None = None,
    tier: Tier | None = None,
    bucket: str | None = None,
    s3_block: str | None = None,
    prefix: str = "videos",
    limits: LimitSettings | None = None,
    spend: bool = False,
    prices: Mapping[int, Decimal] = PRICE_USD,
    model: str = MODEL_ID,
    default_inference_s: float = DEFAULT_INFERENCE_S,
    timeout_s: float = 20.0,
) -> CheckReport:
    """Run every check; see the module docstring. With `spend`, the video is made by the
    `wan-video-check` flow (the flows' own submit, wait and archive tasks).

    Args:
        credentials_block: a saved `WaveSpeedCredentials` block; None: the settings.
        tier: the account's tier; None skips the limits comparison.
        bucket, s3_block, prefix: the archive target the probe object goes to (the bucket
            defaults to the block's, then to `WAN_TASKS_BUCKET`).
        limits: the limit names the flows will use (default: `LimitSettings()`).
        spend: also make one real 5 s video (it costs money on the real service).
        prices: what the project expects each duration to cost.
    """
    if tier is not None and tier not in TIERS:
        raise ValueError(f"tier: {tier!r} is not one of {', '.join(TIERS)}")
    limits = limits or LimitSettings()
    report = CheckReport(tier=tier)
    api_ok = _check_service(report, credentials_block, prices, model, timeout_s)
    _check_limits(
        report,
        credentials_block,
        tier,
        limits,
        model,
        default_inference_s,
        timeout_s,
        history=api_ok,
    )
    bucket = _check_s3(report, bucket, s3_block, prefix)
    if spend:
        if report.failed:
            report.add("spend", "skip", "not spent: fix the failed checks first")
        else:
            _check_spend(report, credentials_block, bucket, s3_block, prefix, limits, timeout_s)
    return report


# -- the service: key, balance, model, price -----------------------------------------------


def _check_service(
    report: CheckReport,
    credentials_block: str | None,
    prices: Mapping[int, Decimal],
    model: str,
    timeout_s: float,
) -> bool:
    try:
        key, base_url = _credentials(credentials_block)
    except (WanTasksError, ValueError) as exc:
        report.add("key", "fail", str(exc))
        for name in ("balance", "model", "price"):
            report.add(name, "skip", "not checked: no usable key")
        return False
    report.base_url = base_url
    client = _client(key, base_url, timeout_s)
    api = _Api(key, base_url, timeout_s)
    try:
        try:
            balance = client.balance()
        except AuthenticationError as exc:
            code = exc.status_code or 401
            report.add(
                "key",
                "fail",
                (
                    f"{base_url} refused the key (HTTP {code}). A WaveSpeed key works only after "
                    "the account's first top-up: until then a new key answers 401 however valid "
                    "it looks. Top up once, then run the check again; otherwise check "
                    "WAVESPEED_API_KEY (or the credentials block)."
                ),
            )
            for name in ("balance", "model", "price"):
                report.add(name, "skip", "not checked: the key was refused")
            return False
        except (WaveSpeedError, httpx.HTTPError) as exc:
            report.add("key", "fail", f"could not ask {base_url}: {_why(exc)}")
            for name in ("balance", "model", "price"):
                report.add(name, "skip", "not checked: the service did not answer")
            return False
        report.add("key", "ok", f"{base_url} accepts the key")
        cheapest = min(prices.values()) if prices else Decimal("0")
        if balance < cheapest:
            report.add(
                "balance",
                "warn",
                f"{_usd(balance)}: below one video ({_usd(cheapest)}); "
                "submissions will be refused until the account is topped up",
            )
        else:
            report.add("balance", "ok", _usd(balance))
        if _check_model(report, api, model):
            _check_prices(report, api, model, prices)
        else:
            report.add("price", "skip", "not checked: the model is not in the catalogue")
        return True
    finally:
        api.close()
        client.close()


def _client(key: SecretStr, base_url: str, timeout_s: float) -> WaveSpeedClient:
    # Few, short retries: a check should answer in seconds, not sleep out a long Retry-After.
    return WaveSpeedClient(
        key,
        base_url,
        timeouts=Timeouts(read=timeout_s),
        retry=RetryPolicy(max_attempts=2, backoff=0.5, max_retry_after=10),
    )


def _usd(amount: Decimal) -> str:
    """Dollars as people write them ($0.10, not $0.1), never rounding a real difference."""
    cents = amount.quantize(Decimal("0.01"))
    return f"${cents}" if cents == amount else f"${amount}"


def _why(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, WanTasksError) else f"{type(exc).__name__}: {exc}"


def _check_model(report: CheckReport, api: _Api, model: str) -> bool:
    try:
        data = api.call("GET", "/models")
    except (WaveSpeedError, httpx.HTTPError) as exc:
        report.add("model", "warn", f"could not read the catalogue: {_why(exc)}")
        return True  # unknown, not missing: still ask for its price
    if isinstance(data, dict):
        data = data.get("items") or data.get("models") or []
    entries = [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
    if not any(e.get("model_id") == model for e in entries):
        report.add(
            "model",
            "fail",
            f"{model} is not in the service's catalogue "
            f"({len(entries)} models listed): check the model id",
        )
        return False
    report.add("model", "ok", f"{model} is listed")
    return True


def _quoted_price(api: _Api, model: str, duration: int) -> tuple[Decimal, Decimal | None]:
    """(list price, discounted price if the service gives one) of one run."""
    body = {"model_id": model, "inputs": {"duration": duration}}
    try:
        data = api.call("POST", "/model/pricing", body)
    except WaveSpeedError as exc:
        if exc.status_code not in (404, 405):
            raise
        data = api.call("POST", "/model/price", body)  # newer route, other field names
    if not isinstance(data, dict):
        raise ValueError(f"no price in the answer for {duration} s")
    listed = data.get("unit_price", data.get("price"))
    try:
        price = Decimal(str(listed))
        discounted = data.get("discounted_price")
        return price, None if discounted is None else Decimal(str(discounted))
    except InvalidOperation:
        raise ValueError(f"unreadable price {str(listed)[:40]!r} for {duration} s") from None


def _check_prices(
    report: CheckReport, api: _Api, model: str, prices: Mapping[int, Decimal]
) -> None:
    mismatches, seen = [], []
    for duration, expected in sorted(prices.items()):
        try:
            price, discounted = _quoted_price(api, model, duration)
        except (WaveSpeedError, httpx.HTTPError, ValueError) as exc:
            report.add(
                "price", "warn", f"could not read the price of a {duration} s video: {_why(exc)}"
            )
            return
        if price != expected:
            mismatches.append(
                f"a {duration} s video: the service says {_usd(price)}, "
                f"{_PRICE_TABLE} says {_usd(expected)}"
            )
        else:
            note = (
                f" (discounted: {_usd(discounted)})"
                if discounted is not None and discounted != price
                else ""
            )
            seen.append(f"{duration} s {_usd(price)}{note}")
    if mismatches:
        report.add(
            "price",
            "warn",
            "price mismatch: "
            + "; ".join(mismatches)
            + ". Budgets and cost reports use the table: update it before a batch.",
        )
    else:
        report.add("price", "ok", ", ".join(seen) + ", as the project expects")


# -- the tier against the Prefect limits ---------------------------------------------------


def _check_limits(
    report: CheckReport,
    credentials_block: str | None,
    tier: Tier | None,
    limits: LimitSettings,
    model: str,
    default_inference_s: float,
    timeout_s: float,
    *,
    history: bool,
) -> None:
    caps = TIERS[tier] if tier is not None else None
    try:
        in_flight = read_limit(limits.in_flight) if limits.in_flight else None
        per_minute = read_limit(limits.per_minute) if limits.per_minute else None
    except MissingLimitError as exc:
        report.add(
            "limits",
            "fail",
            str(exc)
            + (
                f" (the {tier} tier runs {caps.concurrent} tasks at once, "
                f"{caps.videos_per_minute} video submissions a minute)"
                if caps
                else ""
            ),
        )
        return
    except Exception as exc:  # the Prefect server: unreachable, misconfigured
        report.add(
            "limits",
            "fail",
            f"could not read the limits from the Prefect server: {type(exc).__name__}: {exc}",
        )
        return
    if tier is None or caps is None:
        report.add(
            "limits",
            "skip",
            f"in flight {in_flight}, per minute {per_minute}; no tier "
            "given (--tier bronze|silver|gold|ultra), the API does not say which tier "
            "an account is on: not compared",
        )
        return
    problems: list[str] = []
    lanes = in_flight if in_flight is not None else _LANES_WITHOUT_LIMIT
    if in_flight is None:
        if lanes > caps.concurrent:
            problems.append(
                f"no in-flight limit: a batch runs up to {lanes} videos at once, "
                f"above the {tier} tier's {caps.concurrent} concurrent tasks"
            )
    elif in_flight > caps.concurrent:
        problems.append(
            f"the in-flight limit {limits.in_flight!r} is {in_flight}, above the {tier} "
            f"tier's {caps.concurrent} concurrent tasks: the rest queue on the service, and "
            f"their queueing counts against the wait timeout; set it with "
            f"`wan-video limits --in-flight {caps.concurrent}`"
        )
    typical, source = _typical_inference(
        credentials_block, model, default_inference_s, timeout_s, history=history
    )
    if per_minute is not None:
        if per_minute > caps.videos_per_minute:
            problems.append(
                f"the per-minute limit {limits.per_minute!r} is {per_minute}, above the "
                f"{tier} tier's {caps.videos_per_minute} video submissions a minute: the "
                "service will answer 429 (retried, never paid twice, but slower)"
            )
    else:
        rate = lanes * 60.0 / typical
        if caps.videos_per_minute < rate:
            problems.append(
                f"no per-minute limit: {lanes} videos at once, each "
                f"~{typical:.0f} s ({source}), submit about {rate:.0f} a minute, above the "
                f"{tier} tier's {caps.videos_per_minute}: the service will answer 429 "
                f"(retried safely, but lanes sit idle). Create one with `wan-video limits "
                f"--per-minute {caps.videos_per_minute}` and run with `--rate-limit "
                f"{limits.per_minute or DEFAULT_RATE_LIMIT}`"
            )
    summary = (
        f"{tier}: {caps.concurrent} at once, {caps.videos_per_minute} a minute; "
        f"in flight {in_flight if in_flight is not None else 'unlimited'}, per minute "
        f"{per_minute if per_minute is not None else 'no limit'}, typical inference "
        f"~{typical:.0f} s ({source})"
    )
    if problems:
        report.add("limits", "warn", "; ".join(problems) + f". ({summary})")
    else:
        report.add("limits", "ok", summary)


def _typical_inference(
    credentials_block: str | None, model: str, default_s: float, timeout_s: float, *, history: bool
) -> tuple[float, str]:
    """The median inference time of the account's recent 5 s videos (from its history), or
    the default when there are too few of them."""
    if history:
        times = InferenceTimes(quantile=0.5)
        try:
            key, base_url = _credentials(credentials_block)
            with _client(key, base_url, timeout_s) as client:
                learned = times.seed_from_history(client, model)
        except (WanTasksError, ValueError, httpx.HTTPError):
            learned = 0
        seconds = times.expected(model, 5)
        if seconds is not None and seconds > 0:
            return seconds, f"median of {learned} recent tasks"
    return default_s, "default: too few recent tasks in the history"


# -- the archive bucket ----------------------------------------------------------------------


def _check_s3(
    report: CheckReport, bucket: str | None, s3_block: str | None, prefix: str
) -> str | None:
    from botocore.exceptions import BotoCoreError, ClientError

    from wan_tasks.integration.runtime import s3_bucket_block, s3_client

    if not s3_block:
        bucket = bucket or settings.current().bucket
        if not bucket:
            report.add(
                "s3",
                "warn",
                "no bucket configured (WAN_TASKS_BUCKET, --bucket or "
                "--s3-block): the flows would archive to the embedded local store",
            )
            return None
    try:
        if s3_block:
            block_bucket, s3 = s3_bucket_block(s3_block)
            bucket = bucket or block_bucket
        else:
            s3 = s3_client()
    except (ValueError, BotoCoreError) as exc:
        report.add("s3", "fail", f"no S3 client: {_why(exc)}")
        return None
    if not bucket:
        report.add("s3", "fail", f"the S3 block {s3_block!r} names no bucket")
        return None
    key = f"{prefix.strip('/') or 'videos'}/.wan-video-check/{uuid.uuid4().hex}"
    where = f"s3://{bucket}/{key}"
    try:
        # Some stores (SeaweedFS) create a missing bucket on the first write; the archive's
        # must exist. A writer without ListBucket gets 403 here: the write still tells.
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchBucket", "NotFound"):
            report.add("s3", "fail", f"bucket {bucket!r} does not exist (NoSuchBucket)")
            return bucket
    except BotoCoreError as exc:
        report.add("s3", "fail", f"cannot reach the bucket {bucket!r}: {_why(exc)}")
        return bucket
    try:
        # Conditional, as the archive writes: a store that ignores If-None-Match could
        # overwrite a video; one that refuses it (501) breaks every archive.
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=b"wan-video check probe\n",
            ContentType="text/plain",
            IfNoneMatch="*",
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        hint = (
            " (the store does not support conditional writes, If-None-Match: *, which "
            "the archive relies on never to overwrite a video)"
            if code in ("NotImplemented", "501")
            else ""
        )
        report.add("s3", "fail", f"cannot write {where}: {code}: {exc}{hint}")
        return bucket
    except BotoCoreError as exc:
        report.add("s3", "fail", f"cannot write {where}: {_why(exc)}")
        return bucket
    ignored = _conditions_ignored(s3, bucket, key)
    if ignored:
        report.add(
            "s3",
            "fail",
            f"s3://{bucket} {ignored}: the ledger's claim (a conditional create, then "
            "If-Match updates) could not stop two machines paying for one request, and the "
            "archive could overwrite a video. Use a store that honours S3 conditional writes "
            "(AWS S3, SeaweedFS)",
        )
    try:
        s3.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        report.add(
            "s3",
            "warn",
            f"wrote {where} but could not delete it ({_why(exc)}): "
            "archiving works; remove the probe by hand",
        )
        return bucket
    if not ignored:
        report.add(
            "s3",
            "ok",
            f"s3://{bucket}/{prefix} is writable and honours conditional writes (If-None-Match "
            "and If-Match on a probe object, then deleted)",
        )
    return bucket


def _conditions_ignored(s3: Any, bucket: str, key: str) -> str | None:
    """Write the probe again with If-None-Match: * and with a wrong If-Match: both must be
    refused (412). Says what the store ignored, or None."""
    from botocore.exceptions import ClientError

    for condition, what in (
        ({"IfNoneMatch": "*"}, "overwrote an object despite If-None-Match: *"),
        ({"IfMatch": '"0123456789abcdef0123456789abcdef"'}, "accepted a wrong If-Match"),
    ):
        try:
            s3.put_object(
                Bucket=bucket, Key=key, Body=b"wan-video check probe, again\n", **condition
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                continue
            return f"answered {code} to a conditional write ({', '.join(condition)})"
        return what
    return None


# -- one real video ----------------------------------------------------------------------------


def _check_spend(
    report: CheckReport,
    credentials_block: str | None,
    bucket: str | None,
    s3_block: str | None,
    prefix: str,
    limits: LimitSettings,
    timeout_s: float,
) -> None:
    if not bucket:
        report.add("spend", "fail", "not spent: no bucket to archive the test video to")
        return
    key, base_url = _credentials(credentials_block)
    before = _balance(key, base_url, timeout_s)
    target = ArchiveTarget(bucket=bucket, prefix=prefix, s3_block=s3_block)
    try:
        archived, cost = spend_one_video(target, credentials_block, limits)
    except Exception as exc:
        report.add(
            "spend",
            "fail",
            f"the test video did not land: {_why(exc)} (a failed task is refunded "
            "automatically, within about 3 hours)",
        )
        return
    after = _balance(key, base_url, timeout_s)
    change = (
        f"; balance {_usd(before)} -> {_usd(after)}"
        if before is not None and after is not None
        else ""
    )
    report.add(
        "spend",
        "ok",
        f"one 5 s video end to end: prediction {archived.prediction_id}, "
        f"cost {_usd(cost)}, archived at {archived.s3_uri}{change}",
    )


@dataclass(frozen=True)
class _Archived:
    prediction_id: str
    s3_uri: str


@flow(name="wan-video-check")
def spend_one_video(
    target: ArchiveTarget, credentials_block: str | None, limits: LimitSettings
) -> tuple[_Archived, Decimal]:
    """One real 5 s video of the bundled image: submit, wait and archive, the same tasks the
    flows run, inside an in-flight slot. Returns where it landed and what it cost."""
    from prefect.concurrency.sync import concurrency

    from wan_tasks.integration.tasks import archive_to_s3, submit_i2v, wait_for_prediction

    request = I2VRequest(
        image=str(SAMPLE_IMAGE),
        duration=5,
        prompt="wan-video check: slow drift over a lake at sunset",
    )
    # A fresh variant: a new video each time, never a reconnect to an earlier check's.
    variant = f"wan-video-check-{uuid.uuid4().hex[:12]}"
    ledger = target.at(DEFAULT_LEDGER_PREFIX)
    slot = (
        concurrency(
            limits.in_flight, occupy=1, strict=True, timeout_seconds=limits.acquire_timeout_s
        )
        if limits.in_flight
        else nullcontext()
    )
    with slot:
        submitted = submit_i2v(
            request,
            variant=variant,
            item_id="wan-video-check",
            credentials_block=credentials_block,
            ledger=ledger,
        )
        prediction = wait_for_prediction(submitted, credentials_block=credentials_block)
    result = archive_to_s3(
        submitted, prediction, target, credentials_block=credentials_block, ledger=ledger
    )
    return _Archived(submitted.prediction_id, result.s3_uri), submitted.cost_usd


def _balance(key: SecretStr, base_url: str, timeout_s: float) -> Decimal | None:
    try:
        with _client(key, base_url, timeout_s) as client:
            return client.balance()
    except (WaveSpeedError, httpx.HTTPError):
        return None
