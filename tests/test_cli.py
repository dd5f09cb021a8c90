"""The `wan-video` command, run as a person runs it (a subprocess), over real servers: bad
input answered before any server starts, a dry run that calls nothing, a batch whose failed
row leaves the run Failed in Prefect with its progress in the logs and its artifacts readable,
and limits that change only what is named."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLE, Stack
from wan_tasks.api.models import PRICE_USD


def wan_video(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wan_tasks.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def api_url() -> str:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    assert url, "the test session's Prefect server"
    return url


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No Prefect server, service key or bucket configured: the command would start the
    temporary server and the embedded services, and writes their state under tmp_path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "WAVESPEED_", "WAN_TASKS_", "AWS_"))
    }
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        WAN_TASKS_HOME=str(tmp_path / "wan"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        **extra,
    )
    return env


def write_jsonl(path: Path, rows: list[dict[str, Any] | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# -- bad input: answered before anything starts ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "args", "expected"),
    [
        ("missing", None, ["batch", "{dir}/nope.jsonl"], r"^error: manifest: no file at .*nope"),
        (
            "header-typo",
            "image,promt\nx.png,hello\n",
            ["batch", "{dir}/typo.csv"],
            r"^error: typo\.csv: unknown header column\(s\) 'promt'",
        ),
        (
            "bad-row",
            json.dumps({"image": str(SAMPLE), "prompt": "ok"})
            + "\n"
            + json.dumps({"image": str(SAMPLE), "prompt": "six", "duration": 6})
            + "\n",
            ["batch", "{dir}/rows.jsonl"],
            r"^error: row 2: duration: ",
        ),
        (
            "zero-limit",
            None,
            ["limits", "--in-flight", "0"],
            r"^wan-video limits: error: argument --in-flight: must be at least 1, got 0",
        ),
        (
            "negative-limit",
            None,
            ["limits", "--per-minute", "-5"],
            r"^wan-video limits: error: argument --per-minute: must be at least 1, got -5",
        ),
    ],
)
def test_bad_input_exits_2_before_any_server(
    tmp_path: Path, name: str, content: str | None, args: list[str], expected: str
) -> None:
    if content is not None:
        target = {"header-typo": "typo.csv", "bad-row": "rows.jsonl"}[name]
        (tmp_path / target).write_text(content)
    done = wan_video(*(a.format(dir=tmp_path) for a in args), env=isolated_env(tmp_path))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert re.search(expected, errors[0]), done.stderr
    # One line names the problem (a bad row: its line, then what to do about it).
    assert len(errors) == (2 if name == "bad-row" else 1), done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    # No Prefect server ran (its database would be in PREFECT_HOME), no embedded store.
    assert not list((tmp_path / "prefect").glob("*.db"))
    assert not (tmp_path / "wan" / "seaweedfs").exists()


def test_batch_help_documents_the_manifest() -> None:
    done = wan_video("batch", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for words in (
        "MANIFEST the manifest",
        "s3://bucket/key",
        "--dry-run",
        "--out DIR",
        "resolve from the manifest's folder",
        "high_noise_loras",
        "path=scale;path=scale",
    ):
        assert words in text, words


# -- dry run -----------------------------------------------------------------------------------


def test_dry_run_calls_nothing_and_knows_what_is_archived(stack: Stack, tmp_path: Path) -> None:
    from tests.test_flows import FAST
    from wan_tasks.flows.generate import generate_batch

    done_row = {"id": "made", "image": str(SAMPLE), "prompt": "test dry run made", "seed": 3}
    report = generate_batch(str(write_jsonl(tmp_path / "first.jsonl", [done_row])), options=FAST)
    assert report.archived == 1
    before = stack.stats()
    manifest = write_jsonl(
        tmp_path / "plan.jsonl",
        [
            done_row,
            {"id": "new-long", "image": "sample.png", "prompt": "test dry run new", "duration": 8},
            {"id": "twin", "image": "sample.png", "prompt": "test dry run new", "duration": 8},
        ],
    )
    (tmp_path / "sample.png").write_bytes(SAMPLE.read_bytes())  # relative to the manifest
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    done = wan_video(
        "batch", str(manifest), "--dry-run", "--budget", "0.10", env=env, cwd=tmp_path.parent
    )
    assert done.returncode == 0, done.stderr
    assert stack.stats() == before  # not one call to the service
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith(" ")}
    assert "submitted before (prediction" in lines["made"]
    assert "new" in lines["new-long"] and f"${PRICE_USD[8]}" in lines["new-long"]
    assert "same request as new-long" in lines["twin"]
    assert f"bill: ${PRICE_USD[8]} for 1 new videos" in done.stdout
    assert "budget $0.10 covers 0 of the 1 new videos" in done.stdout


# -- a real batch from the command line ------------------------------------------------------


def _read_back(artifact_key: str) -> tuple[Any, Any, list[Any], list[Any]]:
    """The flow run behind the table artifact `artifact_key`, its logs and its artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
        LogFilter,
        LogFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        (table,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key]))
        )
        run = client.read_flow_run(table.flow_run_id)
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    return run, table, logs, artifacts


def test_cli_batch_with_a_failed_row_ends_failed(stack: Stack, tmp_path: Path) -> None:
    manifest = write_jsonl(
        tmp_path / "cli.jsonl",
        [
            {"id": "ok-1", "image": str(SAMPLE), "prompt": "test cli batch 1"},
            {"id": "ok-2", "image": str(SAMPLE), "prompt": "test cli batch 2"},
            {"id": "gone", "image": "https://unreachable.invalid/x.png", "prompt": "test cli 3"},
        ],
    )
    env = {**os.environ, "PREFECT_API_URL": api_url()}
    done = wan_video(
        "batch",
        str(manifest),
        "--artifact-key",
        "cli-failed-row",
        "--link-expiry-s",
        "7200",
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "2/3 archived" in done.stdout
    assert re.search(r"gone\s+failed\s+MediaAccessError", done.stdout)
    assert "Traceback" not in done.stderr  # the report, not the flow's traceback

    run, table, logs, artifacts = _read_back("cli-failed-row")
    assert run.state is not None and run.state.type.value == "FAILED"
    progress = [log.message for log in logs if log.message.startswith("progress: ")]
    assert progress, [log.message for log in logs]
    assert "2/3 archived, 0 in flight, 0 queued, 1 failed" in progress[-1]

    rows = {row["item"]: row for row in json.loads(table.data)}
    for item in ("ok-1", "ok-2"):
        assert re.fullmatch(r"\[video\]\(http[^)\s]+\)", rows[item]["video"])
        assert rows[item]["reason"] == ""
    assert rows["gone"]["status"] == "failed"
    assert rows["gone"]["reason"].startswith("MediaAccessError")
    assert rows["gone"]["video"] == ""
    assert "links expire 2 h after this run" in (table.description or "")
    assert sorted(a.key for a in artifacts if a.key) == ["cli-failed-row", "cli-failed-row-sheets"]


def test_generate_with_the_embedded_store_keeps_local_copies(stack: Stack, tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WAN_TASKS_", "AWS_"))
    }  # no bucket: the embedded store
    env.update(PREFECT_API_URL=api_url(), WAN_TASKS_HOME=str(tmp_path / "wan"))
    done = wan_video(
        "generate",
        "--image",
        str(SAMPLE),
        "--prompt",
        "test cli embedded",
        "--artifact-key",
        "cli-embedded",
        "--out",
        str(tmp_path / "out"),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["presigned_url"] is None  # its store stopped with the command
    video = Path(result["local_copies"][0])
    assert video.parent == (tmp_path / "out").resolve() and video.suffix == ".mp4"
    assert hashlib.sha256(video.read_bytes()).hexdigest() == result["sha256"]

    _, table, _, _ = _read_back("cli-embedded")
    assert "work only while it runs" in (table.description or "")
    (row,) = json.loads(table.data)
    kept = Path(row["local_copy"])  # the flow's own copy, under WAN_TASKS_HOME
    assert kept.is_relative_to(tmp_path / "wan")
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == result["sha256"]


# -- limits --------------------------------------------------------------------------------------


def _limit(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


def test_limits_change_only_what_is_named(prefect_server: None, capsys: Any) -> None:
    from prefect.exceptions import ObjectNotFound

    from wan_tasks.cli.main import main

    names = ["--in-flight-name", "cli-in-flight", "--per-minute-name", "cli-per-minute"]
    assert main(["limits", *names]) == 0  # shows; creates nothing
    shown = capsys.readouterr().out
    assert "cli-in-flight: not set" in shown and "cli-per-minute: not set" in shown
    with pytest.raises(ObjectNotFound):
        _limit("cli-in-flight")

    assert main(["limits", *names, "--in-flight", "5"]) == 0
    assert _limit("cli-in-flight").limit == 5
    with pytest.raises(ObjectNotFound):
        _limit("cli-per-minute")

    assert main(["limits", *names, "--per-minute", "30"]) == 0
    assert _limit("cli-in-flight").limit == 5  # untouched (it used to reset to 3)
    per_minute = _limit("cli-per-minute")
    assert (per_minute.limit, per_minute.slot_decay_per_second) == (30, 0.5)

    assert main(["limits", *names]) == 0
    shown = capsys.readouterr().out
    assert "cli-in-flight: 5 videos in flight" in shown
    assert "cli-per-minute: 30 submits per minute" in shown
    assert _limit("cli-in-flight").limit == 5

    assert main(["limits", *names, "--tier", "silver"]) == 0
    per_minute = _limit("cli-per-minute")
    assert _limit("cli-in-flight").limit == 300
    assert (per_minute.limit, per_minute.slot_decay_per_second) == (500, pytest.approx(500 / 60))


def test_limits_warn_about_a_temporary_server(prefect_server: None) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from wan_tasks.cli.main import temporary_server_warning

    assert temporary_server_warning() is None  # a real server is configured
    with temporary_settings(updates={PREFECT_API_URL: None}):
        warning = temporary_server_warning()
    assert warning and "PREFECT_API_URL is not set" in warning and "temporary" in warning


# -- progress --------------------------------------------------------------------------------


def test_progress_counts_each_video_and_logs_lines() -> None:
    import logging
    import threading
    from decimal import Decimal

    from wan_tasks.flows.progress import Progress, watch

    seen: list[Any] = []
    records: list[logging.LogRecord] = []
    log = logging.getLogger("test.progress")
    log.setLevel(logging.INFO)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    with (
        watch(seen.append),
        Progress(40, spend=lambda: Decimal("1.20"), log=log, every_s=0.05) as progress,
    ):

        def one(i: int) -> None:
            progress.started()
            progress.finished(ok=i % 10 != 0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    final = progress.snapshot()
    assert (final.archived, final.failed, final.in_flight, final.queued) == (36, 4, 0, 0)
    assert (
        seen[-1]
        .line()
        .startswith("36/40 archived, 0 in flight, 0 queued, 4 failed; new spend $1.20")
    )
    assert seen[-1].line().endswith("time left done")
    log.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert lines and lines[-1] == f"progress: {seen[-1].line()}"


def test_a_long_wait_logs_that_it_is_still_running(
    make_stack: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from tests.conftest import run_video
    from tests.test_flows import FAST
    from wan_tasks import I2VRequest
    from wan_tasks.api.models import MODEL_ID
    from wan_tasks.core.inference_times import InferenceTimes
    from wan_tasks.integration import tasks

    make_stack(latency_s=2.0)
    monkeypatch.setattr(tasks, "STILL_RUNNING_EVERY_S", 0.5)
    # Learned times aim the first poll just after 2 s: the notices must come during that
    # sleep too (for a real task it is most of the wait), not only once polling starts.
    learned = InferenceTimes()
    for _ in range(3):
        learned.record(MODEL_ID, 5, 2.0)
    monkeypatch.setattr(tasks, "INFERENCE_TIMES", learned)
    caplog.set_level(logging.INFO)
    out = run_video(I2VRequest(image=str(SAMPLE), prompt="test still running"), options=FAST)
    assert out.status == "archived"
    notices = [r.getMessage() for r in caplog.records if "still running after" in r.getMessage()]
    assert notices and notices[0].startswith(out.prediction_id or "?")


def test_the_temporary_server_records_task_runs_in_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without PREFECT_API_URL a command starts Prefect's temporary server: its recorder is set
    for batches, unless the user set it; a server of the user's is left as it is."""
    from wan_tasks.cli.main import _prepare_environment
    from wan_tasks.devstack.prefect_server import BATCH_SERVER_SETTINGS

    size = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"
    from wan_tasks.cli.main import STARTUP_TIMEOUT_ENV

    for name in (*BATCH_SERVER_SETTINGS, STARTUP_TIMEOUT_ENV):
        # setenv first: monkeypatch then restores (or removes) the variable after the test,
        # whatever _prepare_environment writes (a delenv of an unset name records nothing).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    _prepare_environment()
    assert size not in os.environ
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv(size, "7")
    _prepare_environment()
    assert os.environ[size] == "7"
    flush = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"
    assert os.environ[flush] == BATCH_SERVER_SETTINGS[flush] == "1"
