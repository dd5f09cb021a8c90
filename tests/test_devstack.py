"""The dev-stack launcher: processes stopped with everything below them, startup failures
that quote the log, free ports, and a real Prefect server and emulator started and stopped."""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from wan_tasks.devstack.emulator_process import EmulatorProcess
from wan_tasks.devstack.prefect_server import PrefectServer
from wan_tasks.devstack.processes import (
    ManagedProcess,
    ProcInfo,
    free_port,
    proc_info,
    same_process,
    wait_for_http,
    wait_until,
)
from wan_tasks.errors import LocalServiceError

# Ignores SIGTERM; starts helpers that do too: one in its group, one in its group orphaned by
# a parent that exits at once (no longer below it: only the group reaches it), and one in a
# session of its own (as a Prefect worker's flow runs are); prints their pids.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    same_group = subprocess.Popen([sys.executable, "-c", code])
    orphan = subprocess.run(
        [sys.executable, "-c", f"import subprocess as s, sys; print(s.Popen("
         f"[sys.executable, '-c', {code!r}], stdout=s.DEVNULL, stderr=s.DEVNULL).pid)"],
        capture_output=True, text=True, check=True).stdout.strip()
    own_session = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    print("pids", same_group.pid, orphan, own_session.pid, flush=True)
    time.sleep(600)
""")


def _gone(info: ProcInfo) -> bool:
    return not same_process(info)  # exited (a zombie awaiting its reaper counts as gone)


def test_stop_kills_a_process_ignoring_sigterm_and_its_children(tmp_path: Path) -> None:
    with ManagedProcess(
        "stubborn",
        [sys.executable, "-c", STUBBORN],
        log=tmp_path / "stubborn.log",
        stop_timeout=1.0,
    ) as proc:
        wait_until("printing its children", lambda: "pids" in proc.output(), proc, timeout=60)
        pids = [int(p) for p in proc.output().split("pids", 1)[1].split()[:3]]
        infos = [proc_info(pid) for pid in pids]
        assert all(info is not None and same_process(info) for info in infos)
        proc.stop()
        assert not proc.alive()
        assert proc.returncode == -signal.SIGKILL  # it ignored SIGTERM: killed after 1 s
    # SIGKILL is sent by now; its delivery is the kernel's, so allow it a moment.
    deadline = time.monotonic() + 10
    while any(not _gone(i) for i in infos if i) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [
        pid for pid, info in zip(pids, infos, strict=True) if info is not None and not _gone(info)
    ] == []


def test_failed_start_raises_with_the_log_tail(tmp_path: Path) -> None:
    script = "import sys; print('line one'); print('cannot open the database'); sys.exit(3)"
    proc = ManagedProcess("broken", [sys.executable, "-c", script], log=tmp_path / "b.log")
    try:
        with pytest.raises(LocalServiceError) as caught:
            wait_for_http(f"http://127.0.0.1:{free_port()}/health", proc, timeout=60)
    finally:
        proc.stop()
    message = str(caught.value)
    assert "broken exited before healthy (exit code 3)" in message
    assert "cannot open the database" in message and str(tmp_path / "b.log") in message

    # The emulator child, refusing a bad setting: its own validation error is quoted.
    with pytest.raises(LocalServiceError) as bad:
        EmulatorProcess(log=tmp_path / "emu.log", concurrency="many").start()
    assert "wavespeed-emulator exited" in str(bad.value)
    assert "concurrency" in str(bad.value)


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        assert sock.getsockname() == ("127.0.0.1", port)


def test_emulator_process_serves_and_stops(tmp_path: Path) -> None:
    with EmulatorProcess(log=tmp_path / "emu.log", latency_s=0.2, concurrency=2) as emu:
        assert emu.base_url.startswith("http://127.0.0.1:")
        assert emu.stats()["submissions"] == 0
        pid = emu.pid
        assert pid is not None and (info := proc_info(pid)) is not None
        assert emu.api_key not in repr(emu)
    assert _gone(info)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{emu.base_url}/_emulator/stats", timeout=5)


def test_prefect_server_starts_healthy_and_stops(tmp_path: Path) -> None:
    server = PrefectServer(tmp_path / "prefect")
    with server:
        answer = httpx.get(f"{server.api_url}/health", timeout=10)
        assert answer.status_code == 200
        assert server.client_env()["PREFECT_API_URL"] == server.api_url
        assert server.pid is not None and (info := proc_info(server.pid)) is not None
        port = server.port
    assert _gone(info)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
    assert (tmp_path / "prefect" / "server.log").exists()


def test_a_benchmark_killed_with_sigterm_stops_what_it_started(tmp_path: Path) -> None:
    """SIGTERM to a benchmark (its process only, as `kill PID` sends it) while its child
    uploads: the child and the SeaweedFS it started are stopped through their handles. Before,
    SIGTERM ended the benchmark at once and left both running."""
    import os
    import subprocess

    from wan_tasks.devstack.processes import descendants

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.archive", "--size-mib", "128"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        seen: dict[int, ProcInfo] = {}

        def child_uploading() -> bool:
            for info in descendants(bench.pid):
                seen.setdefault(info.pid, info)
            return any(
                "--child" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                for pid in list(seen)
                if same_process(seen[pid])
            )

        deadline = time.monotonic() + 240
        while not child_uploading():
            assert bench.poll() is None, "the benchmark ended before its child was seen"
            assert time.monotonic() < deadline, "no child within 240 s"
            time.sleep(0.05)
        assert len(seen) >= 2  # SeaweedFS and the child (and what they started)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=120) != 0
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    deadline = time.monotonic() + 10
    while any(not _gone(i) for i in seen.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [i.pid for i in seen.values() if not _gone(i)] == []
