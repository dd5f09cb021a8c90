"""What kind of file an upload is: from its declared type, its name, or its first bytes.

The service takes images, videos and audio (`type` image/video/audio in the upload answer). A
file sent without a usable content type (none, or `application/octet-stream`, as a `Blob`
without a type or a Python file object without a name gives) is classified from its magic
numbers, then from its filename's extension.
"""

from __future__ import annotations

import mimetypes
from typing import Literal

Kind = Literal["image", "video", "audio"]

IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "image/bmp",
        "image/tiff",
    }
)
VIDEO_TYPES = frozenset(
    {
        "video/mp4",
        "video/webm",
        "video/quicktime",
        "video/x-matroska",
        "video/x-msvideo",
        "video/mpeg",
    }
)
AUDIO_TYPES = frozenset(
    {
        "audio/mpeg",
        "audio/mp3",
        "audio/wav",
        "audio/x-wav",
        "audio/wave",
        "audio/ogg",
        "audio/flac",
        "audio/x-flac",
        "audio/mp4",
        "audio/x-m4a",
        "audio/aac",
        "audio/webm",
    }
)
UNTYPED = ("", "application/octet-stream", "binary/octet-stream")


def kind_of(content_type: str) -> Kind | None:
    """The upload kind of a supported content type; None if the service would refuse it."""
    if content_type in IMAGE_TYPES:
        return "image"
    if content_type in VIDEO_TYPES:
        return "video"
    if content_type in AUDIO_TYPES:
        return "audio"
    return None


def sniff(data: bytes) -> str | None:
    """The content type its magic numbers say, for the formats the service accepts."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "image/webp"
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"BM") and len(head) >= 14:
        return "image/bmp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio/mp4"
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video/webm" if b"webm" in head else "video/x-matroska"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"ID3") or head[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    return None


def guess(filename: str) -> str | None:
    """The content type the filename's extension suggests."""
    guessed = mimetypes.guess_type(filename)[0]
    return guessed if guessed and kind_of(guessed) else None


def resolve(declared: str | None, filename: str, data: bytes | None) -> str | None:
    """The content type to store: the declared one if it is a real type, else the bytes'
    magic numbers, else the extension. None if nothing points to a supported type."""
    declared = (declared or "").split(";")[0].strip().lower()
    if declared not in UNTYPED:
        return declared
    if data is not None:
        found = sniff(data)
        if found:
            return found
    return guess(filename)
