"""`python -m deployments.stack up` and `down` as a user runs them: the Prefect server on a
PostgreSQL cluster kept under the stack's root (the state outlives a restart, as SQLite's file
did), and everything `up` started, the database too, stopped by `down` when `up` is gone."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from wan_tasks.devstack.postgres import PostgresServer
from wan_tasks.devstack.processes import ProcInfo, proc_info, same_process

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not PostgresServer.available(), reason="no PostgreSQL programs (the dev extra ships them)"
)


def _up(root: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "WAVESPEED_"))}
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deployments.stack",
                "--root",
                str(root),
                "up",
                "--workers",
                "0",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_up(up: subprocess.Popen[bytes], log: Path, root: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 240
    while "local stack up" not in log.read_text(errors="replace"):
        assert up.poll() is None, f"`up` ended ({up.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no stack within 240 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    state: dict[str, Any] = json.loads((root / "stack.json").read_text())
    return state


def _recorded(state: dict[str, Any]) -> dict[str, ProcInfo]:
    found = {}
    for child in state["children"]:
        info = proc_info(int(child["pid"]))
        assert info is not None and info.start_time == child["start_time"], child
        found[child["name"]] = info
    return found


def _down(root: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "deployments.stack", "--root", str(root), "down"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return done.stdout


def _gone(infos: dict[str, ProcInfo]) -> list[str]:
    deadline = time.monotonic() + 15
    while any(same_process(i) for i in infos.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [name for name, i in infos.items() if same_process(i)]


@pytest.fixture
def traversable(tmp_path: Path) -> Path:
    """tmp_path, traversable by others: as root, PostgreSQL runs as `nobody`, which must reach
    its data (pytest's own base directory is the owner's only)."""
    for path in (tmp_path, *tmp_path.parents):
        if path == Path(tempfile.gettempdir()):
            break
        path.chmod(path.stat().st_mode | 0o011)
    return tmp_path


def test_the_stack_runs_prefect_on_a_kept_postgres_and_down_stops_it_all(
    traversable: Path,
) -> None:
    root, log = traversable / "stack", traversable / "up-1.log"
    assert PostgresServer.unusable_at(root / "postgres") is None
    up = _up(root, log)
    try:
        state = _wait_up(up, log, root)
        infos = _recorded(state)
        assert set(infos) >= {"postgres", "prefect-server", "seaweedfs", "wavespeed-emulator"}
        names = [c["name"] for c in state["children"]]
        assert names[-2:] == ["prefect-server", "postgres"]  # stopped after its clients
        assert "PostgreSQL" in log.read_text()
        api = state["api_url"]
        # The server records task runs in batches (BATCH_SERVER_SETTINGS), not one a transaction.
        settings = httpx.get(f"{api}/admin/settings", timeout=30).json()
        recorder = settings["server"]["services"]["task_run_recorder"]
        assert recorder["batch_size"] == 100 and recorder["flush_interval"] == 1
        made = httpx.post(f"{api}/variables/", json={"name": "kept", "value": 7}, timeout=30)
        assert made.status_code == 201, made.text
        # `up` dies without its teardown (SIGKILL): `down` stops what it recorded, in order.
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=30)
        said = _down(root)
        assert "stopped postgres" in said and "stopped prefect-server" in said
        assert _gone(infos) == []

        # The next `up` serves the same cluster: the server's state is still there.
        log = traversable / "up-2.log"
        up = _up(root, log)
        state = _wait_up(up, log, root)
        again = _recorded(state)
        got = httpx.get(f"{state['api_url']}/variables/name/kept", timeout=30)
        assert got.status_code == 200 and got.json()["value"] == 7
        # `down` while `up` runs: `up` stops everything through its handles.
        assert "stopped the stack" in _down(root)
        assert up.wait(timeout=60) == 0
        assert _gone(again) == []
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
        # An assertion that failed after `up` was killed: what it recorded is still running.
        subprocess.run(
            [sys.executable, "-m", "deployments.stack", "--root", str(root), "down"],
            cwd=REPO,
            capture_output=True,
            timeout=180,
            check=False,
        )


def test_an_interrupted_initdb_leaves_no_half_cluster_behind(traversable: Path) -> None:
    """initdb stopped half-way (Ctrl-C, SIGTERM as one, a timeout) while it makes the kept
    cluster: the next start makes it whole. Before, the half-made folder (PG_VERSION written)
    was taken for a cluster and every later start failed."""
    from wan_tasks.devstack.postgres import PostgresBinaries

    real = PostgresBinaries.find()
    assert real is not None
    stall = traversable / "initdb-stall"
    # Writes PG_VERSION where it was asked to make the cluster, then hangs.
    stall.write_text('#!/bin/sh\nmkdir -p "$2" && echo 15 > "$2/PG_VERSION"\nexec sleep 600\n')
    stall.chmod(0o755)
    root = traversable / "pg"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        with pytest.raises(KeyboardInterrupt):
            PostgresServer(root=root, binaries=dataclasses.replace(real, initdb=str(stall))).start()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with PostgresServer(root=root, binaries=real) as pg:
        assert pg.url and (root / "data" / "PG_VERSION").is_file()
