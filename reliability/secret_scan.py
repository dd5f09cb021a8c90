"""Search what a run left behind for secrets, decoding what Prefect stores.

Prefect persists task results as JSON records whose `result` is a base64-encoded (sometimes
compressed) pickle: a secret inside a result is invisible to a search of the raw bytes. The
scan therefore looks at every file as it is and at every base64 string inside JSON it holds
(decompressed when it is zlib or gzip), and reports the file and what was found. Needles are
exact byte strings (an API key) or patterns (a signed URL's live signature).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

Needle = bytes | re.Pattern[bytes]
_BASE64 = re.compile(rb"^[A-Za-z0-9+/=_-]{16,}$")
# A live signature of a signed output URL (the emulator's CDN style, `signed_outputs`), not
# scrubbed: REDACTED values do not match. (The archive's own presigned S3 links in artifacts
# are links for people, by design, and are not this.)
OUTPUT_SIGNATURE = re.compile(rb"Expires=\d+&Signature=[0-9a-f]{64}")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _decoded(blob: bytes) -> Iterator[bytes]:
    """The blob, and whatever base64 / zlib / gzip it carries (one level of each)."""
    yield blob
    candidates: list[bytes] = []
    try:
        parsed = json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if parsed is not None:
        texts = ["".join(s.split()).encode() for s in _strings(parsed)]
        candidates = [s for s in texts if _BASE64.match(s)]
    elif _BASE64.match(blob.strip()):
        candidates = [blob.strip()]
    for text in candidates:
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(text + b"=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                continue
            yield raw
            for inflate in (zlib.decompress, gzip.decompress):
                try:
                    inflated = inflate(raw)
                except (zlib.error, OSError, EOFError):
                    continue
                yield inflated
            break


def found_in(blob: bytes, needles: Sequence[Needle], *, decode: bool = True) -> list[str]:
    """Which needles the blob holds (in itself or, with `decode`, in what it encodes)."""
    views = list(_decoded(blob)) if decode else [blob]
    hits = []
    for needle in needles:
        for view in views:
            if isinstance(needle, bytes):
                if needle in view:
                    hits.append(f"{needle[:6]!r}...")
                    break
            elif needle.search(view):
                hits.append(f"/{needle.pattern[:30]!r}/")
                break
    return hits


def scan_tree(root: Path, needles: Sequence[Needle], *, decode: bool = True) -> list[str]:
    """`path: needle` for every file under `root` that holds a needle."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            hits += [f"{path}: {h}" for h in found_in(path.read_bytes(), needles, decode=decode)]
    return hits


__all__ = ["OUTPUT_SIGNATURE", "Needle", "found_in", "scan_tree"]
