"""Where the client's key and base URL come from: arguments, then the environment."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import SecretStr

from wan_tasks.api.text import char_class, quote_value
from wan_tasks.errors import ConfigurationError

DEFAULT_BASE_URL = "https://api.wavespeed.ai"
ENV_API_KEY = "WAVESPEED_API_KEY"
ENV_BASE_URL = "WAVESPEED_BASE_URL"


def resolve_api_key(api_key: SecretStr | str | None) -> SecretStr:
    if isinstance(api_key, SecretStr):
        value = api_key.get_secret_value()
    else:
        value = api_key if api_key is not None else os.environ.get(ENV_API_KEY, "")
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
    url = (base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{ENV_BASE_URL}/base_url must be an http(s) URL, got {quote_value(url)}"
        )
    return url
