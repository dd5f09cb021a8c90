"""Redis locks for the submit task's SERIALIZABLE cache transaction, shared by every host.

prefect-redis's `RedisLockManager` is what Prefect offers for locks across machines, but as
Prefect 3.9 drives it a lock never expires: `Transaction.begin()` calls `acquire_lock(key,
holder)` with no hold timeout, so the key is written with no TTL, and a holder killed inside the
transaction (kill -9, OOM, a lost machine) blocks every later run of the same request for good,
the same bug as Prefect's file locks (see `locking.CrashSafeFileLockManager`). It also forgets
a second thread's lock when the first thread of the same process releases (its lock table is
keyed by lock name alone), and a reader's `wait_for_lock` briefly takes a TTL-less lock itself.

`RenewingRedisLockManager` keeps prefect-redis's connection handling (redis://, rediss://,
Sentinel URLs) and key layout (`lock:<key>`), and changes what matters:

- every lock is a lease of `lease_s` seconds, renewed every `renew_every_s` by one daemon thread
  while its process lives: a dead holder's lock is free within `lease_s`, a live holder keeps
  its lock however long its submit takes (a rate-limit slot, a large upload, a reconcile);
- a waiter logs who holds the lock (the holder's host, pid and thread, read from Redis) and
  when it got it, in the task run's log;
- Redis errors become `LockUnavailableError` (retryable) or `ConfigurationError` (refused
  credentials), with the URL shown without its credentials.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from prefect_redis import RedisLockManager
from prefect_redis.connection import redis_from_url
from pydantic import SecretStr
from redis.exceptions import AuthenticationError, LockNotOwnedError, RedisError, ResponseError
from redis.lock import Lock

from wan_tasks.errors import ConfigurationError, LockUnavailableError

logger = logging.getLogger(__name__)

# A dead holder's lock is free after at most this long, so a re-run after a crash waits up to a
# minute for it. Renewed three times a lease (every lease_s / 3), so two renewals in a row may
# fail (a Redis blip, a GIL-starved process on a loaded machine) before a live holder loses its
# lock. A holder frozen for longer than this (SIGSTOP, swap, a partition from Redis) does lose
# it: another host may then run the same submit, and the ledger's claim in the bucket is what
# still stops a second payment.
LEASE_S = 60.0
# No acquire timeout: a waiter waits as long as the lock is held, which the lease bounds once
# the holder is gone. A finite one would be worse than useless: Prefect's Transaction.begin()
# ignores what acquire_lock returns and runs the task without the lock when it times out.
# How often a waiter tries the lock: a SET NX per try, cheap for Redis even with many waiters.
POLL_S = 0.1
# A waiter says it is still waiting this often (a holder's submit can take minutes).
NOTICE_EVERY_S = 30.0
SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0


def redis_location(url: str) -> str:
    """The URL as it may be shown: scheme, hosts, port and database, no user, password or
    query (which may carry `password=`)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<a Redis URL that is not scheme://host>"
    hosts, _, path = rest.partition("?")[0].partition("/")
    auth = "@" in hosts
    hosts = hosts.rsplit("@", 1)[-1]
    return f"{scheme}://{'***@' if auth else ''}{hosts}/{path}"


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    # In a task run: its log (the Prefect UI shows why a submit waited); else this module's.
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


class RenewingRedisLockManager(RedisLockManager):  # type: ignore[misc]  # untyped package
    """prefect-redis's lock manager with renewed leases instead of TTL-less keys.

    `connection_url` is a redis://, rediss:// or redis+sentinel:// URL; its credentials are
    never shown (repr, logs, errors).
    """

    def __init__(
        self,
        connection_url: str | SecretStr,
        *,
        lease_s: float = LEASE_S,
        renew_every_s: float | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        url = connection_url if isinstance(connection_url, SecretStr) else SecretStr(connection_url)
        self._url = url
        self.location = redis_location(url.get_secret_value())
        self.lease_s = lease_s
        self.renew_every_s = renew_every_s if renew_every_s is not None else lease_s / 3
        self.poll_s = poll_s
        self._mutex = threading.Lock()
        self._held: dict[str, Lock] = {}  # lock name -> the lock this process holds
        self._lost: set[str] = set()  # held, but its lease ran out before a renewal
        self._renewer: threading.Thread | None = None
        self.renewals = 0
        # The URL stays in the SecretStr: the parent's connection fields are left at their
        # defaults, unused (this class makes the clients and pickles itself).
        super().__init__()

    def _init_clients(self) -> None:
        # Explicit socket timeouts: a Redis that stops answering fails the lock call
        # (LockUnavailableError, retried) instead of hanging the task.
        url = self._url.get_secret_value()
        options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
        }
        self.client = redis_from_url(url, **options)
        self.async_client = redis_from_url(url, asynchronous=True, **options)

    # -- pickling: a task's cache policy travels to other processes with its lock manager ----

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self._url.get_secret_value(),
            "lease_s": self.lease_s,
            "renew_every_s": self.renew_every_s,
            "poll_s": self.poll_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["url"],
            lease_s=state["lease_s"],
            renew_every_s=state["renew_every_s"],
            poll_s=state["poll_s"],
        )

    def __repr__(self) -> str:
        return f"RenewingRedisLockManager({self.location!r}, lease_s={self.lease_s:g})"

    def __eq__(self, other: object) -> bool:  # cache policies compare lock managers
        return (
            isinstance(other, RenewingRedisLockManager)
            and other._url.get_secret_value() == self._url.get_secret_value()
            and other.lease_s == self.lease_s
        )

    def __hash__(self) -> int:
        return hash((self._url.get_secret_value(), self.lease_s))

    # -- errors ------------------------------------------------------------------------------

    def _unavailable(self, what: str, exc: RedisError) -> Exception:
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, AuthenticationError) or (
            isinstance(exc, ResponseError) and str(exc).startswith(("NOAUTH", "WRONGPASS"))
        ):
            return ConfigurationError(
                f"WAN_TASKS_REDIS_URL: Redis at {self.location} refused the credentials while "
                f"{what} ({detail})"
            )
        return LockUnavailableError(
            f"Redis at {self.location} (WAN_TASKS_REDIS_URL) did not answer while {what} "
            f"({detail}); nothing was submitted"
        )

    # -- the lock ----------------------------------------------------------------------------

    def _holder_of(self, name: str) -> str | None:
        token = self.client.get(name)
        return token.decode(errors="replace") if isinstance(token, bytes) else None

    def _mine(self, name: str, holder: str) -> Lock | None:
        with self._mutex:
            lock = self._held.get(name)
        token = getattr(lock.local, "token", None) if lock is not None else None
        return lock if token is not None and token == holder.encode() else None

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        """Take the lock for `key`, waiting up to `acquire_timeout` seconds (None: as long as
        it is held; Prefect passes None). The lease is `hold_timeout` when given, else
        `lease_s`, renewed while this process lives."""
        name = self._lock_name_for_key(key)
        if self._mine(name, holder) is not None:
            return True
        lock = Lock(
            self.client,
            name,
            timeout=hold_timeout or self.lease_s,
            sleep=self.poll_s,
            thread_local=False,
        )
        try:
            return self._wait_and_take(key, name, lock, holder, acquire_timeout)
        except RedisError as exc:
            raise self._unavailable(f"taking the lock {key}", exc) from None

    def _wait_and_take(
        self, key: str, name: str, lock: Lock, holder: str, acquire_timeout: float | None
    ) -> bool:
        began = time.monotonic()
        deadline = None if acquire_timeout is None else began + acquire_timeout
        seen: str | None = None
        notice_at = 0.0
        while not lock.acquire(token=holder, blocking=False):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                _run_logger().info(
                    "lock %s still held by %s after %.1f s; not waiting longer",
                    key,
                    seen,
                    now - began,
                )
                return False
            held_by = self._holder_of(name)
            if held_by is not None and (held_by != seen or now >= notice_at):
                _run_logger().info(
                    "lock %s is held by %s in Redis at %s; %s",
                    key,
                    held_by,
                    self.location,
                    "waiting for it" if seen is None else f"still waiting ({now - began:.0f} s)",
                )
                seen, notice_at = held_by, now + NOTICE_EVERY_S
            time.sleep(
                self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - now))
            )
        if seen is not None:
            _run_logger().info(
                "took lock %s after waiting %.1f s for %s", key, time.monotonic() - began, seen
            )
        with self._mutex:
            self._held[name] = lock
            self._lost.discard(name)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="wan-redis-lock-renewer", daemon=True
                )
                self._renewer.start()
        return True

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        # One kind of lock (sync, renewed by one thread) whichever engine takes it.
        return await asyncio.to_thread(
            self.acquire_lock, key, holder, acquire_timeout, hold_timeout
        )

    def release_lock(self, key: str, holder: str) -> None:
        """Release `holder`'s lock. A lock that expired before its release (this process was
        frozen past its lease) is logged, not raised: the result is already committed by
        then. Raises ValueError, as prefect-redis does, when another holder holds it."""
        name = self._lock_name_for_key(key)
        lock = self._mine(name, holder)
        if lock is not None:
            with self._mutex:
                if self._held.get(name) is lock:
                    del self._held[name]
                    self._lost.discard(name)
            try:
                lock.release()
            except LockNotOwnedError:
                _run_logger().warning(
                    "lock %s had expired before it was released (this process stalled for "
                    "more than its %g s lease); another host may have run the same submit",
                    key,
                    self.lease_s,
                )
            except RedisError as exc:
                _run_logger().warning(
                    "could not release lock %s in Redis at %s (%s); it expires within %g s",
                    key,
                    self.location,
                    type(exc).__name__,
                    self.lease_s,
                )
            return
        if not self.is_locked(key):
            return
        raise ValueError(f"No lock held by {holder} for transaction with key {key}")

    def is_locked(self, key: str) -> bool:
        try:
            return bool(self.client.exists(self._lock_name_for_key(key)))
        except RedisError as exc:
            raise self._unavailable(f"reading the lock {key}", exc) from None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return self._mine(self._lock_name_for_key(key), holder) is not None

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until nobody holds `key` (by reading it: prefect-redis takes and drops a
        TTL-less lock here, which a reader dying at that moment would leave behind)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_s)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.wait_for_lock, key, timeout)

    # -- renewal -----------------------------------------------------------------------------

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.renew_every_s)
            with self._mutex:
                held = [(n, lock) for n, lock in self._held.items() if n not in self._lost]
            for name, lock in held:
                try:
                    lock.reacquire()
                    self.renewals += 1
                except LockNotOwnedError:
                    # Kept in the table, so its release is logged as expired, not refused.
                    with self._mutex:
                        if self._held.get(name) is lock:
                            self._lost.add(name)
                    logger.warning(
                        "lost %s: its %g s lease ran out before it was renewed", name, self.lease_s
                    )
                except RedisError as exc:  # tried again next round, within the lease
                    logger.warning("could not renew %s: %s", name, type(exc).__name__)
