"""WaveSpeed's official clients, unchanged, against the emulator over HTTP.

* The Python SDK `wavespeed` 2.0.5 (PyPI): every operation it has.
* The JS SDK `wavespeed` 0.3.2 (npm), the MCP server `@wavespeed/mcp` 1.0.7 and the CLI
  `@wavespeed/cli` 0.2.2 (which bundles the JS SDK 0.2.3), installed in tests/js by
  `make` (`npm ci`, pinned by tests/js/package-lock.json) and run with node. Skipped, saying
  why, where node or the installed packages are missing.

Each client is pointed at the emulator the way its own docs allow (the SDKs' `base_url`
option, the MCP server's WAVESPEED_BASE_URL, the CLI's `wavespeed config --base-url`); see
/tmp/research/wavespeed-clients.md for every HTTP call they make.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE
from wan_tasks.api.models import MODEL_ID
from wan_tasks.emulator import Emulator
from wan_tasks.emulator.render import probe_mp4

MakeEmu = Callable[..., Emulator]
JS = Path(__file__).resolve().parent / "js"
MODULES = JS / "node_modules"


def _input(image: str, **extra: Any) -> dict[str, Any]:
    return {"image": image, "prompt": "a lake at dawn", "duration": 5, "seed": 7, **extra}


# -- Python SDK 2.0.5 ------------------------------------------------------------------------


@pytest.fixture
def sdk() -> Callable[..., Any]:
    wavespeed = pytest.importorskip("wavespeed")
    assert wavespeed.__version__ == "2.0.5"

    def make(emu: Emulator, **kwargs: Any) -> Any:
        kwargs.setdefault("retry_interval", 0.05)
        kwargs.setdefault("api_key", emu.api_key)
        return wavespeed.Client(base_url=emu.base_url, **kwargs)

    return make


def test_py_sdk_run_polls_to_completion(make_emulator: MakeEmu, sdk: Callable[..., Any]) -> None:
    emu = make_emulator(latency_s=0.2)
    client = sdk(emu)
    result = client.run(MODEL_ID, _input(client.upload(str(SAMPLE))), poll_interval=0.1)
    (url,) = result["outputs"]
    assert probe_mp4(httpx.get(url, timeout=30).content).frames == 81
    stats = emu.stats()
    assert stats["submissions"] == 1 and stats["result_polls"] >= 1
    assert stats["sync_submits"] == 0


def test_py_sdk_sync_mode_makes_one_request(
    make_emulator: MakeEmu, sdk: Callable[..., Any]
) -> None:
    emu = make_emulator(latency_s=0.2)
    client = sdk(emu)
    result = client.run(MODEL_ID, _input(client.upload(str(SAMPLE))), enable_sync_mode=True)
    assert len(result["outputs"]) == 1
    stats = emu.stats()
    assert (stats["sync_submits"], stats["result_polls"]) == (1, 0)


def test_py_sdk_sync_timeout_is_reported_as_still_processing(
    make_emulator: MakeEmu, sdk: Callable[..., Any]
) -> None:
    emu = make_emulator(latency_s=60, sync_timeout_s=0.3)
    client = sdk(emu)
    image = client.upload(str(SAMPLE))
    with pytest.raises(RuntimeError, match="Sync mode timed out"):
        client.run(MODEL_ID, _input(image), enable_sync_mode=True)
    outcome = client.run_no_throw(MODEL_ID, _input(image), enable_sync_mode=True)
    assert outcome["status"] == "processing" and "Sync mode timed out" in outcome["error"]
    # The task goes on and can be fetched by id, as the service promises.
    later = client.get_result(outcome["task_id"])
    assert later["data"]["status"] == "processing"
    assert emu.stats()["sync_timeouts"] == 2


def test_py_sdk_run_no_throw_reports_completed_and_failed(
    make_emulator: MakeEmu, sdk: Callable[..., Any]
) -> None:
    emu = make_emulator(latency_s=0.1)
    client = sdk(emu)
    image = client.upload(str(SAMPLE))
    done = client.run_no_throw(MODEL_ID, _input(image), poll_interval=0.1)
    assert done["status"] == "completed" and len(done["outputs"]) == 1
    emu.set_faults({"script": {"submit": ["fail:1402"]}})
    failed = client.run_no_throw(MODEL_ID, _input(image), poll_interval=0.1)
    assert failed["status"] == "failed" and failed["task_id"] != "unknown"
    assert "media access failed" in failed["error"]


def test_py_sdk_uploads_a_path_a_file_object_and_an_mp4(
    make_emulator: MakeEmu, sdk: Callable[..., Any], tmp_path: Path
) -> None:
    emu = make_emulator(latency_s=0.1)
    client = sdk(emu)
    from_path = client.upload(str(SAMPLE))
    # A file object without a name: the SDK sends no content_type; the bytes decide.
    from_object = client.upload(io.BytesIO(SAMPLE.read_bytes()))
    video = client.run(MODEL_ID, _input(from_path), poll_interval=0.1)["outputs"][0]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(httpx.get(video, timeout=30).content)
    from_mp4 = client.upload(str(clip))
    for url, kind in (
        (from_path, "image/png"),
        (from_object, "image/png"),
        (from_mp4, "video/mp4"),
    ):
        got = httpx.get(url, timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == kind
    assert httpx.get(from_mp4, timeout=30).content == clip.read_bytes()
    assert emu.stats()["uploads"] == 3


def test_py_sdk_retries_transient_result_errors(
    make_emulator: MakeEmu, sdk: Callable[..., Any]
) -> None:
    emu = make_emulator(latency_s=0.1, faults={"script": {"result": ["503", "429", "500"]}})
    client = sdk(emu)
    result = client.run(MODEL_ID, _input(client.upload(str(SAMPLE))), poll_interval=0.1)
    assert len(result["outputs"]) == 1
    stats = emu.stats()
    assert stats["faults_injected"] == 3 and stats["result_polls"] >= 4
    assert stats["submissions"] == 1


def test_py_sdk_errors_on_submit_are_raised_not_retried(
    make_emulator: MakeEmu, sdk: Callable[..., Any]
) -> None:
    emu = make_emulator(tier="bronze", faults={"script": {"submit": ["503"]}})
    client = sdk(emu)
    image = client.upload(str(SAMPLE))
    with pytest.raises(RuntimeError, match="HTTP 503"):
        client.run(MODEL_ID, _input(image))
    client.run(MODEL_ID, _input(image), poll_interval=0.1)
    client.run(MODEL_ID, _input(image), poll_interval=0.1)
    with pytest.raises(RuntimeError, match="HTTP 429"):  # bronze: 2 videos a minute
        client.run(MODEL_ID, _input(image))
    with pytest.raises(RuntimeError, match="HTTP 401"):
        sdk(emu, api_key="wrong-key").run(MODEL_ID, _input(image))
    stats = emu.stats()
    assert stats["submissions"] == 2 and stats["rate_limited"] == 1


# -- node: JS SDK, MCP server, CLI -------------------------------------------------------------


def _need(package: str) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the official JS clients cannot run")
    if not (MODULES / package / "package.json").exists():
        pytest.skip(
            f"{package} is not installed in tests/js: run `cd tests/js && npm ci` "
            "(`make test` does when npm is present)"
        )


def _node(args: list[str], env: dict[str, str], timeout: float = 180) -> Any:
    done = subprocess.run(
        ["node", *args],
        cwd=JS,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = done.stdout.strip()
    assert text, f"no output; stderr: {done.stderr[-2000:]}"
    try:
        return json.loads(text)  # --json answers (pretty-printed) and the scenario scripts
    except ValueError:  # the SDKs log retries on stdout: the answer is the last line
        last = text.splitlines()[-1]
        return json.loads(last) if last.startswith(("{", "[")) else text


def _js(emu: Emulator, *args: str) -> Any:
    return _node(
        ["sdk_scenario.cjs", *args], {"WS_BASE": emu.base_url, "WAVESPEED_API_KEY": emu.api_key}
    )


def test_js_sdk_uploads_and_runs_with_and_without_sync_mode(make_emulator: MakeEmu) -> None:
    _need("wavespeed")
    emu = make_emulator(latency_s=0.2)
    image = _js(emu, "upload", str(SAMPLE))["url"]
    assert httpx.get(image, timeout=30).headers["content-type"] == "image/png"
    polled = _js(emu, "run", image)
    synced = _js(emu, "run", image, "sync")
    for answer in (polled, synced):
        (url,) = answer["outputs"]
        assert probe_mp4(httpx.get(url, timeout=30).content).frames == 81
    stats = emu.stats()
    assert stats["submissions"] == 2 and stats["sync_submits"] == 1


def test_js_sdk_run_no_throw_and_sync_timeout(make_emulator: MakeEmu) -> None:
    _need("wavespeed")
    emu = make_emulator(latency_s=60, sync_timeout_s=0.3)
    image = _js(emu, "upload", str(SAMPLE))["url"]
    timed_out = _js(emu, "runNoThrow", image, "sync")
    assert timed_out["status"] == "processing" and timed_out["outputs"] is None
    assert timed_out["error"]["name"] == "WavespeedSyncTimeoutException"
    assert emu._server.engine.get(timed_out["taskId"]) is not None
    emu.set_faults({"script": {"submit": ["fail:1200"]}})
    emu.config.latency_s = 0.05  # the engine reads it per task
    failed = _js(emu, "runNoThrow", image)
    assert failed["status"] == "failed" and "content moderation" in failed["error"]["message"]


def test_js_sdk_retries_transient_result_errors_and_uploads_video(
    make_emulator: MakeEmu, tmp_path: Path
) -> None:
    _need("wavespeed")
    emu = make_emulator(latency_s=0.1, faults={"script": {"result": ["502", "429"]}})
    answer = _js(emu, "topLevel", str(SAMPLE))  # module-level upload() and run()
    (video,) = answer["outputs"]
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(httpx.get(video, timeout=30).content)
    uploaded = _js(emu, "upload", str(clip))["url"]
    assert httpx.get(uploaded, timeout=30).headers["content-type"] == "video/mp4"
    assert emu.stats()["faults_injected"] == 2


def test_mcp_server_tools(make_emulator: MakeEmu, tmp_path: Path) -> None:
    _need("@wavespeed/mcp")
    _need("@modelcontextprotocol/sdk")
    emu = make_emulator(latency_s=0.2)
    image = str(SAMPLE)
    program = [
        ["get_balance", {}],
        ["list_models", {"query": "wan"}],
        ["get_model_schema", {"model": MODEL_ID}],
        ["get_price", {"model": MODEL_ID, "input": {"duration": 8}}],
        ["upload_file", {"path": image}],
        [
            "run_model",
            {
                "model": MODEL_ID,
                "input": {"image": f"@{image}", "prompt": "x"},
                "wait_seconds": 120,
            },
        ],
    ]
    env = {
        "WAVESPEED_BASE_URL": emu.base_url,
        "WAVESPEED_API_KEY": emu.api_key,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    answers = {a["tool"]: a for a in _node(["mcp_scenario.mjs", json.dumps(program)], env)}
    assert not [a for a in answers.values() if a["isError"]], answers
    texts = {tool: json.loads(a["text"]) for tool, a in answers.items()}
    assert texts["get_balance"]["balance"] == 1000
    assert [m["model_id"] for m in texts["list_models"]["models"]] == [MODEL_ID]
    assert texts["get_model_schema"]["required"] == ["image", "prompt"]
    assert texts["get_price"]["price"] == 0.16
    assert texts["upload_file"]["url"].startswith(emu.base_url)
    run = texts["run_model"]
    assert run["status"] == "completed" and len(run["outputs"]) == 1
    # The prediction it made can be read back with get_prediction.
    again = _node(["mcp_scenario.mjs", json.dumps([["get_prediction", {"id": run["id"]}]])], env)
    assert json.loads(again[0]["text"])["status"] == "completed"


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Any]:
    _need("@wavespeed/cli")
    env = {
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }

    def run(emu: Emulator, *args: str) -> Any:
        env["WAVESPEED_API_KEY"] = emu.api_key
        return _node(["node_modules/@wavespeed/cli/dist/cli.js", *args], env)

    return run


def test_cli_commands(make_emulator: MakeEmu, cli: Callable[..., Any]) -> None:
    emu = make_emulator(latency_s=0.2)
    cli(emu, "config", "--base-url", emu.base_url)  # the CLI's own way to change its API
    assert cli(emu, "balance", "--json")["balance"] == 1000
    assert [m["model_id"] for m in cli(emu, "models", "--json")] == [MODEL_ID]
    assert "seed" in cli(emu, "schema", MODEL_ID, "--json")["properties"]
    assert cli(emu, "price", MODEL_ID, "-i", "duration=8", "--json")["unit_price"] == 0.16
    # Its upload is SDK 0.2.3's multipart form, whose file part has no content type.
    image = cli(emu, "upload", str(SAMPLE), "--json")["url"]
    assert httpx.get(image, timeout=30).headers["content-type"] == "image/png"
    polled = cli(emu, "run", MODEL_ID, "-i", f"image={image}", "-i", "prompt=x", "--json")
    synced = cli(emu, "run", MODEL_ID, "-i", f"image={image}", "-i", "prompt=x", "--sync", "--json")
    for answer in (polled, synced):
        assert len(answer["outputs"]) == 1
    history = cli(emu, "history", "--json")
    assert len(history["items"]) == 2 and history["page"] == 1
    task_id = history["items"][0]["id"]
    assert cli(emu, "show", task_id, "--json")["status"] == "completed"
    cli(emu, "delete", task_id, "-y", "--json")
    assert emu._server.engine.get(task_id).status == "deleted"  # type: ignore[union-attr]
    assert emu.stats()["sync_submits"] == 1
