"""Shared fixtures: emulators on free loopback ports, and clients tuned for fast tests."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wan_tasks import PollPolicy, RetryPolicy, Timeouts, WaveSpeedClient
from wan_tasks.emulator import Emulator, EmulatorConfig

SAMPLE = Path(__file__).resolve().parents[1] / "wan_tasks" / "assets" / "sample.png"
FAST_POLL = PollPolicy(first_poll_after=0.1, min_interval=0.1, max_interval=0.3, jitter=0.0)
FAST_RETRY = RetryPolicy(max_attempts=5, backoff=0.05, max_backoff=0.2)


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., Emulator]]:
    """Start emulators with given settings; every one is stopped at teardown."""
    started: list[Emulator] = []

    def make(**settings: Any) -> Emulator:
        settings.setdefault("api_key", "test-key-0123456789abcdef")
        settings.setdefault("latency_s", 0.3)
        emu = Emulator(EmulatorConfig(**settings)).start()
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


@pytest.fixture
def emulator(make_emulator: Callable[..., Emulator]) -> Emulator:
    return make_emulator()


@pytest.fixture
def make_client() -> Iterator[Callable[..., WaveSpeedClient]]:
    made: list[WaveSpeedClient] = []

    def make(emu: Emulator, **kwargs: Any) -> WaveSpeedClient:
        kwargs.setdefault("poll", FAST_POLL)
        kwargs.setdefault("retry", FAST_RETRY)
        kwargs.setdefault("timeouts", Timeouts(read=5.0, submit_read=5.0))
        client = WaveSpeedClient(kwargs.pop("api_key", emu.api_key), emu.base_url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(emulator: Emulator, make_client: Callable[..., WaveSpeedClient]) -> WaveSpeedClient:
    return make_client(emulator)


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture every logger at DEBUG, for secret-leak checks."""
    caplog.set_level(logging.DEBUG)
    return caplog
