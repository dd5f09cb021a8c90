"""Every documented status and task code, and the odd shapes a real service may send, on
demand from the emulator's fault plan; and answers to broken request framing (issue 14.10)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from tests.conftest import SAMPLE
from wan_tasks.api.models import MODEL_ID
from wan_tasks.emulator import Emulator, FaultPlan

MakeEmu = Callable[..., Emulator]
DOCUMENTED_CODES = (1200, 1400, 1401, 1402, 1403, 1405, 5000, 5003, 5004)


def submit(http: httpx.Client, **extra: Any) -> httpx.Response:
    image = http.post(
        "/api/v3/media/upload/binary", files={"file": ("in.png", SAMPLE.read_bytes(), "image/png")}
    )
    url = image.json()["data"]["download_url"]
    return http.post(f"/api/v3/{MODEL_ID}", json={"image": url, "prompt": "x", **extra})


def final(http: httpx.Client, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        data: dict[str, Any] = http.get(f"/api/v3/predictions/{task_id}/result").json()["data"]
        if data["status"] not in ("created", "processing") or time.monotonic() > deadline:
            return data
        time.sleep(0.05)


@pytest.mark.parametrize("code", DOCUMENTED_CODES)
def test_every_documented_task_code_on_demand(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
    code: int,
) -> None:
    emu = make_emulator(latency_s=0.05, faults={"script": {"submit": [f"fail:{code}"]}})
    http = make_http(emu)
    data = final(http, submit(http).json()["data"]["id"])
    assert (data["status"], data["code"]) == ("failed", code)
    assert data["error"]


@pytest.mark.parametrize(("status", "code"), [("cancelled", None), ("timeout", 5004)])
def test_cancelled_and_timeout_statuses_on_demand(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
    status: str,
    code: int | None,
) -> None:
    emu = make_emulator(latency_s=0.05, faults={"script": {"submit": [f"end:{status}"]}})
    http = make_http(emu)
    data = final(http, submit(http).json()["data"]["id"])
    assert data["status"] == status and data.get("code") == code and data["outputs"] == []
    assert emu.stats()["in_flight"] == 0


def test_one_answer_with_an_unknown_status_then_the_real_one(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(
        latency_s=0.05, faults={"script": {"result": ["status=pending", "status=queued"]}}
    )
    http = make_http(emu)
    task_id = submit(http).json()["data"]["id"]
    seen = [
        http.get(f"/api/v3/predictions/{task_id}/result").json()["data"]["status"] for _ in range(2)
    ]
    assert seen == ["pending", "queued"]
    assert final(http, task_id)["status"] == "completed"


def test_status_alias_renames_statuses_on_every_answer(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=60, faults={"status_alias": {"processing": "queued"}})
    http = make_http(emu)
    task_id = submit(http).json()["data"]["id"]
    deadline = time.monotonic() + 30
    while emu._server.engine.tasks[task_id].status != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert http.get(f"/api/v3/predictions/{task_id}/result").json()["data"]["status"] == "queued"
    history = http.post("/api/v3/predictions", json={}).json()["data"]["items"]
    assert [i["status"] for i in history] == ["queued"]


def test_persistent_shapes_nanoseconds_extra_fields_code_zero_execution_time(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(
        latency_s=0.05, faults={"shapes": ["nanos", "extra_fields", "code0", "execution_time"]}
    )
    http = make_http(emu)
    task_id = submit(http).json()["data"]["id"]
    final(http, task_id)
    body = http.get(f"/api/v3/predictions/{task_id}/result").json()
    data = body["data"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", data["created_at"])
    assert data["code"] == 0 and data["status"] == "completed"
    assert isinstance(data["executionTime"], int)
    assert "future_field" in data and "trace_id" in body


def test_one_shot_shape_touches_one_answer(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(latency_s=0.05, faults={"script": {"result": ["shape:nanos"]}})
    http = make_http(emu)
    task_id = submit(http).json()["data"]["id"]
    first, second = (
        http.get(f"/api/v3/predictions/{task_id}/result").json()["data"] for _ in range(2)
    )
    assert len(first["created_at"]) == len(second["created_at"]) + 6


def test_error_body_with_message_and_error_code(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(faults={"script": {"submit": ["error_code:400"]}})
    http = make_http(emu)
    r = submit(http)
    assert r.status_code == 400
    body = r.json()
    assert body["error_code"] == "E400" and body["message"] and body["data"] is None
    assert emu.stats()["submissions"] == 0


def test_http_200_carrying_an_error_code_in_the_envelope(
    make_emulator: MakeEmu,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    emu = make_emulator(faults={"script": {"submit": ["envelope_error:500"]}})
    http = make_http(emu)
    r = submit(http)
    assert r.status_code == 200
    assert r.json()["code"] == 500 and r.json()["data"] is None
    assert emu.stats()["submissions"] == 0


@pytest.mark.parametrize(
    "script",
    [
        {"submit": ["bogus"]},
        {"result": ["shape:round"]},
        {"submit": ["fail:abc"]},
        {"submit": ["end:later"]},
    ],
)
def test_unknown_fault_kinds_are_refused_naming_the_entry(script: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="script"):
        FaultPlan.model_validate({"script": script})


def test_faults_endpoint_takes_the_new_kinds(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    http = make_http(emulator)
    ok = httpx.post(
        f"{emulator.base_url}/_emulator/faults",
        json={"script": {"result": ["status=pending"]}, "shapes": ["nanos"]},
    )
    assert ok.status_code == 200
    bad = httpx.post(f"{emulator.base_url}/_emulator/faults", json={"shapes": ["square"]})
    assert bad.status_code == 400 and "shapes" in bad.json()["message"]
    assert http.get("/api/v3/balance").status_code == 200


# -- issue 14 point 10: broken framing answers at once ---------------------------------------


def raw_request(emu: Emulator, head: str, body: bytes = b"") -> str:
    """Send raw bytes; return the status line (the socket times out if nothing answers)."""
    host, port = emu.base_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = sock.recv(65536).decode(errors="replace")
    return answer.split("\r\n", 1)[0]


@pytest.mark.parametrize(("length", "status"), [("-1", "400"), ("abc", "400"), ("1048577", "413")])
def test_bad_content_length_answers_at_once(
    make_emulator: MakeEmu,
    length: str,
    status: str,
) -> None:
    emu = make_emulator(max_body_bytes=1024 * 1024)
    head = (
        f"POST /api/v3/{MODEL_ID} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {emu.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n"
    )
    assert raw_request(emu, head).split(" ")[1] == status
    assert emu.stats()["submissions"] == 0


def test_chunked_body_is_read(emulator: Emulator) -> None:
    body = b'{"page": 1}'
    head = (
        f"POST /api/v3/predictions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {emulator.api_key}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n"
    )
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    assert raw_request(emulator, head, chunked).split(" ")[1] == "200"


def test_unknown_prediction_is_not_found(
    emulator: Emulator,
    make_http: Callable[[Emulator], httpx.Client],
) -> None:
    r = make_http(emulator).get(f"/api/v3/predictions/{'0' * 32}/result")
    assert r.status_code == 404 and "not found" in r.json()["message"]
