"""The emulator behaves like the documented WaveSpeed service, over HTTP: account tiers,
sync mode, common flags, uploads, batch delete, catalogue, pricing and history."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import SAMPLE
from wan_tasks.api.models import MODEL_ID, I2VRequest
from wan_tasks.emulator import Emulator, EmulatorConfig
from wan_tasks.emulator.render import probe_mp4

MakeEmu = Callable[..., Emulator]
PNG = SAMPLE.read_bytes()
MP4_HEAD = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64
MP3_HEAD = b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" * 16


def upload_sample(http: httpx.Client) -> str:
    r = http.post("/api/v3/media/upload/binary", files={"file": ("in.png", PNG, "image/png")})
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["download_url"])


def submit(http: httpx.Client, image: str, **extra: Any) -> httpx.Response:
    return http.post(f"/api/v3/{MODEL_ID}", json={"image": image, "prompt": "a lake", **extra})


def wait_status(
    http: httpx.Client, task_id: str, wanted: set[str], limit_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        data: dict[str, Any] = http.get(f"/api/v3/predictions/{task_id}/result").json()["data"]
        if data["status"] in wanted or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


# -- tiers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "concurrency", "per_minute"),
    [
        ("test", 3, None),
        ("bronze", 2, 2),
        ("silver", 300, 500),
        ("gold", 3000, 3000),
        ("ultra", 10000, 5000),
    ],
)
def test_tier_sets_the_documented_caps(tier: str, concurrency: int, per_minute: int | None) -> None:
    config = EmulatorConfig(api_key="k", tier=tier)  # type: ignore[arg-type]
    assert (config.concurrency, config.submits_per_minute) == (concurrency, per_minute)
    # An explicit setting wins over the tier.
    assert EmulatorConfig(api_key="k", tier=tier, concurrency=7).concurrency == 7  # type: ignore[arg-type]


def test_bronze_tier_processes_two_at_once_and_queues_the_rest(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(tier="bronze", submits_per_minute=None, latency_s=60)
    http = make_http(emu)
    image = upload_sample(http)
    ids = [submit(http, image).json()["data"]["id"] for _ in range(4)]
    first = [wait_status(http, i, {"processing"}) for i in ids[:2]]
    assert [d["status"] for d in first] == ["processing", "processing"]
    # The first two run for a minute, so the other two can only be waiting.
    later = [http.get(f"/api/v3/predictions/{i}/result").json()["data"] for i in ids[2:]]
    assert [d["status"] for d in later] == ["created", "created"]
    stats = emu.stats()
    assert stats["max_processing"] == 2 and stats["submissions"] == 4
    assert http.post("/api/v3/predictions/delete", json={"ids": ids}).json()["data"] == {
        "deleted_count": 4
    }
    assert emu.stats()["in_flight"] == 0


def test_inference_times_vary_when_asked(
    make_emulator: MakeEmu, make_http: Callable[[Emulator], httpx.Client]
) -> None:
    """The real service's inference times vary (50-65 s on the model page); a client whose
    polls only line up with an exact latency would look better here than there. With
    `latency_jitter_s`, each task takes latency_s +- that (a render on a loaded machine can
    only add to it, so the lower bound and a draw below the mean are what is checked)."""
    with pytest.raises(ValueError, match="latency_jitter_s"):
        EmulatorConfig(api_key="k", latency_s=1.0, latency_jitter_s=1.5)
    emu = make_emulator(latency_s=1.0, latency_jitter_s=0.5, time_scale=0.3, concurrency=12)
    http = make_http(emu)
    image = upload_sample(http)
    ids = [submit(http, image, seed=n).json()["data"]["id"] for n in range(12)]
    took = [wait_status(http, i, {"completed"})["timings"]["inference"] for i in ids]
    assert all(ms >= 0.5 * 0.3 * 1000 - 5 for ms in took), took
    assert min(took) < 1.0 * 0.3 * 1000, took


def test_bronze_tier_refuses_the_third_video_a_minute_with_retry_after(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(tier="bronze")
    http = make_http(emu)
    image = upload_sample(http)
    assert [submit(http, image).status_code for _ in range(2)] == [200, 200]
    refused = submit(http, image)
    assert refused.status_code == 429
    assert "2 video submissions per minute" in refused.json()["message"]
    assert 0 < float(refused.headers["Retry-After"]) <= 60
    stats = emu.stats()
    assert stats["submissions"] == 2 and stats["rate_limited"] == 1


def test_scaled_minute_gives_a_scaled_retry_after_and_resets(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(tier="bronze", time_scale=0.02)  # "a minute" is 1.2 s
    http = make_http(emu)
    image = upload_sample(http)
    for _ in range(10):  # a loaded machine may let a window pass between two submits
        refused = submit(http, image)
        if refused.status_code == 429:
            break
        assert refused.status_code == 200
    assert refused.status_code == 429
    retry_after = float(refused.headers["Retry-After"])
    assert 0 < retry_after <= 1.2
    time.sleep(retry_after)
    assert submit(http, image).status_code == 200
    assert emu.stats()["rate_limited"] == 1


def test_cli_emulator_serves_the_chosen_tier(tmp_path: Any) -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wan_tasks.cli.main",
            "emulator",
            "--api-key",
            "cli-key",
            "--tier",
            "bronze",
            "--latency-s",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "tier bronze: 2 tasks at once, 2 video submissions a minute" in line
        base = line.split(" on ", 1)[1].split(",", 1)[0]
        with httpx.Client(
            base_url=base, timeout=30, headers={"Authorization": "Bearer cli-key"}
        ) as http:
            image = upload_sample(http)
            codes = [submit(http, image).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- common request fields ----------------------------------------------------------------------


def test_sync_mode_answers_with_the_finished_task(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.2)
    http = make_http(emu)
    r = submit(http, upload_sample(http), enable_sync_mode=True, seed=4)
    data = r.json()["data"]
    assert r.status_code == 200 and data["status"] == "completed"
    info = probe_mp4(httpx.get(data["outputs"][0], timeout=30).content)
    assert info.frames == 81
    assert "enable_sync_mode" not in emu._server.engine.tasks[data["id"]].input
    stats = emu.stats()
    assert stats["sync_submits"] == 1 and stats["sync_timeouts"] == 0


def test_sync_mode_past_its_timeout_answers_5004_and_the_task_goes_on(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=60, sync_timeout_s=0.3)
    http = make_http(emu)
    r = submit(http, upload_sample(http), enable_sync_mode=True)
    body = r.json()
    assert r.status_code == 200 and body["code"] == 200
    data = body["data"]
    assert (data["status"], data["code"]) == ("processing", 5004)
    assert data["error"].startswith("Sync mode timed out after 0.3 seconds")
    later = http.get(f"/api/v3/predictions/{data['id']}/result").json()["data"]
    assert later["status"] == "processing" and "code" not in later and later["error"] == ""
    assert emu.stats()["sync_timeouts"] == 1


def test_sync_timeout_defaults_to_the_documented_90_seconds() -> None:
    assert EmulatorConfig(api_key="k").sync_timeout_s == 90


def test_base64_output_sends_the_video_as_a_data_uri(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.1)
    http = make_http(emu)
    task_id = submit(http, upload_sample(http), enable_base64_output=True).json()["data"]["id"]
    data = wait_status(http, task_id, {"completed", "failed"})
    (output,) = data["outputs"]
    prefix = "data:video/mp4;base64,"
    assert output.startswith(prefix)
    assert probe_mp4(base64.b64decode(output.removeprefix(prefix))).frames == 81


def test_common_flags_must_be_booleans(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    http = make_http(emulator)
    r = submit(http, upload_sample(http), enable_sync_mode="yes")
    assert r.status_code == 400 and "enable_sync_mode" in r.json()["message"]
    assert emulator.stats()["submissions"] == 0


# -- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "declared", "data", "kind", "stored"),
    [
        ("in.png", "image/png", PNG, "image", "image/png"),
        ("blob", None, PNG, "image", "image/png"),  # no name, no type: the bytes say PNG
        ("clip.mp4", "video/mp4", MP4_HEAD, "video", "video/mp4"),
        ("blob", "application/octet-stream", MP4_HEAD, "video", "video/mp4"),
        ("song.mp3", "audio/mpeg", MP3_HEAD, "audio", "audio/mpeg"),
        ("blob", None, MP3_HEAD, "audio", "audio/mpeg"),
        ("clip.webm", None, b"\x00" * 32, "video", "video/webm"),  # the name is all there is
    ],
)
def test_multipart_upload_takes_images_video_and_audio(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
    filename: str,
    declared: str | None,
    data: bytes,
    kind: str,
    stored: str,
) -> None:
    http = make_http(emulator)
    part: tuple[Any, ...] = (filename, data) if declared is None else (filename, data, declared)
    r = http.post("/api/v3/media/upload/binary", files={"file": part})
    assert r.status_code == 200, r.text
    answer = r.json()["data"]
    assert (answer["type"], answer["size"]) == (kind, len(data))
    got = httpx.get(answer["download_url"], timeout=10)
    assert got.content == data and got.headers["content-type"] == stored


def test_presigned_upload_without_a_content_type_is_typed_from_its_bytes(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    http = make_http(emulator)
    ticket = http.post(
        "/api/v3/media/uploads", json={"filename": "upload", "size": len(MP4_HEAD)}
    ).json()["data"]
    assert ticket["upload"]["headers"] == {} and ticket["type"] is None
    assert httpx.put(ticket["upload"]["url"], content=MP4_HEAD, timeout=10).status_code == 200
    got = httpx.get(ticket["download_url"], timeout=10)
    assert got.headers["content-type"] == "video/mp4" and got.content == MP4_HEAD


def test_unsupported_uploads_are_refused_naming_the_type(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    http = make_http(emulator)
    r = http.post(
        "/api/v3/media/upload/binary", files={"file": ("notes.txt", b"hello", "text/plain")}
    )
    assert r.status_code == 400 and "text/plain" in r.json()["message"]
    ticket = http.post("/api/v3/media/uploads", json={"filename": "upload"}).json()["data"]
    put = httpx.put(ticket["upload"]["url"], content=b"just text", timeout=10)
    assert put.status_code == 400 and "unsupported file type" in put.json()["message"]
    assert emulator.stats()["uploads"] == 0


def test_uploads_past_their_kind_limit_answer_413(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(upload_limits={"image": 1000, "video": 3000, "audio": 2000})
    http = make_http(emu)
    big_png = PNG[:2000]
    r = http.post("/api/v3/media/upload/binary", files={"file": ("a.png", big_png, "image/png")})
    assert r.status_code == 413 and "image limit is 1000" in r.json()["message"]
    # The same bytes are fine as long as they fit: audio gets its own limit.
    ok = http.post("/api/v3/media/upload/binary", files={"file": ("a.mp3", MP3_HEAD, "audio/mpeg")})
    assert ok.status_code == 200
    r = http.post(
        "/api/v3/media/uploads",
        json={"filename": "v.mp4", "content_type": "video/mp4", "size": 3001},
    )
    assert r.status_code == 413 and "video limit is 3000" in r.json()["message"]
    # A ticket that said nothing of its size is still held to the limit at the PUT.
    ticket = http.post("/api/v3/media/uploads", json={"filename": "upload"}).json()["data"]
    put = httpx.put(ticket["upload"]["url"], content=MP4_HEAD + b"\x00" * 3000, timeout=10)
    assert put.status_code == 413
    assert emu.stats()["uploads"] == 1


# -- delete, outputs --------------------------------------------------------------------------


def test_batch_delete_counts_known_ids_and_outputs_stay_downloadable(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.1)
    http = make_http(emu)
    image = upload_sample(http)
    done_id = submit(http, image, seed=1).json()["data"]["id"]
    output_url = wait_status(http, done_id, {"completed"})["outputs"][0]
    other_id = submit(http, image, seed=2).json()["data"]["id"]
    r = http.post(
        "/api/v3/predictions/delete",
        json={"ids": [done_id, other_id, other_id, "f" * 32, "nonsense"]},
    )
    assert r.status_code == 200 and r.json()["data"] == {"deleted_count": 2}
    for task_id in (done_id, other_id):
        assert http.get(f"/api/v3/predictions/{task_id}/result").json()["data"]["status"] == (
            "deleted"
        )
    assert httpx.get(output_url, timeout=10).status_code == 200
    again = http.post("/api/v3/predictions/delete", json={"ids": [done_id]}).json()
    assert again["data"] == {"deleted_count": 0}
    bad = http.post("/api/v3/predictions/delete", json={"ids": "abc"})
    assert bad.status_code == 400 and "ids" in bad.json()["message"]


def test_unknown_output_is_not_found_and_an_old_one_is_expired(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.1, output_ttl_s=0.5)
    http = make_http(emu)
    task_id = submit(http, upload_sample(http)).json()["data"]["id"]
    url = wait_status(http, task_id, {"completed"})["outputs"][0]
    unknown = httpx.get(f"{emu.base_url}/media/outputs/{'a' * 32}.mp4", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["message"] == "not found"
    time.sleep(0.6)
    expired = httpx.get(url, timeout=10)
    assert expired.status_code == 404 and expired.json()["message"] == "output expired"


# -- catalogue and pricing ------------------------------------------------------------------


def test_models_lists_this_model_with_its_request_schema(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    r = make_http(emulator).get("/api/v3/models")
    assert r.status_code == 200
    (entry,) = [m for m in r.json()["data"] if m["model_id"] == MODEL_ID]
    assert entry["base_price"] == 0.1 and entry["type"] == "image-to-video"
    schema = entry["api_schema"]["api_schemas"][0]["request_schema"]
    ours = I2VRequest.model_json_schema()
    assert set(schema["properties"]) == set(ours["properties"])
    assert set(schema["required"]) == set(ours["required"])
    assert set(schema["x-order-properties"]) == set(ours["properties"])
    assert schema["properties"]["duration"]["enum"] == [5, 8]
    seed = schema["properties"]["seed"]
    assert (seed["minimum"], seed["maximum"], seed["default"]) == (
        ours["properties"]["seed"]["minimum"],
        ours["properties"]["seed"]["maximum"],
        -1,
    )
    lora = schema["properties"]["loras"]
    assert lora["maxItems"] == 3
    assert lora["items"]["properties"]["scale"]["maximum"] == 4.0


@pytest.mark.parametrize("route", ["/api/v3/model/pricing", "/api/v3/model/price"])
def test_pricing_answers_the_documented_prices(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
    route: str,
) -> None:
    http = make_http(emulator)
    five = http.post(route, json={"model_id": MODEL_ID, "inputs": {"prompt": "x"}}).json()
    assert five["data"]["unit_price"] == 0.10 and five["data"]["currency"] == "USD"
    eight = http.post(route, json={"model_id": MODEL_ID, "inputs": {"duration": 8}}).json()
    assert (eight["data"]["price"], eight["data"]["discounted_price"]) == (0.16, 0.16)
    unknown = http.post(route, json={"model_id": "someone/else", "inputs": {}})
    assert unknown.status_code == 404
    bad = http.post(route, json={"model_id": MODEL_ID, "inputs": {"duration": 7}})
    assert bad.status_code == 400 and "duration" in bad.json()["message"]


# -- history ----------------------------------------------------------------------------------


def test_history_answers_page_and_items_with_execution_time(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
    make_client: Callable[..., Any],
) -> None:
    emu = make_emulator(latency_s=0.1)
    http = make_http(emu)
    image = upload_sample(http)
    ids = [submit(http, image, seed=s).json()["data"]["id"] for s in range(3)]
    for task_id in ids:
        wait_status(http, task_id, {"completed"})
    data = http.post("/api/v3/predictions", json={}).json()["data"]
    assert data["page"] == 1 and data["page_size"] == 100
    assert {i["id"] for i in data["items"]} == set(ids)
    assert all(
        isinstance(i["executionTime"], int) and i["executionTime"] > 0 for i in data["items"]
    )
    capped = http.post("/api/v3/predictions", json={"page_size": 500}).json()["data"]
    assert capped["page_size"] == 100
    bad = http.post("/api/v3/predictions", json={"page_size": 0})
    assert bad.status_code == 400 and "page_size" in bad.json()["message"]
    page = make_client(emu).history(page_size=2)  # the project's own client still reads it
    assert len(page.items) == 2 and page.total == 3


def test_history_lists_only_the_recent_window(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.1, history_window_s=0.5)
    http = make_http(emu)
    old = submit(http, upload_sample(http)).json()["data"]["id"]
    time.sleep(0.6)
    data = http.post("/api/v3/predictions", json={}).json()["data"]
    assert data["items"] == []
    # Still there by id: the window is a history limit, not a deletion.
    assert http.get(f"/api/v3/predictions/{old}/result").status_code == 200


def test_history_window_defaults_to_seven_days() -> None:
    assert EmulatorConfig(api_key="k").history_window_s == 7 * 24 * 3600


# -- render once ----------------------------------------------------------------------------


@pytest.mark.parametrize(("render_once", "renders"), [(True, 1), (False, 2)])
def test_render_once_renders_each_distinct_input_once(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
    render_once: bool,
    renders: int,
) -> None:
    emu = make_emulator(latency_s=0.1, render_once=render_once)
    http = make_http(emu)
    image = upload_sample(http)
    ids = [submit(http, image, seed=9).json()["data"]["id"] for _ in range(2)]
    urls = [wait_status(http, i, {"completed"})["outputs"][0] for i in ids]
    videos = [httpx.get(u, timeout=10).content for u in urls]
    assert videos[0] == videos[1]  # the seed is fixed, so the bytes are equal either way
    assert emu.stats()["renders"] == renders
    if render_once:  # a different input is rendered anew
        other = submit(http, image, seed=10).json()["data"]["id"]
        wait_status(http, other, {"completed"})
        assert emu.stats()["renders"] == 2


def test_a_task_ends_on_its_latency_while_renders_are_backed_up(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The emulated inference time is the timer's: renders (CPU-bound, two at a time) that
    back up must not hold back the input checks that decide each task's end. They shared one
    pool, so with 1,000 distinct inputs on a loaded machine the last tasks ended minutes after
    their latency and their waits polled twenty times each."""
    from wan_tasks.emulator import engine

    held = threading.Event()
    real = engine.render_i2v

    def slow_render(*args: Any, **kwargs: Any) -> bytes:
        held.wait(60)  # a render backlog: every render worker busy until released
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "render_i2v", slow_render)
    emu = make_emulator(latency_s=0.1, concurrency=10)
    http = make_http(emu)
    image = upload_sample(http)
    try:
        ids = [submit(http, image, seed=s).json()["data"]["id"] for s in range(5)]
        ends = [wait_status(http, i, {"completed", "failed"}, limit_s=30)["status"] for i in ids]
        assert ends == ["completed"] * 5  # all ended while no render had finished
        assert emu.stats()["renders"] >= 1 and not held.is_set()
    finally:
        held.set()
    # The download still waits for (and gets) the rendered bytes.
    url = wait_status(http, ids[-1], {"completed"})["outputs"][0]
    assert probe_mp4(httpx.get(url, timeout=30).content).width == 832
