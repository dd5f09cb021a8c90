"""`wan-video`: the command line. Output for people goes to stdout; diagnostics to logging."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wan_tasks.emulator.config import EmulatorConfig
from wan_tasks.emulator.server import Emulator, load_config_file

ASSETS = Path(__file__).parent / "assets"
SAMPLE_IMAGE = ASSETS / "sample.png"


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def cmd_emulator(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    api_key = args.api_key or os.environ.get("WAVESPEED_EMULATOR_KEY") or settings.pop(
        "api_key", None
    )
    if not api_key:
        _out("error: --api-key (or WAVESPEED_EMULATOR_KEY) is required")
        return 2
    for name in ("latency_s", "time_scale", "concurrency", "output_ttl_s"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    emulator = Emulator(EmulatorConfig(api_key=api_key, **settings), args.host, args.port)
    # SIGTERM stops it as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    _out(f"WaveSpeed emulator on {emulator.base_url} (Ctrl-C to stop)")
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wan_tasks.demo import run_demo

    result = run_demo(Path(args.out), image=Path(args.image), prompt=args.prompt)
    info = result.info
    _out(f"prediction {result.prediction_id}: seed {result.seed}, ${result.cost_usd} (emulated)")
    _out(f"video: {result.video} ({info.width}x{info.height}, {info.frames} frames, "
         f"{info.duration_s:.2f}s, {info.codec})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-video", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    emu = sub.add_parser("emulator", help="run the local WaveSpeed API emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=0, help="0 picks a free port")
    emu.add_argument("--api-key", help="the key clients must send (or WAVESPEED_EMULATOR_KEY)")
    emu.add_argument("--config", help="JSON file with EmulatorConfig fields (faults etc.)")
    emu.add_argument("--latency-s", dest="latency_s", type=float)
    emu.add_argument("--time-scale", dest="time_scale", type=float)
    emu.add_argument("--concurrency", type=int)
    emu.add_argument("--output-ttl-s", dest="output_ttl_s", type=float)
    emu.set_defaults(func=cmd_emulator)

    demo = sub.add_parser("demo", help="generate one video from the bundled image, offline")
    demo.add_argument("--out", default="var/demo", help="where to put the results")
    demo.add_argument("--image", default=str(SAMPLE_IMAGE))
    demo.add_argument(
        "--prompt", default="slow aerial drift over a mountain lake at sunset, gentle ripples"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
