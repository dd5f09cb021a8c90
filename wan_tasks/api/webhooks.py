"""WaveSpeed's webhook signatures: signing (for the emulator) and verification (for receivers).

WaveSpeed's scheme is NOT Standard Webhooks: the HMAC key is the secret with its `whsec_`
prefix removed, used as UTF-8 text (not base64-decoded). The signed message is
`{webhook-id}.{webhook-timestamp}.{raw body}` and the header is `v3,<hex sha256>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

from wan_tasks.api.text import quote_value
from wan_tasks.errors import WebhookVerificationError

SIGNATURE_VERSION = "v3"
DEFAULT_TOLERANCE_S = 300
_WEBHOOK_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})
# Unix seconds without sign, fraction or exponent: 12 digits reach the year 33658, while a
# 400-digit value would overflow the float arithmetic of the tolerance check.
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAX_HEADER = 256
_MAX_SIGNATURES = 8
_MAX_SIGNATURE_HEADER = _MAX_SIGNATURES * 72


def _key(secret: str) -> bytes:
    return secret.removeprefix("whsec_").encode("utf-8")


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for a body."""
    message = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), message, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION},{digest}"


class ReplayGuard:
    """Remembers webhook ids seen within the tolerance window (thread-safe, bounded by time)."""

    def __init__(self, window_s: float = DEFAULT_TOLERANCE_S) -> None:
        self._window = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check_and_remember(self, webhook_id: str, now: float) -> bool:
        """True if new; False if this id was already accepted."""
        with self._lock:
            horizon = now - 2 * self._window
            for key in [k for k, t in self._seen.items() if t < horizon]:
                del self._seen[key]
            if webhook_id in self._seen:
                return False
            self._seen[webhook_id] = now
            return True


def verify(
    secret: str,
    headers: Mapping[str, str] | Mapping[bytes, bytes] | Any,
    body: bytes | bytearray | memoryview | str,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    replay_guard: ReplayGuard | None = None,
) -> dict[str, Any]:
    """Check a delivered webhook and return its parsed body.

    Rejects a missing or wrong signature, a timestamp outside `tolerance_s` of now, and (with a
    `replay_guard`) a webhook-id already accepted. Header names are matched case-insensitively;
    names and values may be str or bytes (as ASGI servers give them). Every malformed input
    (odd types, non-ASCII or oversized headers, a timestamp that is not a plain integer, a body
    that is not a JSON object) raises WebhookVerificationError, never another exception.
    """
    lower = _header_map(headers)
    webhook_id = lower.get("webhook-id", "")
    raw_ts = lower.get("webhook-timestamp", "")
    signatures = lower.get("webhook-signature", "")
    if not webhook_id or not raw_ts or not signatures:
        raise WebhookVerificationError(
            "webhook is missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    if not _TIMESTAMP.fullmatch(raw_ts):
        raise WebhookVerificationError(
            "webhook-timestamp is not an integer (Unix seconds, at most 12 digits)"
        )
    timestamp = int(raw_ts)
    raw_body = _body_bytes(body)
    current = time.time() if now is None else now
    if not math.isfinite(current) or abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:.0f}s away from now "
            f"(tolerance {tolerance_s:.0f}s): stale or replayed"
        )
    expected = sign(secret, webhook_id, timestamp, raw_body).encode("ascii")
    # The header may carry several space-separated signatures (key rotation). Compared as
    # bytes: compare_digest refuses non-ASCII str with a TypeError.
    candidates = signatures.split()[:_MAX_SIGNATURES]
    if not any(hmac.compare_digest(expected, s.encode("ascii")) for s in candidates):
        raise WebhookVerificationError("webhook-signature does not match: forged or wrong secret")
    if replay_guard is not None and not replay_guard.check_and_remember(webhook_id, current):
        raise WebhookVerificationError(
            f"webhook-id {quote_value(webhook_id)} was already accepted: replay"
        )
    try:
        parsed = json.loads(raw_body)
    except (ValueError, RecursionError) as exc:
        raise WebhookVerificationError(f"webhook body is not JSON ({type(exc).__name__})") from None
    if not isinstance(parsed, dict):
        raise WebhookVerificationError("webhook body is not a JSON object")
    return parsed


def _header_map(headers: Any) -> dict[str, str]:
    """The three webhook headers by lower-case name, as ASCII text, or a verification error."""
    if isinstance(headers, Mapping):
        pairs = list(headers.items())
    else:
        try:  # a list of (name, value) pairs, as ASGI scopes carry them
            pairs = [(name, value) for name, value in headers]
        except (TypeError, ValueError):
            raise WebhookVerificationError("webhook headers are not a mapping") from None
    found: dict[str, str] = {}
    for name, value in pairs:
        key = _ascii(name, "a header name").lower()
        if key not in _WEBHOOK_HEADERS:
            continue
        text = _ascii(value, key).strip()
        limit = _MAX_SIGNATURE_HEADER if key == "webhook-signature" else _MAX_HEADER
        if len(text) > limit:
            raise WebhookVerificationError(f"{key} header is longer than {limit} characters")
        if key in found and found[key] != text:
            raise WebhookVerificationError(f"{key} header is given twice with different values")
        found[key] = text
    return found


def _ascii(value: Any, what: str) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise WebhookVerificationError(f"{what} is not ASCII") from None
    elif isinstance(value, str):
        text = value
    else:
        raise WebhookVerificationError(f"{what} is not text")
    if not text.isascii() or not text.isprintable():
        raise WebhookVerificationError(f"{what} has non-ASCII or control characters")
    return text


def _body_bytes(body: Any) -> bytes:
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        # Frameworks that hand over text decoded the raw UTF-8 bytes; encoding restores them.
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError:
            raise WebhookVerificationError("webhook body is not valid UTF-8 text") from None
    raise WebhookVerificationError("webhook body must be the raw request bytes")
