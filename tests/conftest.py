"""Shared fixtures: emulators on free loopback ports, and clients tuned for fast tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid

# Isolate Prefect's home (result storage, cache keys, lock files) before anything imports prefect:
# the test harness isolates the database only.
_PREFECT_HOME = tempfile.mkdtemp(prefix="wan-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
# The emulator's history never lags: a lost submit answer need not wait 14 s for it to settle
# (the in-process flows and the child processes inherit it; the multi-host hosts get it too).
os.environ["WAN_TASKS_RECONCILE_SETTLE_S"] = "[0.2, 0.5, 1.0]"

import logging  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

from wan_tasks import PollPolicy, RetryPolicy, Timeouts, WaveSpeedClient  # noqa: E402
from wan_tasks.emulator import Emulator, EmulatorConfig  # noqa: E402

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
def make_http() -> Iterator[Callable[[Emulator], httpx.Client]]:
    """Raw httpx clients authenticated to an emulator, for tests of the wire itself."""
    made: list[httpx.Client] = []

    def make(emu: Emulator) -> httpx.Client:
        c = httpx.Client(
            base_url=emu.base_url,
            timeout=httpx.Timeout(30.0),
            headers={"Authorization": f"Bearer {emu.api_key}"},
        )
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def emulator(make_emulator: Callable[..., Emulator]) -> Emulator:
    return make_emulator()


@pytest.fixture
def make_client() -> Iterator[Callable[..., WaveSpeedClient]]:
    made: list[WaveSpeedClient] = []

    def make(emu: Emulator, **kwargs: Any) -> WaveSpeedClient:
        kwargs.setdefault("poll", FAST_POLL)
        kwargs.setdefault("retry", FAST_RETRY)
        # Generous: an in-process emulator answers late when two suites share 2 cores (a 5 s
        # read timed out a download there); tests of timeouts set their own.
        kwargs.setdefault("timeouts", Timeouts(read=20.0, submit_read=20.0))
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
    """Capture every logger at DEBUG, for secret-leak checks (named ones too: the CLI and
    Prefect raise some, such as httpx, to WARNING)."""
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "wan_tasks", "prefect", "botocore", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


# -- xdist groups ----------------------------------------------------------------------------
# `--dist loadgroup` keeps a module's tests on one worker (their module-scoped servers start
# once). pytest-xdist 3.8 marks a group by renaming the test's nodeid, which pytest 9 ignores
# (nodeids are structured there): every group was silently spread over both workers. The
# scheduler below groups by module for the modules named here; each of their tests must carry
# the same `xdist_group` mark (checked at collection), which is what a fixed xdist reads.
XDIST_GROUPS = {
    "tests/test_fanout.py": "fanout",
    "tests/test_multihost.py": "multihost",
    "tests/test_redis_locking.py": "redis",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marks = {str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args}
        module = item.nodeid.split("::", 1)[0]
        expected = {XDIST_GROUPS[module]} if module in XDIST_GROUPS else set()
        assert marks == expected, f"{item.nodeid}: xdist groups {marks} != {expected}"


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope: str = super()._split_scope(nodeid)
            if scope != nodeid:
                return scope  # xdist's own group suffix: it works here
            return XDIST_GROUPS.get(nodeid.split("::", 1)[0].split("@", 1)[0], nodeid)

    return ModuleGroups(config, log)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


# -- the real stack: Prefect test server, SeaweedFS, emulator --------------------------------

TEST_BUCKET = "test-videos"


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect server for the whole session (each start costs ~20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from wan_tasks.storage.seaweed import SeaweedFS

    with SeaweedFS(tmp_path_factory.mktemp("seaweed"), buckets=[TEST_BUCKET]) as weed:
        yield weed.endpoint


@dataclass
class Stack:
    emulator: Emulator
    s3: Any  # a boto3 S3 client on the test SeaweedFS
    bucket: str

    def stats(self) -> dict[str, Any]:
        return self.emulator.stats()

    def object(self, uri: str) -> tuple[bytes, dict[str, Any]]:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        answer = self.s3.get_object(Bucket=bucket, Key=key)
        return answer["Body"].read(), answer


@pytest.fixture(autouse=True)
def _fresh_block_reads() -> None:
    """Each test saves its own blocks: none is served from a read an earlier test made
    (the process keeps a block for BLOCK_REFRESH_S)."""
    from wan_tasks.integration import runtime

    runtime._blocks.clear()


@pytest.fixture
def make_stack(
    prefect_server: None,
    s3_store: Any,
    make_emulator: Callable[..., Emulator],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Stack]:
    """Point the flows at a fresh emulator and the test S3, with the given in-flight limit."""

    def make(in_flight: int = 3, **emulator_settings: Any) -> Stack:
        from wan_tasks.integration.limits import ensure_limits

        emulator_settings.setdefault("latency_s", 0.5)
        emulator_settings.setdefault("concurrency", 10)
        # A key per emulator: the process's clients are per account, and a client reuses
        # its uploads (a new emulator on a port an old one had would not know them).
        emulator_settings.setdefault("api_key", f"test-key-{uuid.uuid4().hex}")
        emu = make_emulator(**emulator_settings)
        monkeypatch.setenv("WAVESPEED_API_KEY", emu.api_key)
        monkeypatch.setenv("WAVESPEED_BASE_URL", emu.base_url)
        for key, value in s3_store.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("WAN_TASKS_BUCKET", TEST_BUCKET)
        ensure_limits(in_flight, None)
        return Stack(emu, s3_store.boto3_client(), TEST_BUCKET)

    return make


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


def run_video(*args: Any, **kwargs: Any) -> Any:
    """`generate_video` (an async flow) called from synchronous test code."""
    from wan_tasks.flows.generate import generate_video

    return asyncio.run(generate_video(*args, **kwargs))
