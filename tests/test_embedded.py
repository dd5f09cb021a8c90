"""Embedded defaults: started only for what is not configured, and refusable on workers."""

from __future__ import annotations

import os

import pytest

from wan_tasks import settings
from wan_tasks.devstack.embedded import embedded_defaults
from wan_tasks.errors import ConfigurationError


def test_workers_can_forbid_the_embedded_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    monkeypatch.setenv("WAN_TASKS_BUCKET", "configured")
    monkeypatch.setenv("WAN_TASKS_NO_EMBEDDED", "1")
    with pytest.raises(ConfigurationError, match="WAVESPEED_API_KEY not set"), embedded_defaults():
        pass


def test_only_the_missing_service_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    monkeypatch.setenv("WAN_TASKS_BUCKET", "configured")
    monkeypatch.delenv("WAVESPEED_BASE_URL", raising=False)
    with embedded_defaults() as services:
        assert services.emulator_url and services.s3_endpoint is None
        assert settings.current().base_url == services.emulator_url
        inner_key = settings.current().api_key
        assert inner_key is not None
        # Passed as settings, not through the environment other libraries and children see.
        assert "WAVESPEED_API_KEY" not in os.environ
        assert "WAVESPEED_BASE_URL" not in os.environ
        with embedded_defaults() as nested:  # re-entrant: reuses, starts nothing
            assert nested == services and settings.current().api_key == inner_key
    assert settings.current().api_key is None  # gone on exit


def test_a_named_credentials_block_means_no_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    with embedded_defaults(emulator=False, s3=False) as services:
        assert not services.any
