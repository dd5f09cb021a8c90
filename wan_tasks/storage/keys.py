"""Object keys for archived videos: templates, and sanitising what goes into them.

The default layout is by date and prediction id:

    {prefix}/{model_slug}/{date}/{prediction_id}.mp4   (+ .json sidecar manifest)

A prediction id is unique per paid job, so one paid video maps to exactly one object, and the
key is known before anything is downloaded: a re-run sees the object is there and downloads
nothing. `{sha256}` is available for content-addressed layouts (the key is then known only after
the download, and a 412 on the conditional write means "already archived").
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import datetime

from wan_tasks.errors import KeyTemplateError

DEFAULT_TEMPLATE = "{prefix}/{model_slug}/{date}/{prediction_id}.mp4"
CONTENT_ADDRESSED_TEMPLATE = "{prefix}/sha256/{sha256}.mp4"
FIELDS = frozenset(
    {"prefix", "model_slug", "date", "prediction_id", "seed", "sha256", "item_id", "duration"}
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]+")
MAX_KEY_BYTES = 1024


@dataclass(frozen=True)
class KeyFields:
    prediction_id: str
    model: str
    created_at: datetime
    seed: int
    duration: int
    prefix: str = "wan-videos"
    item_id: str = ""
    sha256: str | None = None


def sanitise_segment(value: str) -> str:
    """One path segment: only [A-Za-z0-9._=-]; never '.', '..' or empty."""
    cleaned = _UNSAFE.sub("-", value).strip("-.")
    return cleaned[:200] or "_"


def sanitise_prefix(prefix: str) -> str:
    parts = [sanitise_segment(p) for p in prefix.replace("\\", "/").split("/") if p.strip()]
    return "/".join(p for p in parts if p != "_")


def validate_template(template: str) -> frozenset[str]:
    """Check a template before any money is spent; return the fields it uses."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise KeyTemplateError(f"key_template {template!r}: {exc}") from exc
    if template.startswith("/") or any(p in (".", "..") for p in template.split("/")):
        raise KeyTemplateError(f"key_template {template!r}: no absolute paths or '..' segments")
    if "\\" in template or any(ord(c) < 32 for c in template):
        raise KeyTemplateError(f"key_template {template!r}: no backslashes or control characters")
    used: set[str] = set()
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS or spec or conversion:
            raise KeyTemplateError(
                f"key_template {template!r}: unknown field {{{field}}}; "
                f"use {', '.join(sorted('{' + f + '}' for f in FIELDS))}"
            )
        used.add(field)
    if not used & {"prediction_id", "sha256"}:
        raise KeyTemplateError(
            f"key_template {template!r} must contain {{prediction_id}} or {{sha256}}, "
            "or different videos would overwrite each other"
        )
    if not template.endswith(".mp4"):
        raise KeyTemplateError(f"key_template {template!r} must end with .mp4")
    return frozenset(used)


def render_key(template: str, fields: KeyFields) -> str:
    used = validate_template(template)
    if "sha256" in used and not fields.sha256:
        raise KeyTemplateError("key_template uses {sha256}, known only after the download")
    values = {
        "prefix": sanitise_prefix(fields.prefix),
        "model_slug": sanitise_segment(fields.model.replace("/", "-")),
        "date": fields.created_at.strftime("%Y/%m/%d"),
        "prediction_id": sanitise_segment(fields.prediction_id),
        "seed": str(fields.seed),
        "duration": f"{fields.duration}s",
        "item_id": sanitise_segment(fields.item_id) if fields.item_id else "_",
        "sha256": sanitise_segment(fields.sha256 or ""),
    }
    key = template.format(**values)
    # An empty prefix must not leave a leading or doubled slash.
    key = "/".join(part for part in key.split("/") if part)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise KeyTemplateError(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:80]}...")
    return key
