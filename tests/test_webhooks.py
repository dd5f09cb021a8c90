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


def headers(
    body: bytes = BODY, *, ts: int = NOW, wid: str = "msg_1", secret: str = SECRET
) -> dict[str, str]:
    return {
        "webhook-id": wid,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(secret, wid, ts, body),
    }


def test_vector_matches_an_independent_computation() -> None:
    # The key is the secret minus "whsec_", as UTF-8 text, NOT base64-decoded.
    expected = hmac.new(b"test-secret-1", b"msg_1.1780000000." + BODY, hashlib.sha256).hexdigest()
    assert headers()["webhook-signature"] == f"v3,{expected}"


def test_valid_webhook_is_accepted() -> None:
    assert verify(SECRET, headers(), BODY, now=NOW + 10)["status"] == "completed"


@pytest.mark.parametrize(
    ("case", "hdrs", "body", "message"),
    [
        (
            "forged signature",
            {**headers(), "webhook-signature": "v3," + "0" * 64},
            BODY,
            "does not match",
        ),
        ("wrong secret", headers(secret="whsec_other"), BODY, "does not match"),
        ("tampered body", headers(), BODY.replace(b"completed", b"failed"), "does not match"),
        ("stale timestamp", headers(ts=NOW - 301), BODY, "stale"),
        ("future timestamp", headers(ts=NOW + 301), BODY, "stale"),
        ("missing header", {"webhook-id": "m", "webhook-timestamp": str(NOW)}, BODY, "missing"),
        (
            "timestamp not a number",
            {**headers(), "webhook-timestamp": "soon"},
            BODY,
            "not an integer",
        ),
        (
            "standard-webhooks key handling",
            {
                "webhook-id": "msg_1",
                "webhook-timestamp": str(NOW),
                # Standard Webhooks base64-decodes the key; WaveSpeed does not.
                "webhook-signature": "v3,"
                + hmac.new(
                    b"\xb5\xeb-\xb5\xeb\xad\xb9\xea\xdc\xd4",
                    b"msg_1.1780000000." + BODY,
                    hashlib.sha256,
                ).hexdigest(),
            },
            BODY,
            "does not match",
        ),
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
                    outer.received.append(
                        verify(secret, dict(self.headers), body, replay_guard=guard)
                    )
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


def test_emulator_delivers_signed_webhooks(
    make_emulator: Callable[..., Any], make_client: Callable[..., Any], receiver: Any
) -> None:
    emu = make_emulator()
    client = make_client(emu)
    import httpx

    secret = httpx.get(
        f"{emu.base_url}/api/v3/webhook/secret",
        timeout=5,
        headers={"Authorization": f"Bearer {emu.api_key}"},
    ).json()["data"]["secret"]
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


def _hostile() -> list[tuple[str, Any, Any]]:
    good = headers()
    return [
        ("non-ASCII signature", {**good, "webhook-signature": "v3,é" + "0" * 63}, BODY),
        ("non-ASCII id", {**good, "webhook-id": "msg_\u200b1"}, BODY),
        ("400-digit timestamp", {**good, "webhook-timestamp": "9" * 400}, BODY),
        ("negative timestamp", {**good, "webhook-timestamp": str(-NOW)}, BODY),
        ("float timestamp", {**good, "webhook-timestamp": f"{NOW}.5"}, BODY),
        ("exponent timestamp", {**good, "webhook-timestamp": "1.78e9"}, BODY),
        ("non-ASCII digits", {**good, "webhook-timestamp": "١٧٨٠٠٠٠٠٠٠"}, BODY),
        ("timestamp with newline", {**good, "webhook-timestamp": f"{NOW}\n"}, BODY),
        ("empty headers", {}, BODY),
        ("headers not a mapping", 42, BODY),
        ("header value not text", {**good, "webhook-id": 7}, BODY),
        (
            "bytes header not ASCII",
            {b"webhook-id": b"\xff", b"webhook-timestamp": b"1", b"webhook-signature": b"v3,0"},
            BODY,
        ),
        ("huge id", {**good, "webhook-id": "m" * 100_000}, BODY),
        ("huge signature header", {**good, "webhook-signature": "v3,0 " * 100_000}, BODY),
        ("conflicting duplicate headers", {**good, "Webhook-Id": "msg_2"}, BODY),
        ("body not bytes", good, 12345),
        ("body a dict", good, {"id": "abc"}),
        ("body with lone surrogate", good, "\ud800"),
    ]


@pytest.mark.parametrize(("case", "hdrs", "body"), _hostile(), ids=[h[0] for h in _hostile()])
def test_every_malformed_input_is_a_verification_error(case: str, hdrs: Any, body: Any) -> None:
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, hdrs, body, now=NOW)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"[1, 2]"],
    ids=["nested 100000 deep", "5000-digit integer", "not UTF-8", "not an object"],
)
def test_signed_but_malformed_body_is_a_verification_error(body: bytes) -> None:
    with pytest.raises(WebhookVerificationError, match="body"):
        verify(SECRET, headers(body), body, now=NOW)


def test_bytes_headers_str_body_and_pair_lists_are_accepted() -> None:
    raw = {k.encode(): v.encode() for k, v in headers().items()}
    assert verify(SECRET, raw, BODY, now=NOW)["id"] == "abc"
    assert verify(SECRET, list(raw.items()), BODY.decode(), now=NOW)["id"] == "abc"
    assert verify(SECRET, headers(), bytearray(BODY), now=NOW)["id"] == "abc"


def test_replay_error_does_not_echo_a_hostile_id() -> None:
    guard = ReplayGuard()
    wid = "msg_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"
    verify(SECRET, headers(wid=wid), BODY, now=NOW, replay_guard=guard)
    with pytest.raises(WebhookVerificationError, match="replay") as caught:
        verify(SECRET, headers(wid=wid), BODY, now=NOW, replay_guard=guard)
    assert wid not in str(caught.value)
