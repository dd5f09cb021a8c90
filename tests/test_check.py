"""`wan-video check` against the emulator at each tier, the test Prefect server and the test
SeaweedFS: what it reports, and that nothing in it spends money unless asked (the emulator's
own counts: no submission, no upload).

The emulator's price cannot be configured (it quotes `PRICE_USD` itself), so the mismatch test
gives the check another expected table instead: the comparison it makes is the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import TEST_BUCKET, Stack
from wan_tasks import I2VRequest, settings
from wan_tasks.api.client import WaveSpeedClient
from wan_tasks.cli.main import main
from wan_tasks.emulator.config import TIERS as EMULATOR_TIERS
from wan_tasks.integration.check import TIERS, check_account
from wan_tasks.integration.limits import LimitSettings, ensure_limits

ALL_TIERS = ("bronze", "silver", "gold", "ultra")
PROBES = "videos/.wan-video-check/"


def tier_stack(make_stack: Callable[..., Stack], tier: str, in_flight: int = 2) -> Stack:
    # make_stack raises the emulator's concurrency to 10 unless told: keep the tier's.
    return make_stack(in_flight=in_flight, tier=tier, concurrency=TIERS[tier].concurrent)


def probes_left(stack: Stack) -> list[str]:
    answer = stack.s3.list_objects_v2(Bucket=stack.bucket, Prefix=PROBES)
    return [o["Key"] for o in answer.get("Contents", [])]


def test_tiers_are_the_documented_ones() -> None:
    for name, caps in TIERS.items():
        assert EMULATOR_TIERS[name] == (caps.concurrent, caps.videos_per_minute)


@pytest.mark.parametrize("tier", ALL_TIERS)
def test_default_check_passes_and_spends_nothing(
    make_stack: Callable[..., Stack], tier: str
) -> None:
    stack = tier_stack(make_stack, tier)
    report = check_account(tier=tier)
    statuses = {r.name: r.status for r in report.results}
    assert statuses == {
        "key": "ok",
        "balance": "ok",
        "model": "ok",
        "price": "ok",
        "limits": "ok",
        "s3": "ok",
    }, report.lines()
    assert report.exit_code == 0 and report.base_url == stack.emulator.base_url
    assert "$1000" in report.result("balance").message
    assert "$0.10" in report.result("price").message
    assert "$0.16" in report.result("price").message
    stats = stack.stats()
    assert stats["submissions"] == 0 and stats["uploads"] == 0
    assert probes_left(stack) == []  # the probe was written and deleted


@pytest.mark.parametrize("tier", ALL_TIERS)
def test_wrong_key_fails_naming_the_first_top_up(
    make_stack: Callable[..., Stack], tier: str
) -> None:
    stack = tier_stack(make_stack, tier)
    wrong = "wrong-key-0123456789abcdef"
    with settings.override(api_key=wrong):
        report = check_account(tier=tier, spend=True)
    key = report.result("key")
    assert key.status == "fail" and "401" in key.message and "first top-up" in key.message
    for name in ("balance", "model", "price"):
        assert report.result(name).status == "skip"
    assert report.result("spend").status == "skip"  # never spends after a failure
    assert report.exit_code == 1
    text = report.model_dump_json()
    assert wrong not in text and stack.emulator.api_key not in text
    assert stack.stats()["submissions"] == 0


def test_price_mismatch_is_a_warning_naming_both(stack: Stack) -> None:
    report = check_account(prices={5: Decimal("0.12"), 8: Decimal("0.16")})
    price = report.result("price")
    assert price.status == "warn"
    assert "$0.10" in price.message and "$0.12" in price.message and "5 s" in price.message
    assert "8 s" not in price.message  # the 8 s price matches
    assert report.exit_code == 0  # a warning alone passes


def test_in_flight_above_bronze_concurrency_warns(make_stack: Callable[..., Stack]) -> None:
    tier_stack(make_stack, "bronze", in_flight=5)
    bronze = check_account(tier="bronze").result("limits")
    assert bronze.status == "warn"
    assert "is 5, above the bronze tier's 2 concurrent tasks" in bronze.message
    # 5 lanes x 60 / 60 s (no history yet) = 5 a minute, above bronze's 2.
    assert "no per-minute limit" in bronze.message and "about 5 a minute" in bronze.message
    silver = check_account(tier="silver").result("limits")
    assert silver.status == "ok", silver.message
    assert check_account().result("limits").status == "skip"  # no tier: nothing to compare


def test_per_minute_warning_uses_the_history(
    make_stack: Callable[..., Stack],
    make_client: Callable[..., WaveSpeedClient],
) -> None:
    """Fast tasks in the account's history: 2 at once submit far more than 2 a minute."""
    stack = make_stack(in_flight=2, latency_s=0.3)
    client = make_client(stack.emulator)
    from tests.conftest import SAMPLE

    for i in range(3):
        client.run(I2VRequest(image=str(SAMPLE), prompt=f"check history {i}"))
    limits = check_account(tier="bronze").result("limits")
    assert limits.status == "warn" and "median of 3 recent tasks" in limits.message
    assert "no per-minute limit" in limits.message
    # A per-minute limit within the tier's cap answers the warning.
    names = LimitSettings(per_minute="check-test-per-minute")
    ensure_limits(2, 2, names=names)
    fixed = check_account(tier="bronze", limits=names).result("limits")
    assert fixed.status == "ok", fixed.message
    ensure_limits(2, 5, names=names)
    over = check_account(tier="bronze", limits=names).result("limits")
    assert over.status == "warn" and "is 5, above the bronze tier's 2" in over.message


@pytest.mark.parametrize("tier", ["bronze", None])
def test_missing_in_flight_limit_fails(stack: Stack, tier: str | None) -> None:
    report = check_account(tier=tier, limits=LimitSettings(in_flight="check-no-such-limit"))
    assert report.result("limits").status == "fail"
    assert "check-no-such-limit" in report.result("limits").message
    assert report.exit_code == 1


def test_s3_probe_fails_on_a_missing_bucket(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"wan-check-missing-{uuid.uuid4().hex[:8]}"
    missing = check_account(bucket=name).result("s3")
    assert missing.status == "fail" and "NoSuchBucket" in missing.message, missing.message
    assert name not in [b["Name"] for b in stack.s3.list_buckets()["Buckets"]]
    monkeypatch.delenv("WAN_TASKS_BUCKET")
    assert check_account().result("s3").status == "warn"
    assert probes_left(stack) == []


def test_spend_makes_exactly_one_submission(make_stack: Callable[..., Stack]) -> None:
    stack = tier_stack(make_stack, "bronze")
    report = check_account(tier="bronze", spend=True)
    spend = report.result("spend")
    assert spend.status == "ok", report.lines()
    stats = stack.stats()
    assert stats["submissions"] == 1 and stats["completed"] == 1
    assert "cost $0.10" in spend.message
    assert "balance $1000.00 -> $999.90" in spend.message
    uri = spend.message.split("archived at ")[1].split(";")[0]
    data, _ = stack.object(uri)
    assert uri.startswith(f"s3://{TEST_BUCKET}/videos/") and data[4:8] == b"ftyp"
    assert report.exit_code == 0


def test_cli_check_exit_codes(
    make_stack: Callable[..., Stack],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = tier_stack(make_stack, "bronze", in_flight=3)
    assert main(["check", "--tier", "bronze"]) == 0  # warnings only
    out = capsys.readouterr().out
    assert "[ ok ] key" in out and "[warn] limits" in out and "1 warning(s)" in out
    monkeypatch.setenv("WAVESPEED_API_KEY", "wrong-key-0123456789abcdef")
    assert main(["check", "--tier", "bronze"]) == 1
    out = capsys.readouterr().out
    assert "[fail] key" in out and "first top-up" in out and "check(s) failed" in out
    assert stack.stats()["submissions"] == 0


def test_a_store_that_ignores_conditional_writes_fails_the_check(
    make_stack: Callable[..., Stack], s3_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's claim and the archive rely on If-None-Match and If-Match being honoured:
    a store that drops them (here a proxy in front of SeaweedFS) fails the check, naming why."""
    from reliability.s3_proxy import S3FaultProxy

    make_stack()
    with S3FaultProxy(s3_store.endpoint_url, ignore_conditions=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        report = check_account(tier="gold")
    s3 = report.result("s3")
    assert s3.status == "fail" and "If-None-Match" in s3.message, report.lines()
    assert "paying" in s3.message
