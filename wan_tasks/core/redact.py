"""Scrub credentials out of what gets stored: manifests, Prefect results, artifacts.

Input image URLs may be presigned (S3, GCS, CDN tokens). The service needs them verbatim, but a
copy in a manifest would hand out access for the URL's lifetime, so stored copies drop the query
parameters that carry signatures or tokens.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_PARAMS = (
    "signature", "sig", "token", "key", "secret", "password", "credential", "auth",
    "x-amz-security-token", "x-goog-signature", "se", "sp", "sv",
)
REDACTED = "REDACTED"


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_PARAMS[:8]) or lowered in _SECRET_PARAMS


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
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


def redact_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy of a request body with every URL-valued string scrubbed."""
    def scrub(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(("http://", "https://")):
            return redact_url(value)
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    result: dict[str, Any] = scrub(payload)
    return result
