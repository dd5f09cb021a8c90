"""The emulator in a process of its own (started by `bench.stack.EmulatorProcess`).

It stands in for a remote service: its rendering (~0.4 CPU-s per video) must not share a GIL
with the process being measured. Prints one JSON line (base_url, api_key), then serves until
its stdin closes (the parent exiting, however it exits) or SIGTERM.

With `render_once` (a bench option, not an emulator setting), the emulator's renderer is
memoised per duration in this process: the first task of each duration renders, later ones
get the same MP4. For runs of hundreds of short tasks, where rendering (~0.4 CPU-s a video)
would otherwise measure the emulator rather than the code under test. The emulator's code
is unchanged.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any


def main() -> None:
    from wan_tasks.emulator import run_emulator

    settings: dict[str, Any] = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    if settings.pop("render_once", False):
        _render_once()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with run_emulator(**settings) as emu:
        print(json.dumps({"base_url": emu.base_url, "api_key": emu.api_key}), flush=True)
        threading.Thread(target=_until_eof, args=(stop,), daemon=True).start()
        stop.wait()


def _until_eof(stop: threading.Event) -> None:
    sys.stdin.read()
    stop.set()


def _render_once() -> None:
    from wan_tasks.emulator import engine

    real = engine.render_i2v  # type: ignore[attr-defined]
    cache: dict[int, bytes] = {}
    lock = threading.Lock()

    def render(first: bytes, last: bytes | None, *, duration: int, seed: int,
               prompt: str = "") -> bytes:
        with lock:
            if duration not in cache:
                cache[duration] = real(first, last, duration=duration, seed=seed, prompt=prompt)
            return cache[duration]

    engine.render_i2v = render  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
