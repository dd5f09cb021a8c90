"""Checks on input images, done locally before anything is uploaded or paid for."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image, UnidentifiedImageError

# What the upload endpoint accepts (JPG/PNG/WebP/GIF/BMP/TIFF), as Pillow names the formats.
SUPPORTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
# The service publishes no limits; these are generous and keep a stray 2 GB file from being read.
MAX_IMAGE_BYTES = 30 * 1024 * 1024
MIN_SIDE = 16
MAX_SIDE = 8192
MAX_URL_LENGTH = 2048


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    content_type: str
    width: int
    height: int
    size: int


def check_image_reference(value: str) -> str:
    """Accept an http(s) URL or a readable local image; return it normalised.

    Raises ValueError with the rule broken (pydantic prefixes the field name).
    """
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("http", "https"):
        parts = urlsplit(value)
        if not parts.hostname:
            raise ValueError(f"URL {value!r} has no host")
        if len(value) > MAX_URL_LENGTH:
            raise ValueError(f"URL is longer than {MAX_URL_LENGTH} characters")
        return value
    if scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive letter
        raise ValueError(
            f"must be an http(s) URL or a local file path, not a {scheme}: URL"
        )
    return str(inspect_image(Path(value)).path)


def inspect_image(path: Path) -> ImageInfo:
    """Open only the header of a local image and check type and size."""
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"local file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"local file {str(path)!r} is empty")
    if size > MAX_IMAGE_BYTES:
        raise ValueError(
            f"local file {str(path)!r} is {size} bytes; the limit is {MAX_IMAGE_BYTES} bytes"
        )
    try:
        with Image.open(path) as img:
            fmt, (width, height) = img.format or "", img.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(
            f"local file {str(path)!r} is not an image of a supported type "
            f"({', '.join(SUPPORTED_FORMATS)})"
        ) from exc
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"local file {str(path)!r} is {fmt}; supported: {', '.join(SUPPORTED_FORMATS)}"
        )
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
        raise ValueError(
            f"image {str(path)!r} is {width}x{height}; each side must be {MIN_SIDE}-{MAX_SIDE} px"
        )
    return ImageInfo(path.resolve(), fmt, SUPPORTED_FORMATS[fmt], width, height, size)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
