"""The API key never appears in a repr, a log line, an exception or anything persisted."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reliability.secret_scan import OUTPUT_SIGNATURE, Needle, found_in, scan_tree
from tests.conftest import SAMPLE
from wan_tasks import I2VRequest, WaveSpeedError
from wan_tasks.integration.blocks import WaveSpeedCredentials

KEY = "sk-live-SECRET-9f8e7d6c5b4a"


def test_key_never_reaches_logs_or_errors(
    make_emulator: Callable[..., Any],
    make_client: Callable[..., Any],
    all_logs: pytest.LogCaptureFixture,
) -> None:
    emu = make_emulator(
        api_key=KEY,
        faults={
            "script": {"result": ["503", "429"], "submit": ["fail:5003"], "download": ["expire"]}
        },
    )
    client = make_client(emu)
    errors: list[BaseException] = []
    for req in (
        I2VRequest(image=str(SAMPLE), prompt="x", seed=1),
        I2VRequest(image=str(SAMPLE), prompt="x", seed=2),
    ):
        try:
            done = client.run(req)
            with client.stream_output(done.outputs[0]):
                pass
        except WaveSpeedError as exc:
            errors.append(exc)
    wrong = make_client(emu, api_key="not-the-key")
    try:
        wrong.balance()
    except WaveSpeedError as exc:
        errors.append(exc)
    assert len(errors) == 3  # the 5003 failure, the expired download, the 401
    text = all_logs.text + "".join(r.getMessage() for r in all_logs.records)
    assert "HTTP Request" in text  # httpx did log, and logs were captured
    assert KEY not in text
    for exc in errors:
        assert KEY not in str(exc) and KEY not in repr(exc)
        assert KEY.encode() not in pickle.dumps(exc)
    assert KEY not in repr(client) and KEY not in repr(client.ops)


def test_credentials_block_hides_the_key() -> None:
    creds = WaveSpeedCredentials(api_key=KEY, base_url="http://127.0.0.1:9")
    assert KEY not in repr(creds) and KEY not in str(creds)
    assert KEY not in creds.model_dump_json()
    client = creds.get_client()
    try:
        assert KEY not in repr(client)
    finally:
        client.close()


def test_missing_key_is_a_clear_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from wan_tasks import ConfigurationError, WaveSpeedClient

    monkeypatch.delenv("WAVESPEED_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="WAVESPEED_API_KEY"):
        WaveSpeedClient()
    monkeypatch.setenv("WAVESPEED_API_KEY", KEY)
    monkeypatch.setenv("WAVESPEED_BASE_URL", "ftp://nope")
    with pytest.raises(ConfigurationError, match="http"):
        WaveSpeedClient()


def test_the_scan_decodes_what_prefect_stores(
    prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret inside a persisted task result is base64 in a JSON record: a search of the
    raw bytes misses it, the decoding scan finds it."""
    from prefect import flow, task
    from prefect.filesystems import LocalFileSystem

    needle = "needle-" + "7f3a9c" * 6
    LocalFileSystem(basepath=str(tmp_path / "results")).save("secret-scan", overwrite=True)

    @task(
        persist_result=True,
        result_storage="local-file-system/secret-scan",
        cache_key_fn=lambda *_: "secret-scan-probe",
    )
    def leak() -> dict[str, str]:
        return {"inside": needle}

    @flow
    def run() -> None:
        leak()

    run()
    assert any((tmp_path / "results").iterdir())
    assert scan_tree(tmp_path / "results", [needle.encode()], decode=False) == []
    assert scan_tree(tmp_path / "results", [needle.encode()])


def test_signed_urls_in_error_messages_are_scrubbed() -> None:
    from wan_tasks.errors import MediaAccessError, WanTasksError

    signed = (
        "HTTPS://bucket.s3.amazonaws.com/a.png?X-Amz-Credential=AKIAEXAMPLE%2F2026"
        "&X-Amz-Signature=" + "ab" * 32
    )
    for err in (
        WanTasksError(f"could not fetch {signed}"),
        MediaAccessError(f"1402 for {signed}", prediction_id="p1"),
        WanTasksError("header was Authorization: Bearer sk-live-abcdef123456"),
    ):
        text = str(err) + repr(err) + pickle.dumps(err).hex()
        assert "ab" * 32 not in str(err) and "AKIAEXAMPLE" not in str(err)
        assert "sk-live-abcdef123456" not in text
        assert "REDACTED" in str(err)


def test_full_run_leaves_no_secret_anywhere(
    make_stack: Callable[..., Any],
    s3_store: Any,
    tmp_path: Path,
    all_logs: pytest.LogCaptureFixture,
) -> None:
    """After flows ran (successes, a failed task, a lost submit answer), search every log,
    Prefect result, artifact, flow parameter, event, manifest, object and the Prefect database
    for the API key and the S3 secret."""
    import json
    import os

    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    from tests.test_flows import FAST
    from wan_tasks.flows.generate import generate_batch

    stack = make_stack(
        api_key=KEY, signed_outputs=True, faults={"script": {"submit": ["drop", "fail:1403"]}}
    )
    rows = [{"id": f"s{i}", "image": str(SAMPLE), "prompt": f"test secrets {i}"} for i in range(3)]
    manifest = tmp_path / "secrets.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    report = generate_batch(str(manifest), options=FAST, fail_on_item_error=False)
    assert report.archived == 2 and report.failed == 1  # the error paths ran too
    APILogHandler().flush()

    s3_secret = s3_store.secret_access_key
    # The key, the store's secret, and any live signature of a signed output URL.
    needles: list[Needle] = [KEY.encode(), s3_secret.encode(), OUTPUT_SIGNATURE]
    hits: list[str] = []
    # Prefect's home: result storage (decoded: base64 pickles), cache records, lock files.
    hits += scan_tree(Path(os.environ["PREFECT_HOME"]), needles)
    # The Prefect database (logs, parameters, states, artifacts, events), WAL included.
    db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    hits += scan_tree(db.parent, needles)
    # Through the API as well, in case something is still in flight to the database.
    with get_client(sync_client=True) as client:
        api_text = "".join(
            [log.message for log in client.read_logs()]
            + [json.dumps(a.data, default=str) for a in client.read_artifacts()]
            + [json.dumps(r.parameters, default=str) for r in client.read_flow_runs()]
        )
    hits += [f"api: {h}" for h in found_in(api_text.encode(), needles)]
    # Every object in the bucket: videos, manifests, sheets, summaries, the ledger; metadata.
    s3 = stack.s3
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket):
        for obj in page.get("Contents", []):
            got = s3.get_object(Bucket=stack.bucket, Key=obj["Key"])
            blob = got["Body"].read() + json.dumps(got["Metadata"]).encode()
            hits += [f"s3://{stack.bucket}/{obj['Key']}: {h}" for h in found_in(blob, needles)]
    # Everything logged in this process.
    hits += [f"log: {h}" for h in found_in(all_logs.text.encode(), needles)]
    assert not hits, hits
