"""The API key never appears in a repr, a log line, an exception or anything persisted."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import SAMPLE
from wan_tasks import I2VRequest, WaveSpeedError
from wan_tasks.credentials import WaveSpeedCredentials

KEY = "sk-live-SECRET-9f8e7d6c5b4a"


def test_key_never_reaches_logs_or_errors(
    make_emulator: Callable[..., Any], make_client: Callable[..., Any],
    all_logs: pytest.LogCaptureFixture,
) -> None:
    emu = make_emulator(api_key=KEY, faults={"script": {
        "result": ["503", "429"], "submit": ["fail:5003"], "download": ["expire"]}})
    client = make_client(emu)
    errors: list[BaseException] = []
    for req in (I2VRequest(image=str(SAMPLE), prompt="x", seed=1),
                I2VRequest(image=str(SAMPLE), prompt="x", seed=2)):
        try:
            done = client.run(req)
            with client.stream_output(done.outputs[0]):
                pass
        except WaveSpeedError as exc:
            errors.append(exc)
    wrong = make_client(emu, api_key="not-the-key")
    try:
        wrong.balance()
    except WaveSpeedError as exc:
        errors.append(exc)
    assert len(errors) == 3  # the 5003 failure, the expired download, the 401
    text = all_logs.text + "".join(r.getMessage() for r in all_logs.records)
    assert "HTTP Request" in text  # httpx did log, and logs were captured
    assert KEY not in text
    for exc in errors:
        assert KEY not in str(exc) and KEY not in repr(exc)
        assert KEY.encode() not in pickle.dumps(exc)
    assert KEY not in repr(client) and KEY not in repr(client.ops)


def test_credentials_block_hides_the_key() -> None:
    creds = WaveSpeedCredentials(api_key=KEY, base_url="http://127.0.0.1:9")
    assert KEY not in repr(creds) and KEY not in str(creds)
    assert KEY not in creds.model_dump_json()
    client = creds.get_client()
    try:
        assert KEY not in repr(client)
    finally:
        client.close()


def test_missing_key_is_a_clear_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from wan_tasks import ConfigurationError, WaveSpeedClient

    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="WAVESPEED_API_KEY"):
        WaveSpeedClient()
    monkeypatch.setenv("WAVESPEED_API_KEY", KEY)
    monkeypatch.setenv("WAVESPEED_BASE_URL", "ftp://nope")
    with pytest.raises(ConfigurationError, match="http"):
        WaveSpeedClient()
