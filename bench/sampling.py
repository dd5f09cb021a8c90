"""Watching a run from outside: the emulator's tasks in flight over time, and peak memory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench.common import rss_mib
from bench.stack import EmulatorProcess


@dataclass
class Watch:
    """Samples (every `every` s) the emulator's tasks in flight and this process's RSS."""

    emulator: EmulatorProcess
    every: float = 0.5
    in_flight: list[int] = field(default_factory=list)
    peak_rss_mib: float = 0.0

    @property
    def mean_in_flight(self) -> float:
        """Mean tasks in flight from the first submission to the end of the run."""
        busy = self.in_flight
        start = next((i for i, n in enumerate(busy) if n), len(busy))
        window = busy[start:]
        return sum(window) / len(window) if window else 0.0

    @contextmanager
    def running(self) -> Iterator[Watch]:
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    stats: dict[str, Any] = self.emulator.stats()
                except Exception:  # a missed sample is not worth failing the benchmark
                    stats = {}
                self.in_flight.append(int(stats.get("in_flight", 0)))
                self.peak_rss_mib = max(self.peak_rss_mib, rss_mib())
                stop.wait(self.every)

        thread = threading.Thread(target=loop, name="bench-watch", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=10)
