"""The WaveSpeed emulator in a child process: `python -m wan_tasks.cli emulator --port 0`.

A child process stands in for a remote service better than a thread: its rendering (~0.4
CPU-s a video) does not share a GIL with the process being measured or tested. The emulator
picks its own free port on 127.0.0.1 and prints its address, which is read back from its log
(no port race). Settings (`EmulatorConfig` fields: latency_s, concurrency, faults, ...) go
through a JSON file, the key through the environment: command lines are visible in `ps`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from wan_tasks.devstack.processes import HOST, ManagedProcess, wait_until
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

EMULATOR_COMMAND = (sys.executable, "-m", "wan_tasks.cli", "emulator")
_ADDRESS = re.compile(r"WaveSpeed emulator on (http://[^\s,]+)")


class EmulatorProcess:
    """The emulator as a child process, for the block.

        with EmulatorProcess(latency_s=0.5, concurrency=3) as emu:
            WaveSpeedClient(emu.api_key, emu.base_url)
            emu.stats()["submissions"]

    `command` replaces `python -m wan_tasks.cli emulator` by another program taking the same
    arguments (bench._emulator does, to memoise rendering).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] = EMULATOR_COMMAND,
        cwd: Path | None = None,
        startup_timeout: float = 120.0,
        name: str = "wavespeed-emulator",
        host: str = HOST,
        **settings: Any,
    ) -> None:
        self.api_key = api_key or f"emu-{secrets.token_hex(12)}"
        self.settings = settings
        self.log = Path(log) if log is not None else None
        self.env = dict(env) if env is not None else None
        self.command = list(command)
        self.cwd = cwd
        self.startup_timeout = startup_timeout
        self.name = name
        self.host = host  # another address than loopback: a test host's (network namespace)
        self.base_url = ""
        self.process: ManagedProcess | None = None
        self._dir: Path | None = None

    def __repr__(self) -> str:  # never the key
        return f"EmulatorProcess(base_url={self.base_url!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def launch(self) -> Self:
        if self.process is not None:
            raise LocalServiceError(f"{self.name} is already running (pid {self.process.pid})")
        self._dir = Path(tempfile.mkdtemp(prefix="wan-emulator-"))
        config = self._dir / "config.json"
        config.write_text(json.dumps(self.settings), encoding="utf-8")
        env = dict(self.env) if self.env is not None else dict(os.environ)
        env["WAVESPEED_EMULATOR_KEY"] = self.api_key
        cmd = [*self.command, "--host", self.host, "--port", "0", "--config", str(config)]
        self.process = ManagedProcess(
            self.name,
            cmd,
            log=self.log or self._dir / "emulator.log",
            env=env,
            cwd=self.cwd,
            stop_timeout=10.0,
        )
        return self

    def wait_until_ready(self) -> Self:
        process = self.process
        assert process is not None, "launch() first"
        found: list[str] = []

        def printed_address() -> bool:
            match = _ADDRESS.search(process.output())
            if match:
                found.append(match.group(1))
            return match is not None

        wait_until(
            "serving (printed no address)",
            printed_address,
            process,
            timeout=self.startup_timeout,
            interval=0.1,
        )
        self.base_url = found[0]
        logger.info("%s at %s (pid %d)", self.name, self.base_url, process.pid)
        return self

    def start(self) -> Self:
        try:
            return self.launch().wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (/_emulator/stats): submissions, polls, in flight, ..."""
        answer = httpx.get(f"{self.base_url}/_emulator/stats", timeout=10.0)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    def stop(self) -> None:
        process, self.process = self.process, None
        try:
            if process is not None:
                process.stop()
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
