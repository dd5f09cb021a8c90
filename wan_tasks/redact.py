"""Scrub credentials out of what gets stored or shown: error messages, ledger rows, sidecars,
Prefect results, summaries, artifacts.

Input image URLs and output URLs may be presigned (S3, GCS, a CDN's tokens). The service needs
them verbatim, but a stored copy would hand out access for the URL's lifetime, so stored and
shown copies drop the query parameters that carry signatures or tokens (and any user:password in
the host part). Every error of the package passes its message through `redact_text`, so a URL
or an `Authorization: Bearer ...` value quoted into an error never reaches a log, a Prefect
state or a report.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARTS = (
    "signature",
    "sig",
    "token",
    "key",
    "secret",
    "password",
    "credential",
    "auth",
    "policy",
)
_SECRET_NAMES = frozenset(
    {
        "x-amz-security-token",
        "x-goog-signature",
        "se",
        "sp",
        "sv",
        "expires",
        "x-amz-date",
        "x-amz-expires",
        "st",
        "hmac",
        "hdnts",
    }
)
REDACTED = "REDACTED"

# A URL anywhere in a text, whatever the case of its scheme, up to white space or a quote.
_URL_IN_TEXT = re.compile(r"(?i)\bhttps?://[^\s'\"<>]+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\"]+")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(part in lowered for part in _SECRET_PARTS)


def redact_url(url: str) -> str:
    """The URL with user:password and secret-looking query values replaced by REDACTED."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED  # not even parseable: quote none of it
    if parts.scheme.lower() not in ("http", "https"):
        return url
    netloc = parts.netloc
    if "@" in netloc:  # user:password@host
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    if not parts.query and netloc == parts.netloc:
        return url
    query = urlencode(
        [(k, REDACTED if _is_secret(k) else v) for k, v in parse_qsl(parts.query, True)],
        safe=REDACTED,
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text with every URL in it redacted and bearer tokens removed."""
    if "://" not in text and "earer" not in text:
        return text
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def redact_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a JSON-like value with every URL-valued string redacted."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str) and _URL_IN_TEXT.match(value):
            return redact_url(value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    result: dict[str, Any] = scrub(payload)
    return result


def is_redacted(url: str) -> bool:
    """Whether a stored URL lost its signature (and must be fetched afresh to be used)."""
    return REDACTED in url


__all__ = ["REDACTED", "is_redacted", "redact_payload", "redact_text", "redact_url"]
