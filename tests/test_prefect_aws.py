"""wan-tasks beside prefect-aws: the newest prefect-aws installs with it, and a real
`AwsCredentials` + `S3Bucket` (pointing at the test SeaweedFS) carries the archive, the ledger,
the batch summary, an s3:// manifest and Prefect's own task results."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version
from prefect.blocks.core import Block

from tests.conftest import SAMPLE, Stack
from wan_tasks.api.policies import PollPolicy
from wan_tasks.flows.options import ArchiveOptions, RunOptions

FAST = RunOptions(
    poll=PollPolicy(first_poll_after=0.3, min_interval=0.2, max_interval=0.5, jitter=0.0)
)
AWS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "WAN_TASKS_BUCKET",
)


def test_the_newest_prefect_aws_line_installs_beside_wan_tasks() -> None:
    """A boto3 pin too new for aiobotocore makes pip fall back to prefect-aws 0.5.13 without
    a word; this fails CI when that happens."""
    assert Version(version("prefect-aws")) >= Version("0.7.12")
    assert Version(version("prefect-redis")) >= Version("0.3")
    import prefect_aws
    import prefect_redis

    assert prefect_aws.S3Bucket and prefect_redis.RedisLockManager


@pytest.fixture
def aws_blocks(stack: Stack, s3_store: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Block]:
    """`team-archive`: a saved prefect-aws S3Bucket (a fresh bucket per test) whose
    AwsCredentials reach the test store through `aws_client_parameters.endpoint_url`. The AWS
    environment is cleared, so anything that does not go through the block has no credentials
    (the store enforces them)."""
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    from wan_tasks.integration import runtime

    bucket = f"block-videos-{uuid.uuid4().hex[:8]}"
    stack.s3.create_bucket(Bucket=bucket)
    credentials = AwsCredentials(
        aws_access_key_id=s3_store.access_key_id,
        aws_secret_access_key=s3_store.secret_access_key,
        region_name=s3_store.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_store.endpoint_url),
    )
    credentials.save("wan-test-aws", overwrite=True)
    block = S3Bucket(bucket_name=bucket, credentials=credentials)
    block.save("team-archive", overwrite=True)
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setattr(runtime, "_s3", {})  # no client made from the environment earlier
    yield block


def test_s3_bucket_block_gives_the_bucket_and_a_working_client(aws_blocks: Any) -> None:
    from wan_tasks.integration.runtime import s3_bucket_block

    bucket, client = s3_bucket_block("team-archive")
    assert bucket == aws_blocks.bucket_name
    client.put_object(Bucket=bucket, Key="probe.txt", Body=b"through the block")
    assert client.get_object(Bucket=bucket, Key="probe.txt")["Body"].read() == b"through the block"


def test_a_block_that_is_not_an_s3_bucket_is_refused_by_name(prefect_server: None) -> None:
    from prefect.blocks.system import Secret

    from wan_tasks.errors import ConfigurationError
    from wan_tasks.integration.runtime import s3_bucket_block

    Secret(value="not-a-bucket").save("not-a-bucket", overwrite=True)
    with pytest.raises(ConfigurationError, match=r"s3_block 'secret/not-a-bucket'.*bucket_name"):
        s3_bucket_block("secret/not-a-bucket")


def list_keys(stack: Stack, bucket: str, prefix: str = "") -> list[str]:
    pages = stack.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def task_runs_of(flow_run_id: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_batch_through_real_prefect_aws_blocks(stack: Stack, aws_blocks: Any) -> None:
    """Manifest read from s3:// with the block, videos archived and the ledger written into the
    block's bucket, and the tasks' results stored there too (Prefect result storage = the
    block): a re-run finds every task Cached from the bucket and submits nothing."""
    from prefect.settings import PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, temporary_settings

    from wan_tasks.flows.generate import generate_batch

    bucket = aws_blocks.bucket_name
    rows = [
        {"id": f"aws-{i}", "image": str(SAMPLE), "prompt": f"test aws block {i}"} for i in range(2)
    ]
    stack.s3.put_object(
        Bucket=bucket,
        Key="manifests/aws.jsonl",
        Body="".join(json.dumps(r) + "\n" for r in rows).encode(),
    )
    manifest = f"s3://{bucket}/manifests/aws.jsonl"
    archive = ArchiveOptions(s3_block="team-archive", prefix="aws")

    with temporary_settings({PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK: "s3-bucket/team-archive"}):
        report = generate_batch(manifest, archive=archive, options=FAST)
        assert report.archived == 2, report
        submitted = stack.stats()["submissions"]
        assert submitted == 2
        for outcome in report.outcomes:
            assert outcome.s3_uri and outcome.s3_uri.startswith(f"s3://{bucket}/aws/")
            data, _ = stack.object(outcome.s3_uri)
            assert hashlib.sha256(data).hexdigest() == outcome.sha256
        assert report.summary_uri and report.summary_uri.startswith(f"s3://{bucket}/")
        assert list_keys(stack, bucket, "_wan-tasks/ledger/"), "no ledger in the block's bucket"
        # Prefect's result records, keyed by the tasks' cache keys, in the block's bucket.
        results = [
            k
            for k in list_keys(stack, bucket)
            if k.startswith(("wan-submit-", "wan-wait-", "wan-archive-"))
        ]
        assert sum(k.startswith("wan-submit-") for k in results) == 2, results
        assert sum(k.startswith("wan-archive-") for k in results) == 2, results

        state = generate_batch(manifest, archive=archive, options=FAST, return_state=True)
    again = state.result()
    assert again.archived == 2 and again.new_spend_usd == 0
    assert stack.stats()["submissions"] == submitted
    runs = task_runs_of(state.state_details.flow_run_id)
    submits = [r for r in runs if r.name.startswith("submit-i2v[")]
    assert len(submits) == 2
    assert all(r.state and r.state.name == "Cached" for r in submits), [
        (r.name, r.state and r.state.name) for r in submits
    ]


def test_generate_video_archives_through_the_block_alone(
    stack: Stack, aws_blocks: Any, tmp_path: Path
) -> None:
    from tests.conftest import run_video
    from wan_tasks.api.models import I2VRequest

    bucket = aws_blocks.bucket_name
    out = run_video(
        I2VRequest(prompt="test s3 block video", image=str(SAMPLE)),
        archive=ArchiveOptions(s3_block="team-archive"),
        options=FAST,
    )
    assert out.s3_uri and out.s3_uri.startswith(f"s3://{bucket}/")
    data, _ = stack.object(out.s3_uri)
    assert hashlib.sha256(data).hexdigest() == out.sha256
