"""A place in object storage: a bucket, a key prefix, and how to reach the bucket.

One description for everything wan-tasks keeps in S3 (archived videos and their sidecars, the
submission ledger, batch summaries): the archive target and the ledger are places, and the
integration layer turns a place's `s3_block` (a saved prefect-aws S3Bucket block) or boto3's
standard configuration into a client.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$"


class S3Place(BaseModel):
    """A bucket and a prefix in it; `s3_block` names the credentials that reach it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bucket: str = Field(min_length=3, max_length=63, pattern=BUCKET_PATTERN)
    prefix: str = ""
    s3_block: str | None = Field(
        None, description="a saved prefect-aws S3Bucket block; none: boto3's standard settings"
    )

    def key(self, name: str) -> str:
        """`name` under this place's prefix."""
        prefix = self.prefix.strip("/")
        return f"{prefix}/{name}" if prefix else name

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def at(self, prefix: str) -> S3Place:
        """The same bucket and credentials, another prefix."""
        return S3Place(bucket=self.bucket, prefix=prefix, s3_block=self.s3_block)


__all__ = ["BUCKET_PATTERN", "S3Place"]
