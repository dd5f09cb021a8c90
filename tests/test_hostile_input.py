"""Hostile input that used to leak secrets or crash: API keys with stray characters, and
credentials pasted into manifests and requests, which errors must never echo."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.conftest import SAMPLE
from wan_tasks import I2VRequest, WaveSpeedClient
from wan_tasks.api.config import ENV_API_KEY, resolve_api_key
from wan_tasks.api.text import looks_like_secret, quote_value
from wan_tasks.core.manifest import ManifestError, parse_manifest
from wan_tasks.emulator import Emulator
from wan_tasks.errors import ConfigurationError

KEY = "test-key-0123456789abcdef"  # the emulator fixture's key
URL = "https://example.com/a.png"


def _everything(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc)


@pytest.mark.parametrize(
    ("stray", "position", "kind"),
    [
        ("\u200b", 9, "invisible format character"),
        ("\u00a0", 9, "non-ASCII space"),
        ("é", 9, "non-ASCII character"),
        ("\n", 9, "line break"),
        ("\x00", 9, "control character"),
        (" ", 9, "a space"),
        ("\x7f", 9, "control character"),
    ],
    ids=["zero-width space", "nbsp", "accented letter", "newline", "NUL", "space", "DEL"],
)
def test_key_with_a_stray_character_is_refused_without_showing_it(
    stray: str, position: int, kind: str, emulator: Emulator, all_logs: pytest.LogCaptureFixture
) -> None:
    bad_key = KEY[:8] + stray + KEY[8:]
    with pytest.raises(ConfigurationError) as caught:
        WaveSpeedClient(bad_key, emulator.base_url)
    text = _everything(caught.value)
    assert f"position {position} of {len(bad_key)}" in str(caught.value)
    assert kind in str(caught.value)
    for fragment in (KEY, KEY[:8], KEY[8:], "Bearer"):
        assert fragment not in text
        assert fragment not in all_logs.text
    assert emulator.stats()["submissions"] == 0


def test_key_from_the_environment_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_API_KEY, KEY + "\u200b")
    with pytest.raises(ConfigurationError, match="position 26") as caught:
        resolve_api_key(None)
    assert KEY not in _everything(caught.value)


def test_key_with_surrounding_whitespace_works_over_http(
    make_client: Callable[..., WaveSpeedClient],
    emulator: Emulator,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    client = make_client(emulator, api_key=f"  {KEY}\r\n")
    prediction = client.run(I2VRequest(image=str(SAMPLE), prompt="whitespace key"))
    assert prediction.status.is_success
    assert KEY not in all_logs.text


@pytest.mark.parametrize(
    "value",
    [
        "sk-proj-Zq8vR2mX4pL9tK7wB3nF",
        "whsec_abcdefghijklmnop",
        "AKIAIOSFODNN7EXAMPLE",
        "Bearer abc.def",
        "8f3a9c2e71b04d6f9e5a3c1b7d2e4f60",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "https://b.s3.amazonaws.com/a.png?X-Amz-Signature=0f1e2d",
        "https://cdn.example/a.png?token=abc",
        "https://user:pass@example.com/a.png",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        "hf_AbCdEfGhIjKlMnOpQrStUv",
        "ghp_0123456789abcdefABCDEF",
    ],
)
def test_credentials_are_never_quoted(value: str) -> None:
    assert looks_like_secret(value)
    shown = quote_value(value)
    assert value not in shown and str(len(value)) in shown


@pytest.mark.parametrize(
    "value",
    [
        "a cat",
        "shots/take:1.png",
        "/tmp/pytest-of-x/test_header_claiming_too_many_p0/a.png",
        "my-lora",
        "heavy",
        "2147483648",
        "row-00001",
    ],
)
def test_ordinary_short_values_are_quoted(value: str) -> None:
    assert quote_value(value) == repr(value)


def test_long_values_are_not_quoted() -> None:
    assert quote_value("a" * 500) == "(a 500-character value, not shown)"


SECRET = "sk-live-Zq8vR2mX4pL9tK7wB3nF0aYc"


def test_a_pasted_key_never_reaches_errors_or_logs(
    tmp_path: Path, all_logs: pytest.LogCaptureFixture
) -> None:
    rows = [
        {"id": SECRET, "image": URL, "prompt": "p"},
        {"image": SECRET, "prompt": "p"},
        {"image": URL, "prompt": "p", "seed": SECRET},
        {"image": URL, "prompt": "p", SECRET: 1},
        {"image": URL, "prompt": "p", "loras": [{"path": "x\n" + SECRET}]},
        {"image": f"https://{SECRET}/a b.png", "prompt": "p"},
        {"image": URL, "prompt": "p", "duration": SECRET},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.append(f'{{"image": "{URL}", "prompt": "p", "{SECRET}": 1, "{SECRET}": 2}}')
    lines.append(json.dumps({"image": str(SAMPLE), "prompt": "the good row"}))
    items = parse_manifest("\n".join(lines).encode(), name="m.jsonl", base_dir=tmp_path)
    assert [i.ok for i in items] == [False] * (len(lines) - 1) + [True]
    for item in items[:-1]:
        assert item.error and item.error.startswith(f"row {item.row}: ")
        assert SECRET not in item.error
    assert SECRET not in all_logs.text


@pytest.mark.parametrize(
    "data",
    [
        f"{SECRET},image,prompt\n{URL},p,q\n",  # a header-less CSV: row 1 is the header
        f"image,prompt,seed\n{URL},p,{SECRET}\n",
        f"image,prompt,loras\n{URL},p,{SECRET}=heavy\n",
        f"image,prompt\n{SECRET},p\n",
    ],
    ids=["header-less CSV", "seed cell", "lora cell", "image cell"],
)
def test_csv_errors_never_echo_a_pasted_key(data: str, tmp_path: Path) -> None:
    try:
        items = parse_manifest(data.encode(), name="m.csv", base_dir=tmp_path)
    except ManifestError as exc:
        assert SECRET not in _everything(exc)
        return
    errors = [i.error or "" for i in items if not i.ok]
    assert errors and all(SECRET not in e for e in errors)


def test_request_errors_never_carry_the_input() -> None:
    with pytest.raises(ValidationError) as caught:
        I2VRequest(image=SECRET, prompt="p", seed=SECRET)  # type: ignore[arg-type]
    assert SECRET not in _everything(caught.value)
    assert {e["loc"][0] for e in caught.value.errors()} == {"image", "seed"}


def test_prompts_are_sent_without_controls_or_terminal_escapes() -> None:
    request = I2VRequest(
        image=URL, prompt="\x1b[31ma red\x00 cat\x1b[0m\tin\nrain", negative_prompt="\x00\u200b"
    )
    payload = request.to_payload()
    assert payload["prompt"] == "a red cat\tin\nrain"
    assert "negative_prompt" not in payload  # nothing visible was left of it


def test_upper_case_scheme_is_a_url_not_a_local_file() -> None:
    request = I2VRequest(image="HTTPS://Example.com/A.png", prompt="p", last_image="Http://h/b.png")
    assert request.image == "https://Example.com/A.png"
    assert request.local_images() == {}
    assert request.to_payload()["last_image"] == "http://h/b.png"
