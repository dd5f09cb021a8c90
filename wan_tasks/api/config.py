"""Where the client's key and base URL come from: arguments, then the settings (the
environment, or an active `wan_tasks.settings.override`)."""

from __future__ import annotations

import hashlib
from urllib.parse import urlsplit

from pydantic import SecretStr

from wan_tasks import settings
from wan_tasks.api.text import char_class, quote_value
from wan_tasks.errors import ConfigurationError
from wan_tasks.settings import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "resolve_api_key",
    "resolve_base_url",
    "service_fingerprint",
]


def resolve_api_key(api_key: SecretStr | str | None) -> SecretStr:
    if isinstance(api_key, SecretStr):
        value = api_key.get_secret_value()
    else:
        configured = settings.current().api_key
        value = (
            api_key
            if api_key is not None
            else (configured.get_secret_value() if configured else "")
        )
    value = value.strip()
    if not value:
        raise ConfigurationError(
            f"No WaveSpeed API key: set {ENV_API_KEY}, pass api_key=, or use a "
            "WaveSpeedCredentials block. (Without a key, `wan-video` uses the local emulator.)"
        )
    check_api_key_chars(value)
    return SecretStr(value)


def check_api_key_chars(value: str) -> None:
    """Refuse a key with any character outside printable ASCII (a zero-width space pasted
    with it, say): httpx would fail on the header with an error whose text carries the whole
    `Bearer <key>`. The error names the position and kind, never the key or the character."""
    for position, ch in enumerate(value, start=1):
        if not ("!" <= ch <= "~"):
            raise ConfigurationError(
                f"The WaveSpeed API key has {char_class(ch)} at position {position} of "
                f"{len(value)}; an API key is printable ASCII only. Copy it again."
            )


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or settings.current().base_url or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{ENV_BASE_URL}/base_url must be an http(s) URL, got {quote_value(url)}"
        )
    return url


def service_fingerprint(base_url: str, api_key: SecretStr) -> str:
    """Names one service and account: the base URL and a one-way, domain-separated hash of
    the key. Safe to store and log; the key cannot be recovered from it.

    A loopback URL's port is left out: a local emulator listens on a new port each time it
    starts, and the same emulator key on this machine is the same (free) account."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    if host == "localhost" or host == "::1" or host.startswith("127."):
        base_url = f"{parts.scheme}://{host}"
    text = f"wan-tasks-service-v1\0{base_url}\0{api_key.get_secret_value()}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]
