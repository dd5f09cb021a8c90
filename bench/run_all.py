"""Run every benchmark (`make bench`), each in a subprocess of its own, against one Prefect
server started once (its start time is reported, and excluded from every figure).

    python -m bench.run_all [--quick] [--only overhead,batch,...] [--no-diagnosis]
                            [--json results.json]

Full (~22 min here): overhead, batch (100 videos), polls (60 s tasks), a first wave's polls
(virtual time), archive (1 GiB) on
the default SQLite Prefect server; then, when PostgreSQL is installed, the diagnosis with the
Prefect server on PostgreSQL: overhead again, the 100-video batch with the default and the
tuned poll policy, and growth to 10, 100 and 1000 videos (without
PostgreSQL, growth runs on SQLite at 10 and 100). `--quick` (~7 min): 2 rounds, 20 videos,
256 MiB, growth at 10 and 30, all on SQLite, no diagnosis.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import RESULT_PREFIX, machine, table
from bench.stack import bench_server
from wan_tasks.devstack.postgres import PostgresServer
from wan_tasks.devstack.processes import end_child, interrupt_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
# (module, extra arguments for a full run, extra arguments for --quick)
SUITE: list[tuple[str, list[str], list[str]]] = [
    ("overhead", [], ["--quick"]),
    ("batch", [], ["--quick"]),
    ("polls", [], ["--quick"]),
    # Virtual time, no servers: seconds.
    ("firstwave", [], ["--quick"]),
    # Three interleaved runs each: one 1 GiB run swings by 20% on this shared machine.
    ("archive", ["--repeat", "3"], ["--quick"]),
    # Full runs do growth on PostgreSQL (DIAGNOSIS): on SQLite generate_batch is held to
    # ~1.2 s a video, so 1000 videos would take ~20 min. Without PostgreSQL: 10 and 100 here.
    ("growth", ["--sizes", "10,100"], ["--quick"]),
]
DIAGNOSIS: list[tuple[str, list[str]]] = [
    ("overhead", ["--no-sdk", "--videos", "2"]),
    ("batch", ["--no-sdk"]),
    ("growth", ["--sizes", "10,100,1000"]),
]


@contextlib.contextmanager
def shared_server(workdir: Path, *, postgres: bool) -> Iterator[dict[str, str]]:
    """One Prefect server for the benchmarks that follow; yields the environment naming it."""
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if postgres else None
        server = stack.enter_context(
            bench_server(
                workdir / ("prefect-pg" if pg else "prefect"), database_url=pg.url if pg else None
            )
        )
        database = "postgresql" if pg else "sqlite"
        print(
            f"Prefect server ({database}) started in {server.startup_s:.1f} s "
            "(excluded from every figure)",
            flush=True,
        )
        yield {
            "PREFECT_API_URL": server.api_url,
            "BENCH_PREFECT_PID": str(server.pid or ""),
            "BENCH_DB_PID": str(pg.pid or "") if pg else "",
            "BENCH_PREFECT_DB": database,
            "BENCH_SERVER_STARTUP_S": f"{server.startup_s:.1f}",
        }


def run_one(
    module: str, args: list[str], env: dict[str, str]
) -> tuple[list[dict[str, Any]], float, int]:
    """Run `python -m bench.<module>`, echoing its output; returns its results, seconds, rc."""
    began = time.perf_counter()
    results: list[dict[str, Any]] = []
    with subprocess.Popen(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    results.append(json.loads(line[len(RESULT_PREFIX) :]))
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        except BaseException as exc:
            # Ctrl-C or SIGTERM here: the benchmark stops its own servers; wait for it.
            end_child(proc, exc)
            raise
    return results, time.perf_counter() - began, proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute subset")
    parser.add_argument(
        "--only", help="comma-separated benchmarks: " + ",".join(m for m, _, _ in SUITE)
    )
    parser.add_argument("--no-diagnosis", action="store_true", help="skip the PostgreSQL runs")
    parser.add_argument("--json", type=Path, help="also write every result here")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    began = time.perf_counter()
    info = machine()
    print("# wan-tasks benchmarks\n\n" + table(["", ""], list(info.items())) + "\n", flush=True)
    results: list[dict[str, Any]] = []
    timings: list[list[Any]] = []
    failed: list[str] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    diagnose = not (args.quick or args.no_diagnosis) and (
        only is None or bool(only & {m for m, _ in DIAGNOSIS})
    )
    with tempfile.TemporaryDirectory(prefix="wan-bench-") as tmp:
        with shared_server(Path(tmp), postgres=False) as server_env:
            env = {**base_env, **server_env}
            for module, full, quick in SUITE:
                if only and module not in only:
                    continue
                if module == "growth" and diagnose and PostgresServer.available():
                    continue  # measured on PostgreSQL below
                found, seconds, rc = run_one(module, quick if args.quick else full, env)
                results += found
                timings.append([module, "sqlite", f"{seconds:.0f}", "ok" if rc == 0 else rc])
                if rc != 0:
                    failed.append(module)
        if diagnose and PostgresServer.available():
            with shared_server(Path(tmp), postgres=True) as server_env:
                env = {**base_env, **server_env}
                for module, extra in DIAGNOSIS:
                    if only and module not in only:
                        continue
                    found, seconds, rc = run_one(module, extra, env)
                    results += found
                    timings.append(
                        [module, "postgresql", f"{seconds:.0f}", "ok" if rc == 0 else rc]
                    )
                    if rc != 0:
                        failed.append(f"{module} (postgresql)")
        elif diagnose:
            print("PostgreSQL (initdb, postgres) not found: diagnosis runs skipped", flush=True)
    total = time.perf_counter() - began
    print("\n# Summary\n")
    for result in results:
        print(f"## {result['title']}\n\n{result['text']}\n")
    print(table(["benchmark", "Prefect DB", "seconds", "status"], timings))
    print(f"\nTotal: {total / 60:.1f} min.")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": info, "results": results, "timings": timings, "total_s": total},
                indent=1,
                default=str,
            )
        )
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    interrupt_on_sigterm()
    sys.exit(main())
