"""Stream a finished video into S3, verified, with its metadata and a JSON sidecar.

Memory stays bounded: parts of `part_size` go up while the download continues, at most
`max_inflight_parts` at a time. The SHA-256 of the whole file is computed on the way (S3's own
multipart checksum is a checksum of part checksums, not the file's); each part and each single
PUT carries its own SHA-256 so the server rejects a corrupted transfer. The final write is
conditional (If-None-Match: *): an object that is already there is never rewritten.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, field_validator

from wan_tasks import settings
from wan_tasks.errors import ArchiveError
from wan_tasks.settings import Settings
from wan_tasks.storage.keys import DEFAULT_TEMPLATE, KeyFields, render_key, validate_template
from wan_tasks.storage.place import S3Place

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:
    S3Client = Any

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


class ArchiveTarget(S3Place):
    """Where (a place in S3) and how videos are archived."""

    prefix: str = "videos"
    key_template: str = DEFAULT_TEMPLATE
    multipart_threshold: int = Field(16 * MiB, ge=5 * MiB)
    part_size: int = Field(8 * MiB, ge=5 * MiB, le=512 * MiB)
    max_inflight_parts: int = Field(4, ge=1, le=16)
    presign_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)
    contact_sheet: bool = True
    spool_limit: int = Field(256 * MiB, ge=0, description="keep a local copy for the sheet")

    @field_validator("key_template")
    @classmethod
    def _template(cls, v: str) -> str:
        validate_template(v)
        return v


class ArchiveResult(BaseModel):
    bucket: str
    key: str
    s3_uri: str
    sidecar_uri: str
    presigned_url: str
    sha256: str
    size: int
    already_archived: bool = False
    contact_sheet_uri: str | None = None


# Connections one client keeps. A run's threads share the client: 16 submitters (ledger
# writes), 16 archivers and each archive's part uploads (4 at once by default: 80 in all);
# boto3's default of 10 made every request past the tenth open a connection and drop it
# after, logging a urllib3 warning. Idle ones cost a socket each.
S3_POOL_CONNECTIONS = 128


def make_s3_client(config: Settings | None = None) -> S3Client:
    """An S3 client for the settings: their explicit connection (the embedded store) when one
    is set, else boto3's standard configuration chain (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID,
    profiles, ...); path-style addressing for custom endpoints, adaptive retries for throttling.
    """
    import boto3

    config = config or settings.current()
    explicit: dict[str, Any] = {}
    if config.s3 is not None:
        explicit = {
            "endpoint_url": config.s3.endpoint_url,
            "aws_access_key_id": config.s3.access_key_id,
            "aws_secret_access_key": config.s3.secret_access_key.get_secret_value(),
            "region_name": config.s3.region,
        }
    custom_endpoint = bool(explicit.get("endpoint_url") or config.s3_endpoint_url)
    client_config = Config(
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
        retries={"max_attempts": 8, "mode": "adaptive"},
        max_pool_connections=S3_POOL_CONNECTIONS,
        connect_timeout=10,
        read_timeout=60,
    )
    # A fresh session each time: boto3's default session keeps the first credentials it
    # resolved in the process, so a client made for new AWS settings would sign with old ones.
    # Explicit arguments win over whatever the environment's chain would resolve.
    client: S3Client = boto3.session.Session().client("s3", config=client_config, **explicit)
    return client


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_precondition_failed(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 412 or _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict")


class S3Archiver:
    def __init__(self, s3: S3Client, target: ArchiveTarget) -> None:
        self.s3 = s3
        self.target = target

    # -- reads ---------------------------------------------------------------------------

    def head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.s3.head_object(Bucket=self.target.bucket, Key=key))
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def presign(self, key: str) -> str:
        url: str = self.s3.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.target.bucket, "Key": key},
            ExpiresIn=self.target.presign_expiry_s,
        )
        return url

    def uri(self, key: str) -> str:
        return f"s3://{self.target.bucket}/{key}"

    @staticmethod
    def sidecar_key(key: str) -> str:
        return key.removesuffix(".mp4") + ".json"

    @staticmethod
    def sheet_key(key: str) -> str:
        return key.removesuffix(".mp4") + ".sheet.jpg"

    # -- the archive ---------------------------------------------------------------------

    def find_archived(self, fields: KeyFields) -> ArchiveResult | None:
        """The result for a video already in the bucket, without downloading anything."""
        if "sha256" in validate_template(self.target.key_template):
            return None
        key = render_key(self.target.key_template, fields)
        head = self.head(key)
        if head is None:
            return None
        sha = head.get("Metadata", {}).get("sha256", "")
        if not sha:
            return None  # not ours (or written by something else): do not trust it
        return self._result(key, sha, int(head["ContentLength"]), already=True)

    def find_at(self, key: str, sha256: str) -> ArchiveResult | None:
        """The result for a video recorded at `key` (by the ledger), if it is still there with
        the recorded SHA-256."""
        head = self.head(key)
        if head is None or head.get("Metadata", {}).get("sha256") != sha256:
            return None
        return self._result(key, sha256, int(head["ContentLength"]), already=True)

    def ensure_sidecar(self, result: ArchiveResult, sidecar: dict[str, Any]) -> None:
        """Write the sidecar of an object found already archived, if it is missing (a run
        that died between the video and its sidecar)."""
        if self.head(self.sidecar_key(result.key)) is None:
            logger.warning("%s had no sidecar; writing it", result.s3_uri)
            self._put_sidecar(
                result.key,
                {
                    **sidecar,
                    "sha256": result.sha256,
                    "size": result.size,
                    "contact_sheet_uri": result.contact_sheet_uri,
                },
            )

    def archive(
        self,
        chunks: Iterable[bytes],
        fields: KeyFields,
        *,
        metadata: dict[str, str],
        sidecar: dict[str, Any],
        expected_size: int | None = None,
    ) -> ArchiveResult:
        if "sha256" in validate_template(self.target.key_template):
            return self._archive_content_addressed(
                chunks, fields, metadata=metadata, sidecar=sidecar, expected_size=expected_size
            )
        key = render_key(self.target.key_template, fields)
        # A known size past the spool limit gets no contact sheet: do not write a copy to
        # disk only to throw it away.
        too_big = expected_size is not None and expected_size > self.target.spool_limit
        with self._spool(enabled=not too_big) as spool:
            sha, size, created = self._upload(key, chunks, metadata, spool, expected_size)
            return self._finish(key, sha, size, created, sidecar, spool)

    def _archive_content_addressed(
        self,
        chunks: Iterable[bytes],
        fields: KeyFields,
        *,
        metadata: dict[str, str],
        sidecar: dict[str, Any],
        expected_size: int | None,
    ) -> ArchiveResult:
        # The key depends on the hash: land the bytes on local disk first, then upload.
        with tempfile.TemporaryFile(prefix="wan-archive-") as disk:
            digest = hashlib.sha256()
            size = 0
            for chunk in chunks:
                digest.update(chunk)
                disk.write(chunk)
                size += len(chunk)
            self._check_size(size, expected_size)
            sha = digest.hexdigest()
            key = render_key(
                self.target.key_template,
                KeyFields(**{**fields.__dict__, "sha256": sha}),
            )
            disk.seek(0)
            _, _, created = self._upload(
                key, iter(lambda: disk.read(MiB), b""), metadata, None, size
            )
            disk.seek(0)
            return self._finish(key, sha, size, created, sidecar, disk)

    @contextmanager
    def _spool(self, *, enabled: bool = True) -> Iterator[IO[bytes] | None]:
        if not (self.target.contact_sheet and enabled):
            yield None
            return
        with tempfile.TemporaryFile(prefix="wan-archive-") as fh:
            yield fh

    @staticmethod
    def _check_size(size: int, expected: int | None) -> None:
        if expected is not None and size != expected:
            raise ArchiveError(
                f"download truncated: got {size} of {expected} bytes", retryable=True
            )

    def _upload(
        self,
        key: str,
        chunks: Iterable[bytes],
        metadata: dict[str, str],
        spool: IO[bytes] | None,
        expected_size: int | None,
    ) -> tuple[str, int, bool]:
        """Upload; returns (sha256, size, created). created=False: the key already existed."""
        digest = hashlib.sha256()
        size = 0
        buffer = _PartBuffer()
        uploader: _Multipart | None = None
        spooling = spool is not None
        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if spooling and spool is not None:
                    if size <= self.target.spool_limit:
                        spool.write(chunk)
                    else:
                        spooling = False
                buffer.append(chunk)
                if uploader is None and len(buffer) >= self.target.multipart_threshold:
                    uploader = _Multipart(self, key, metadata)
                if uploader is not None:
                    while len(buffer) >= self.target.part_size:
                        uploader.add(buffer.take(self.target.part_size))
            self._check_size(size, expected_size)
            sha = digest.hexdigest()
            meta = {**metadata, "sha256": sha}
            if uploader is None:
                created = self._put(key, buffer.take(len(buffer)), meta, sha)
            else:
                if len(buffer):
                    uploader.add(buffer.take(len(buffer)))
                created = uploader.complete(meta)
        except BaseException:
            if uploader is not None:
                uploader.abort()
            raise
        if spool is not None and not spooling:
            spool.truncate(0)  # too large for a contact sheet; do not keep a partial copy
        return sha, size, created

    def _put(self, key: str, body: bytes, metadata: dict[str, str], sha: str) -> bool:
        try:
            self.s3.put_object(
                Bucket=self.target.bucket,
                Key=key,
                Body=body,
                ContentType="video/mp4",
                Metadata=metadata,
                ChecksumSHA256=_b64(bytes.fromhex(sha)),
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _is_precondition_failed(exc):
                return False
            raise
        return True

    def _finish(
        self,
        key: str,
        sha: str,
        size: int,
        created: bool,
        sidecar: dict[str, Any],
        spool: IO[bytes] | None,
    ) -> ArchiveResult:
        head = self.head(key)
        if head is None:
            raise ArchiveError(f"{self.uri(key)} is missing right after upload", retryable=True)
        stored_sha = head.get("Metadata", {}).get("sha256")
        if stored_sha is None and not created and int(head["ContentLength"]) == size:
            # A crash between completing a multipart upload and tagging its sha256: check
            # the stored bytes themselves, then tag them.
            stored_sha = self._tag_if_same(key, sha, head)
        if int(head["ContentLength"]) != size or stored_sha != sha:
            if created:
                raise ArchiveError(
                    f"{self.uri(key)} verification failed: stored {head['ContentLength']} bytes "
                    f"sha256 {stored_sha}, expected {size} bytes sha256 {sha}",
                    retryable=True,
                )
            raise ArchiveError(
                f"{self.uri(key)} already holds a different object (sha256 {stored_sha}); "
                "refusing to overwrite it. Use a key_template with {prediction_id} or {sha256}.",
                retryable=False,
            )
        sheet_uri = self._contact_sheet(key, spool) if created else None
        self._put_sidecar(
            key, {**sidecar, "sha256": sha, "size": size, "contact_sheet_uri": sheet_uri}
        )
        logger.info(
            "archived %s (%d bytes, sha256 %s)%s",
            self.uri(key),
            size,
            sha[:12],
            "" if created else " (already there)",
        )
        return self._result(key, sha, size, already=not created, sheet_uri=sheet_uri)

    def _tag_if_same(self, key: str, sha: str, head: dict[str, Any]) -> str | None:
        digest = hashlib.sha256()
        body = self.s3.get_object(Bucket=self.target.bucket, Key=key)["Body"]
        for chunk in iter(lambda: body.read(MiB), b""):
            digest.update(chunk)
        if digest.hexdigest() != sha:
            return None
        self.s3.copy_object(
            Bucket=self.target.bucket,
            Key=key,
            ContentType="video/mp4",
            CopySource={"Bucket": self.target.bucket, "Key": key},
            Metadata={**head.get("Metadata", {}), "sha256": sha},
            MetadataDirective="REPLACE",
        )
        return sha

    def _contact_sheet(self, key: str, spool: IO[bytes] | None) -> str | None:
        if spool is None:
            return None
        spool.flush()
        if spool.seek(0, os.SEEK_END) == 0:
            return None
        from wan_tasks.storage.thumbnails import contact_sheet

        spool.seek(0)
        with tempfile.NamedTemporaryFile(suffix=".mp4") as copy:
            copy.write(spool.read())
            copy.flush()
            try:
                sheet = contact_sheet(Path(copy.name))
            except ValueError as exc:
                logger.warning("no contact sheet for %s: %s", key, exc)
                return None
        sheet_key = self.sheet_key(key)
        self.s3.put_object(
            Bucket=self.target.bucket,
            Key=sheet_key,
            Body=sheet,
            ContentType="image/jpeg",
            ChecksumSHA256=_b64(hashlib.sha256(sheet).digest()),
        )
        return self.uri(sheet_key)

    def _put_sidecar(self, key: str, sidecar: dict[str, Any]) -> None:
        body = json.dumps(
            {**sidecar, "s3_uri": self.uri(key)}, indent=2, sort_keys=True, default=str
        ).encode()
        try:
            self.s3.put_object(
                Bucket=self.target.bucket,
                Key=self.sidecar_key(key),
                Body=body,
                ContentType="application/json",
                ChecksumSHA256=_b64(hashlib.sha256(body).digest()),
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if not _is_precondition_failed(exc):
                raise  # 412: the first archiving run's sidecar stays

    def _result(
        self, key: str, sha: str, size: int, *, already: bool, sheet_uri: str | None = None
    ) -> ArchiveResult:
        if sheet_uri is None and already and self.head(self.sheet_key(key)) is not None:
            sheet_uri = self.uri(self.sheet_key(key))
        return ArchiveResult(
            bucket=self.target.bucket,
            key=key,
            s3_uri=self.uri(key),
            sidecar_uri=self.uri(self.sidecar_key(key)),
            presigned_url=self.presign(key),
            sha256=sha,
            size=size,
            already_archived=already,
            contact_sheet_uri=sheet_uri,
        )


class _PartBuffer:
    """Downloaded chunks waiting to become a part; each byte is copied once, into its part
    (a growing bytearray copies each chunk in, then again out)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, chunk: bytes) -> None:
        if chunk:
            self._chunks.append(chunk)
            self._size += len(chunk)

    def take(self, n: int) -> bytes:
        """The first `n` bytes (n <= len(self))."""
        taken: list[bytes | memoryview] = []
        need = n
        while need:
            chunk = self._chunks[0]
            if len(chunk) <= need:
                taken.append(self._chunks.pop(0))
                need -= len(chunk)
            else:
                view = memoryview(chunk)
                taken.append(view[:need])
                self._chunks[0] = bytes(view[need:])
                need = 0
        self._size -= n
        return b"".join(taken)


class _Multipart:
    """A multipart upload with a bounded number of parts in flight."""

    def __init__(self, archiver: S3Archiver, key: str, metadata: dict[str, str]) -> None:
        self._s3 = archiver.s3
        self._bucket = archiver.target.bucket
        self._key = key
        self._max = archiver.target.max_inflight_parts
        # Metadata is fixed at creation, before the file's sha256 is known; complete() adds
        # it with an in-place copy once the last part is in.
        self._metadata = metadata
        created = self._s3.create_multipart_upload(
            Bucket=self._bucket,
            Key=key,
            ContentType="video/mp4",
            Metadata=metadata,
            ChecksumAlgorithm="SHA256",
        )
        self._upload_id = created["UploadId"]
        self._pool = ThreadPoolExecutor(max_workers=self._max, thread_name_prefix="s3-part")
        self._futures: list[Future[dict[str, Any]]] = []

    def add(self, data: bytes) -> None:
        number = len(self._futures) + 1
        # Backpressure: wait for the oldest part before a new one past the limit.
        pending = [f for f in self._futures if not f.done()]
        if len(pending) >= self._max:
            pending[0].result()
        self._futures.append(self._pool.submit(self._part, number, data))

    def _part(self, number: int, data: bytes) -> dict[str, Any]:
        checksum = _b64(hashlib.sha256(data).digest())
        answer = self._s3.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=data,
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}

    def complete(self, metadata: dict[str, str]) -> bool:
        parts = [f.result() for f in self._futures]
        self._pool.shutdown()
        try:
            self._s3.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _is_precondition_failed(exc):
                self.abort()
                return False
            raise
        if metadata != self._metadata:
            # The file's sha256 is known only now: set it with an in-place metadata copy.
            self._s3.copy_object(
                Bucket=self._bucket,
                Key=self._key,
                ContentType="video/mp4",
                CopySource={"Bucket": self._bucket, "Key": self._key},
                Metadata=metadata,
                MetadataDirective="REPLACE",
            )
        return True

    def abort(self) -> None:
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
        with suppress(ClientError):
            self._s3.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
            )
