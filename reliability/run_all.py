"""`make soak`: every reliability suite at full size, with the figures RELIABILITY.md reports.

python -m reliability.run_all [--quick] [--out var/reliability]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from wan_tasks.devstack.processes import end_child, interrupt_on_sigterm

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--out", default=str(REPO / "var" / "reliability"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crash = ["--videos", "12", "--kills", "3"] if args.quick else ["--videos", "50", "--kills", "6"]
    soak = ["--videos", "40"] if args.quick else ["--videos", "200"]
    suites = {
        "bad_input": [sys.executable, "-m", "reliability.bad_input"],
        "crash_resume": [
            sys.executable,
            "-m",
            "reliability.crash_resume",
            *crash,
            "--json",
            str(out / "crash_resume.json"),
        ],
        "soak": [sys.executable, "-m", "reliability.soak", *soak, "--json", str(out / "soak.json")],
    }
    codes = {}
    for name, command in suites.items():
        began = time.monotonic()
        print(f"== {name}: {' '.join(command[2:])}", flush=True)
        with subprocess.Popen(command, cwd=REPO) as suite:
            try:
                codes[name] = suite.wait()
            except BaseException as exc:
                # Ctrl-C or SIGTERM: the suite stops its servers (a SIGKILL, what
                # subprocess.run sends, would leave them running); wait for it.
                end_child(suite, exc)
                raise
        print(f"== {name}: exit {codes[name]} in {time.monotonic() - began:.0f}s", flush=True)
    (out / "exit_codes.json").write_text(json.dumps(codes))
    return 0 if not any(codes.values()) else 1


if __name__ == "__main__":
    interrupt_on_sigterm()
    raise SystemExit(main())
