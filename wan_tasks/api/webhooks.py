"""WaveSpeed's webhook signatures: signing (for the emulator) and verification (for receivers).

WaveSpeed's scheme is NOT Standard Webhooks: the HMAC key is the secret with its `whsec_`
prefix removed, used as UTF-8 text (not base64-decoded). The signed message is
`{webhook-id}.{webhook-timestamp}.{raw body}` and the header is `v3,<hex sha256>`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from wan_tasks.errors import WebhookVerificationError

SIGNATURE_VERSION = "v3"
DEFAULT_TOLERANCE_S = 300


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
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
    replay_guard: ReplayGuard | None = None,
) -> dict[str, Any]:
    """Check a delivered webhook and return its parsed body.

    Rejects a missing or wrong signature, a timestamp outside `tolerance_s` of now, and (with a
    `replay_guard`) a webhook-id already accepted. Header names are matched case-insensitively.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id = lower.get("webhook-id", "")
    raw_ts = lower.get("webhook-timestamp", "")
    signatures = lower.get("webhook-signature", "")
    if not webhook_id or not raw_ts or not signatures:
        raise WebhookVerificationError(
            "webhook is missing webhook-id, webhook-timestamp or webhook-signature header"
        )
    try:
        timestamp = int(raw_ts)
    except ValueError as exc:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from exc
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp is {current - timestamp:.0f}s away from now "
            f"(tolerance {tolerance_s:.0f}s): stale or replayed"
        )
    expected = sign(secret, webhook_id, timestamp, body)
    # The header may carry several space-separated signatures (key rotation).
    if not any(hmac.compare_digest(expected, s) for s in signatures.split()):
        raise WebhookVerificationError("webhook-signature does not match: forged or wrong secret")
    if replay_guard is not None and not replay_guard.check_and_remember(webhook_id, current):
        raise WebhookVerificationError(f"webhook-id {webhook_id} was already accepted: replay")
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise WebhookVerificationError("webhook body is not JSON") from exc
    if not isinstance(parsed, dict):
        raise WebhookVerificationError("webhook body is not a JSON object")
    return parsed
