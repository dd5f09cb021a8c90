"""WaveSpeed webhook signatures: our own test vectors, and a real delivery from the emulator."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import SAMPLE
from wan_tasks import I2VRequest
from wan_tasks.api.webhooks import ReplayGuard, sign, verify
from wan_tasks.errors import WebhookVerificationError

SECRET = "whsec_test-secret-1"
BODY = b'{"id":"abc","status":"completed","outputs":["https://cdn/x.mp4"]}'
NOW = 1_780_000_000


def headers(body: bytes = BODY, *, ts: int = NOW, wid: str = "msg_1",
            secret: str = SECRET) -> dict[str, str]:
    return {"webhook-id": wid, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, wid, ts, body)}


def test_vector_matches_an_independent_computation() -> None:
    # The key is the secret minus "whsec_", as UTF-8 text, NOT base64-decoded.
    expected = hmac.new(b"test-secret-1", b"msg_1.1780000000." + BODY, hashlib.sha256).hexdigest()
    assert headers()["webhook-signature"] == f"v3,{expected}"


def test_valid_webhook_is_accepted() -> None:
    assert verify(SECRET, headers(), BODY, now=NOW + 10)["status"] == "completed"


@pytest.mark.parametrize(
    ("case", "hdrs", "body", "message"),
    [
        ("forged signature", {**headers(), "webhook-signature": "v3," + "0" * 64}, BODY,
         "does not match"),
        ("wrong secret", headers(secret="whsec_other"), BODY, "does not match"),
        ("tampered body", headers(), BODY.replace(b"completed", b"failed"), "does not match"),
        ("stale timestamp", headers(ts=NOW - 301), BODY, "stale"),
        ("future timestamp", headers(ts=NOW + 301), BODY, "stale"),
        ("missing header", {"webhook-id": "m", "webhook-timestamp": str(NOW)}, BODY, "missing"),
        ("timestamp not a number", {**headers(), "webhook-timestamp": "soon"}, BODY,
         "not an integer"),
        ("standard-webhooks key handling", {
            "webhook-id": "msg_1", "webhook-timestamp": str(NOW),
            # Standard Webhooks base64-decodes the key; WaveSpeed does not.
            "webhook-signature": "v3," + hmac.new(b"\xb5\xeb-\xb5\xeb\xad\xb9\xea\xdc\xd4",
                                                  b"msg_1.1780000000." + BODY,
                                                  hashlib.sha256).hexdigest()}, BODY,
         "does not match"),
    ],
)
def test_rejections(case: str, hdrs: dict[str, str], body: bytes, message: str) -> None:
    with pytest.raises(WebhookVerificationError, match=message):
        verify(SECRET, hdrs, body, now=NOW)


def test_replay_is_rejected() -> None:
    guard = ReplayGuard()
    verify(SECRET, headers(), BODY, now=NOW, replay_guard=guard)
    with pytest.raises(WebhookVerificationError, match="replay"):
        verify(SECRET, headers(), BODY, now=NOW + 1, replay_guard=guard)
    verify(SECRET, headers(wid="msg_2"), BODY, now=NOW + 1, replay_guard=guard)


class _Receiver:
    def __init__(self, secret: str) -> None:
        self.received: list[dict[str, Any]] = []
        self.rejected = 0
        self.event = threading.Event()
        guard = ReplayGuard()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    outer.received.append(verify(secret, dict(self.headers), body,
                                                 replay_guard=guard))
                    self.send_response(204)
                except WebhookVerificationError:
                    outer.rejected += 1
                    self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer.event.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Callable[[str], _Receiver]]:
    made: list[_Receiver] = []

    def make(secret: str) -> _Receiver:
        made.append(_Receiver(secret))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()
        r.server.server_close()


def test_emulator_delivers_signed_webhooks(make_emulator: Callable[..., Any], make_client:
                                           Callable[..., Any], receiver: Any) -> None:
    emu = make_emulator()
    client = make_client(emu)
    import httpx

    secret = httpx.get(f"{emu.base_url}/api/v3/webhook/secret", timeout=5,
                       headers={"Authorization": f"Bearer {emu.api_key}"}).json()["data"]["secret"]
    assert secret.startswith("whsec_")
    good = receiver(secret)
    sub = client.submit(I2VRequest(image=str(SAMPLE), prompt="p", seed=1), webhook=good.url)
    assert good.event.wait(15), "no webhook arrived"
    body = good.received[0]
    assert body["id"] == sub.prediction.id and body["status"] == "completed"
    assert body["input"]["seed"] == 1 and "executionTime" in body and body["outputs"]
    deadline = time.monotonic() + 5
    while emu.stats()["webhooks_sent"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.stats()["webhooks_sent"] == 1

    # A receiver with the wrong secret refuses every attempt; the emulator retries.
    bad = receiver("whsec_wrong")
    client.submit(I2VRequest(image=str(SAMPLE), prompt="p", seed=2), webhook=bad.url)
    assert bad.event.wait(15)
    assert bad.rejected >= 1 and not bad.received
    json.dumps(body)  # the payload is plain JSON
