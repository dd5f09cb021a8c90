"""Run the emulator: embedded (a context manager on a free port) or as a command."""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx

from wan_tasks.emulator.config import EmulatorConfig, FaultDecider, FaultPlan
from wan_tasks.emulator.engine import Engine
from wan_tasks.emulator.http import Handler

logger = logging.getLogger(__name__)


class MediaStore:
    """Uploaded inputs, by key, in memory (the emulator is a test double, not an archive)."""

    def __init__(self, base_url: str) -> None:
        self._base_url = base_url
        self._items: dict[str, tuple[str, bytes]] = {}
        self._tickets: dict[str, tuple[str, str | None]] = {}
        self._lock = threading.Lock()

    def _key(self, filename: str) -> str:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename)[-100:]
        return f"{secrets.token_hex(8)}/{safe or 'upload'}"

    def add(self, filename: str, content_type: str, data: bytes) -> str:
        key = self._key(filename)
        with self._lock:
            self._items[key] = (content_type, data)
        return key

    def ticket(self, filename: str, content_type: str | None) -> str:
        """A presigned upload slot; `content_type` None means "read it from the bytes"."""
        key = self._key(filename)
        with self._lock:
            self._tickets[key] = (filename, content_type)
        return key

    def pending(self, key: str) -> tuple[str, str | None] | None:
        with self._lock:
            return self._tickets.get(key)

    def fill(self, key: str, content_type: str, data: bytes) -> bool:
        with self._lock:
            if self._tickets.pop(key, None) is None:
                return False
            self._items[key] = (content_type, data)
            return True

    def get(self, key: str) -> tuple[str, bytes] | None:
        with self._lock:
            return self._items.get(key)

    def url(self, key: str) -> str:
        return f"{self._base_url}/media/uploads/{key}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 refuses connections when a thousand clients poll at once.
    request_queue_size = 512

    def __init__(self, host: str, port: int, config: EmulatorConfig) -> None:
        super().__init__((host, port), Handler)
        self.config = config
        bound_host, bound_port = str(self.server_address[0]), self.server_address[1]
        display = f"[{bound_host}]" if ":" in str(bound_host) else str(bound_host)
        self.base_url = f"http://{display}:{bound_port}"
        self.faults = FaultDecider(config.faults)
        self.media = MediaStore(self.base_url)
        self.engine = Engine(config, self.faults, lambda: self.base_url, self.fetch_media)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (timeouts, kill -9) is routine here, not a traceback on stderr.
        logger.debug("emulator: connection from %s ended abruptly", client_address, exc_info=True)

    def fetch_media(self, url: str) -> bytes | None:
        """What the service does when it downloads an input image. Never leaves this machine:
        only this emulator's own uploads and other loopback URLs are reachable."""
        parts = urlsplit(url)
        if url.startswith(f"{self.base_url}/media/uploads/"):
            item = self.media.get(url.removeprefix(f"{self.base_url}/media/uploads/"))
            return item[1] if item else None
        if not parts.hostname or not _is_loopback(parts.hostname):
            return None
        try:
            response = httpx.get(url, timeout=self.config.image_fetch_timeout_s)
        except httpx.HTTPError:
            return None
        return response.content if response.status_code == 200 else None

    def server_close(self) -> None:
        self.engine.stop()
        super().server_close()


class Emulator:
    """A running emulator. `base_url`, `api_key`, `stats()`, `set_faults()`, `stop()`."""

    def __init__(self, config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config
        self._server = EmulatorServer(host, port, config)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="emulator-http",
            daemon=True,
        )
        self._stopped = False

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def api_key(self) -> str:
        return self.config.api_key

    def start(self) -> Emulator:
        self._thread.start()
        logger.info("WaveSpeed emulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def stats(self) -> dict[str, Any]:
        with self._server.engine.lock:
            return self._server.engine.stats.as_dict()

    def set_faults(self, plan: FaultPlan | dict[str, Any]) -> None:
        self._server.faults.replace(
            plan if isinstance(plan, FaultPlan) else FaultPlan.model_validate(plan)
        )

    def serve_forever(self) -> None:
        """Block in the calling thread until interrupted (the command-line mode)."""
        self._stopped = False
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def run_emulator(
    api_key: str | None = None, *, host: str = "127.0.0.1", port: int = 0, **settings: Any
) -> Iterator[Emulator]:
    """Start an emulator on a free port of 127.0.0.1; stop it on exit, also on errors.

    >>> with run_emulator(latency_s=0.5) as emu:
    ...     client = WaveSpeedClient(emu.api_key, emu.base_url)
    """
    config = EmulatorConfig(api_key=api_key or f"emu-{secrets.token_hex(12)}", **settings)
    emulator = Emulator(config, host, port)
    try:
        yield emulator.start()
    finally:
        emulator.stop()


def load_config_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: emulator config must be a JSON object")
    return data
