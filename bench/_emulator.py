"""`python -m wan_tasks.cli emulator`, optionally with rendering memoised (started by
`bench.stack.EmulatorProcess` as the emulator's command; same arguments, same output).

With `--render-once` (a bench option, not an emulator setting), the emulator's renderer is
memoised per duration in this process: the first task of each duration renders, later ones
get the same MP4. For runs of hundreds of short tasks, where rendering (~0.4 CPU-s a video)
would otherwise measure the emulator rather than the code under test. The emulator's code
is unchanged.
"""

from __future__ import annotations

import sys
import threading

RENDER_ONCE = "--render-once"


def main(argv: list[str]) -> int:
    from wan_tasks.cli.main import main as cli

    if RENDER_ONCE in argv:
        argv = [a for a in argv if a != RENDER_ONCE]
        _render_once()
    return cli(["emulator", *argv])


def _render_once() -> None:
    from wan_tasks.emulator import engine

    real = engine.render_i2v  # type: ignore[attr-defined]
    cache: dict[int, bytes] = {}
    lock = threading.Lock()

    def render(
        first: bytes, last: bytes | None, *, duration: int, seed: int, prompt: str = ""
    ) -> bytes:
        with lock:
            if duration not in cache:
                cache[duration] = real(first, last, duration=duration, seed=seed, prompt=prompt)
            return cache[duration]

    engine.render_i2v = render  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
