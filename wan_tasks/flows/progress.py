"""Progress of a flow run's videos: counters the Producer moves, a periodic log line, watchers.

A `Progress` counts each video through queued -> in flight -> archived / failed (skipped over
budget counts as failed here: it did not land) and reads the run's new spend from its budget.
While a run is going, a reporter thread writes one line through the flow run's logger (so it is
visible in the Prefect UI) at each change, coalesced to at most one a second, and at least every
`every_s` seconds. Watchers (`watch`, used by the `wan-video` command's live display) get every
new snapshot in the same process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

logger = logging.getLogger(__name__)

_watchers: list[Callable[[Snapshot], None]] = []
_watchers_lock = threading.Lock()


@dataclass(frozen=True)
class Snapshot:
    """The counts at one moment; `eta_s` is None until a video has finished."""

    total: int
    queued: int
    in_flight: int
    archived: int
    failed: int
    spend_usd: Decimal
    elapsed_s: float
    eta_s: float | None

    @property
    def done(self) -> int:
        return self.archived + self.failed

    def line(self) -> str:
        eta = "estimating" if self.eta_s is None else _duration(self.eta_s)
        if self.done == self.total:
            eta = "done"
        return (
            f"{self.archived}/{self.total} archived, {self.in_flight} in flight, "
            f"{self.queued} queued, {self.failed} failed; new spend ${self.spend_usd}; "
            f"{_duration(self.elapsed_s)} elapsed, time left {eta}"
        )


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextmanager
def watch(callback: Callable[[Snapshot], None]) -> Iterator[None]:
    """Call `callback` with each snapshot of any run in this process while the block runs."""
    with _watchers_lock:
        _watchers.append(callback)
    try:
        yield
    finally:
        with _watchers_lock:
            _watchers.remove(callback)


class Progress:
    """Thread-safe counters for one run's videos, with a reporter thread while started."""

    def __init__(
        self,
        total: int,
        *,
        spend: Callable[[], Decimal] | None = None,
        log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
        every_s: float = 5.0,
    ) -> None:
        self.total = total
        self._spend = spend or (lambda: Decimal("0"))
        self._log = log  # None: no log lines (one video: its wait logs instead)
        self._every = every_s
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._queued, self._in_flight, self._archived, self._failed = total, 0, 0, 0
        self._started = time.monotonic()
        self._thread: threading.Thread | None = None

    # -- what the Producer calls -------------------------------------------------------------

    def started(self) -> None:
        """A video left the queue: it is being submitted or waited on."""
        with self._lock:
            self._queued -= 1
            self._in_flight += 1
        self._changed.set()

    def finished(self, ok: bool, *, was_started: bool = True) -> None:
        """A video landed (`ok`) or did not; `was_started=False`: it never left the queue."""
        with self._lock:
            if was_started:
                self._in_flight -= 1
            else:
                self._queued -= 1
            if ok:
                self._archived += 1
            else:
                self._failed += 1
        self._changed.set()

    # -- reading -----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            queued, in_flight = self._queued, self._in_flight
            archived, failed = self._archived, self._failed
        elapsed = time.monotonic() - self._started
        done = archived + failed
        # Finished videos so far set the pace; a run's first minutes are the roughest guess.
        eta = elapsed / done * (self.total - done) if done else None
        return Snapshot(
            self.total, queued, in_flight, archived, failed, self._spend(), elapsed, eta
        )

    # -- reporting ---------------------------------------------------------------------------

    def __enter__(self) -> Progress:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._report, name="wan-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._emit(self.snapshot())

    def _report(self) -> None:
        # A line at each change and, when nothing moved, a heartbeat every `every_s`.
        while not self._stop.is_set():
            changed = self._changed.wait(self._every)
            if self._stop.is_set():
                return
            self._changed.clear()
            self._emit(self.snapshot())
            if changed:
                self._stop.wait(1.0)  # coalesce bursts (many videos landing at once)

    def _emit(self, snap: Snapshot) -> None:
        if self._log is not None:
            self._log.info("progress: %s", snap.line())
        with _watchers_lock:
            watchers = list(_watchers)
        for callback in watchers:
            try:
                callback(snap)
            except Exception:  # a display must never break a run
                logger.debug("progress watcher failed", exc_info=True)
