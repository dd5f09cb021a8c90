"""Small helpers shared by the benchmarks: statistics, tables, process CPU and memory, results.

Benchmarks print a markdown table each and one `BENCH-RESULT {json}` line that `bench.run_all`
collects. Nothing here starts a server (see `bench.stack`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
SAMPLE = Path(__file__).resolve().parents[1] / "wan_tasks" / "assets" / "sample.png"
MiB = 1024 * 1024
GiB = 1024 * MiB
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def run_script(main: Callable[[], object], *, bench_log: int = logging.INFO) -> None:
    """A benchmark's `__main__`: logging set up, and SIGTERM handled as Ctrl-C, so a killed
    benchmark stops the servers it started (through their handles) instead of leaving them."""
    from wan_tasks.devstack.processes import interrupt_on_sigterm

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("bench").setLevel(bench_log)
    interrupt_on_sigterm()
    main()


# -- statistics ------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def p90(values: Sequence[float]) -> float:
    return quantile(values, 0.9)


# -- output ----------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (pasted as is into BENCHMARKS.md)."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(items, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def emit(name: str, title: str, text: str, data: dict[str, Any]) -> None:
    """Print a benchmark's table, and its figures as one machine-readable line."""
    print(f"\n## {title}\n\n{text}\n", flush=True)
    print(
        RESULT_PREFIX
        + json.dumps({"name": name, "title": title, "text": text, "data": data}, default=str),
        flush=True,
    )


# -- processes: CPU time and memory -----------------------------------------------------------


def cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of a server: the live processes of its process group (the
    servers here each run in a session of their own, so their pid is their group id) and of
    its descendants, with what their exited children had spent (PostgreSQL's backends are
    children of the postmaster; counting the group alone missed them)."""
    if pgid <= 0:
        return 0.0
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            stats[int(stat.parent.name)] = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, ValueError):
            continue
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    chosen = {pid for pid, fields in stats.items() if int(fields[2]) == pgid}
    todo = [pgid, *chosen]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in chosen:
                chosen.add(child)
                todo.append(child)
    if pgid in stats:
        chosen.add(pgid)
    # utime, stime, and the cutime and cstime of children that exited and were waited for
    total = sum(sum(int(v) for v in stats[pid][11:15]) for pid in chosen if pid in stats)
    return total / _CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _status_kib(key: str, pid: int | str = "self") -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def rss_mib(pid: int | str = "self") -> float:
    return _status_kib("VmRSS", pid) / 1024


def hwm_mib(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a process, in MiB."""
    return _status_kib("VmHWM", pid) / 1024


def reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux clear_refs 5); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(values[:8]) - values[3] - values[4]) / _CLK_TCK


@dataclass
class CpuMeter:
    """CPU seconds spent by this process and by named other processes between start and stop,
    and by everything else on the (shared) machine."""

    pids: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def _now(self) -> dict[str, float]:
        now = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        now["bench process"] = self_cpu_seconds()
        now["machine"] = machine_busy_seconds()
        return now

    @contextmanager
    def measure(self) -> Iterator[CpuMeter]:
        self._start, began = self._now(), time.perf_counter()
        try:
            yield self
        finally:
            self.wall = time.perf_counter() - began
            end = self._now()
            spent = {k: end[k] - self._start.get(k, 0.0) for k in end}
            machine = spent.pop("machine")
            spent["other processes"] = max(0.0, machine - sum(spent.values()))
            self.spent = spent

    @property
    def busy_share(self) -> float:
        """Share of the machine's CPU capacity used during the measurement, by anything."""
        total = sum(self.spent.values())
        return total / (self.wall * (os.cpu_count() or 1)) if self.wall else math.nan

    def summary(self) -> str:
        parts = [f"{k} {v:.0f}" for k, v in self.spent.items()]
        return f"{', '.join(parts)} CPU-s (machine {self.busy_share:.0%} busy)"


# -- the machine -----------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "?"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else "?"
    except OSError:
        pass
    mem_kib = _status_kib_file("/proc/meminfo", "MemTotal")
    weed = "-"
    try:
        from wan_tasks.storage.seaweed import find_weed

        weed = (
            subprocess.run(
                [str(find_weed()), "version"], capture_output=True, text=True, timeout=20
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except Exception:  # only a label
        weed = "-"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "prefect": _version("prefect"),
        "wavespeed (SDK)": _version("wavespeed"),
        "boto3": _version("boto3"),
        "httpx": _version("httpx"),
        "av": _version("av"),
        "seaweedfs": weed,
        "wan-tasks": _version("wan-tasks"),
    }


def _status_kib_file(path: str, key: str) -> int:
    try:
        match = re.search(rf"^{key}:\s+(\d+) kB", Path(path).read_text(), re.M)
    except OSError:
        return 0
    return int(match.group(1)) if match else 0
