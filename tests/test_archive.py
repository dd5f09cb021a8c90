"""The S3 archiver against a real SeaweedFS: streaming, multipart, verification, no overwrite."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import TEST_BUCKET
from wan_tasks.errors import ArchiveError
from wan_tasks.redact import redact_payload, redact_url
from wan_tasks.storage.archive import ArchiveTarget, MiB, S3Archiver
from wan_tasks.storage.keys import (
    CONTENT_ADDRESSED_TEMPLATE,
    KeyFields,
    KeyTemplateError,
    render_key,
    validate_template,
)

WHEN = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def fields(pid: str, **kw: Any) -> KeyFields:
    return KeyFields(
        prediction_id=pid,
        model="wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast",
        created_at=WHEN,
        seed=7,
        duration=5,
        prefix="arch-tests",
        **kw,
    )


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
def archiver(s3_store: Any) -> S3Archiver:
    target = ArchiveTarget(
        bucket=TEST_BUCKET,
        prefix="arch-tests",
        multipart_threshold=5 * MiB,
        part_size=5 * MiB,
        contact_sheet=False,
    )
    return S3Archiver(s3_store.boto3_client(), target)


def test_multipart_stream_is_verified_and_tagged(archiver: S3Archiver) -> None:
    data = os.urandom(12 * MiB + 12345)
    result = archiver.archive(
        chunks(data),
        fields("multi1"),
        metadata={"prediction-id": "m"},
        sidecar={"x": 1},
        expected_size=len(data),
    )
    sha = hashlib.sha256(data).hexdigest()
    assert result.sha256 == sha and result.size == len(data) and not result.already_archived
    body = archiver.s3.get_object(Bucket=TEST_BUCKET, Key=result.key)
    assert hashlib.sha256(body["Body"].read()).hexdigest() == sha
    assert body["Metadata"]["sha256"] == sha and body["ContentType"] == "video/mp4"
    manifest = json.loads(
        archiver.s3.get_object(Bucket=TEST_BUCKET, Key=archiver.sidecar_key(result.key))[
            "Body"
        ].read()
    )
    assert manifest["sha256"] == sha and manifest["size"] == len(data) and manifest["x"] == 1
    assert result.key == (
        "arch-tests/wavespeed-ai-wan-2.2-i2v-480p-lora-ultra-fast/2026/11/25/multi1.mp4"
    )


def test_existing_object_is_found_not_rewritten(archiver: S3Archiver) -> None:
    data = os.urandom(200_000)
    first = archiver.archive(chunks(data), fields("again1"), metadata={}, sidecar={})
    found = archiver.find_archived(fields("again1"))
    assert found is not None and found.already_archived
    assert (found.key, found.sha256, found.size) == (first.key, first.sha256, first.size)
    # Archiving again (a racing run) hits the conditional write: success, nothing rewritten.
    second = archiver.archive(chunks(data), fields("again1"), metadata={}, sidecar={})
    assert second.already_archived and second.sha256 == first.sha256
    # Different bytes under the same key are refused, never overwritten.
    with pytest.raises(ArchiveError, match="refusing to overwrite") as info:
        archiver.archive(chunks(b"other" * 1000), fields("again1"), metadata={}, sidecar={})
    assert not info.value.retryable


def test_truncated_download_writes_nothing(archiver: S3Archiver) -> None:
    data = os.urandom(6 * MiB)
    with pytest.raises(ArchiveError, match="truncated") as info:
        archiver.archive(
            chunks(data), fields("trunc1"), metadata={}, sidecar={}, expected_size=len(data) + 10
        )
    assert info.value.retryable
    assert archiver.head(render_key(archiver.target.key_template, fields("trunc1"))) is None
    uploads = archiver.s3.list_multipart_uploads(Bucket=TEST_BUCKET).get("Uploads", [])
    assert not [u for u in uploads if "trunc1" in u["Key"]]  # aborted, no orphan parts


def test_content_addressed_layout(archiver: S3Archiver) -> None:
    target = archiver.target.model_copy(update={"key_template": CONTENT_ADDRESSED_TEMPLATE})
    ca = S3Archiver(archiver.s3, target)
    data = os.urandom(100_000)
    result = ca.archive(chunks(data), fields("ca1"), metadata={}, sidecar={})
    assert result.key == f"arch-tests/sha256/{hashlib.sha256(data).hexdigest()}.mp4"
    assert ca.find_archived(fields("ca1")) is None  # needs the bytes to know the key
    again = ca.archive(chunks(data), fields("ca2"), metadata={}, sidecar={})
    assert again.already_archived and again.key == result.key


@pytest.mark.parametrize(
    ("template", "words"),
    [
        ("../{prediction_id}.mp4", "'..'"),
        ("/abs/{prediction_id}.mp4", "absolute"),
        ("{prefix}/{date}.mp4", "must contain {prediction_id} or {sha256}"),
        ("{prefix}/{user}/{prediction_id}.mp4", "unknown field {user}"),
        ("{prefix}/{prediction_id!r}.mp4", "unknown field"),
        ("{prefix}/{prediction_id}.mov", "must end with .mp4"),
        ("{prefix}/{prediction_id", "key_template"),
        ("a\\b/{prediction_id}.mp4", "backslashes"),
    ],
)
def test_bad_key_templates(template: str, words: str) -> None:
    with pytest.raises(KeyTemplateError, match=words.replace("{", r"\{").replace("}", r"\}")):
        validate_template(template)
    with pytest.raises(ValueError, match="key_template"):
        ArchiveTarget(bucket="b-ok", key_template=template)


def test_odd_characters_are_sanitised() -> None:
    key = render_key(
        "{prefix}/{item_id}/{prediction_id}.mp4",
        KeyFields(
            prediction_id="../../etc/passwd",
            model="m",
            created_at=WHEN,
            seed=1,
            duration=5,
            prefix="  /../we ird//prefix/ ",
            item_id="a b/c\x00d",
        ),
    )
    assert key == "we-ird/prefix/a-b-c-d/etc-passwd.mp4"
    assert ".." not in key.split("/")


def test_stored_urls_are_scrubbed_of_signatures() -> None:
    signed = (
        "https://bucket.s3.amazonaws.com/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA/x&X-Amz-Signature=abc123&v=2"
    )
    clean = redact_url(signed)
    assert "abc123" not in clean and "AKIA" not in clean and "v=2" in clean
    assert redact_url("https://user:pw@host/x.png") == "https://REDACTED@host/x.png"
    body = redact_payload({"image": signed, "prompt": "p", "loras": [{"path": signed}]})
    assert "abc123" not in json.dumps(body) and body["prompt"] == "p"


def test_a_runs_threads_share_the_s3_client_without_dropping_connections(
    s3_store: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run's submit and archive threads (16 each) share one client. boto3's pool keeps 10
    connections: past that, every request opened a connection and dropped it afterwards,
    with a urllib3 warning in the run's log each time."""
    import logging
    import threading

    from wan_tasks.storage.archive import make_s3_client

    for key, value in s3_store.env().items():
        monkeypatch.setenv(key, value)
    client = make_s3_client()
    start = threading.Barrier(32)

    def ask() -> None:
        start.wait()
        for _ in range(5):
            client.head_bucket(Bucket=TEST_BUCKET)

    threads = [threading.Thread(target=ask) for _ in range(32)]
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]
