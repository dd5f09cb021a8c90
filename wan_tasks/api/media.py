"""Checks on input images and image references, done locally before anything is paid for.

A reference is an http(s) URL or a local file. URLs are parsed strictly (what a fetcher would
refuse is refused here); local files are decoded fully, within a pixel bound set before any
decoding, because a file whose header is fine but whose data is corrupt would otherwise be
uploaded, submitted, billed and then failed by the service with 1402.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from wan_tasks.api.text import find_char, quote_value

# What the upload endpoint accepts (JPG/PNG/WebP/GIF/BMP/TIFF), as Pillow names the formats.
# MPO is a JPEG with extra frames in an APP2 "MPF" segment (what many phones write): a JPEG.
SUPPORTED_FORMATS: dict[str, str] = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"
# The service publishes no limits; these are generous and keep a stray 2 GB file from being read.
MAX_IMAGE_BYTES = 30 * 1024 * 1024
MIN_SIDE = 16
MAX_SIDE = 8192
# Checked on the header's size before decoding, so decoding costs at most this many pixels
# (a 50 MP phone photo fits; a header claiming 30000x30000 is refused unread).
MAX_PIXELS = 50 * 1024 * 1024
MAX_URL_LENGTH = 2048
URL_SCHEMES = ("http", "https")

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
# Nothing a URL may hold raw: whitespace, controls, invisible format characters, surrogates.
_URL_FORBIDDEN = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
# A local path may hold spaces and any letters, but no control characters or broken Unicode.
_PATH_FORBIDDEN = frozenset({"Cc", "Cs"})
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


@dataclass(frozen=True)
class ImageInfo:
    path: Path
    format: str
    content_type: str
    width: int
    height: int
    size: int


def is_url(value: str) -> bool:
    """True when `value` starts with an http(s) scheme (any case)."""
    match = _SCHEME.match(value)
    return match is not None and match.group(1).lower() in URL_SCHEMES


def check_image_reference(value: str) -> str:
    """Accept an http(s) URL or a readable local image; return it normalised.

    A URL comes back with its scheme in lower case; a local file as its absolute path.
    `take:1.png` is a file name, not a URL: only `scheme://...` (or a data: URI) is taken for
    a URL of another scheme. Raises ValueError with the rule broken (pydantic prefixes the
    field name); the value itself is quoted only when that is safe.
    """
    value = value.strip()
    if not value:
        raise ValueError("must not be blank")
    match = _SCHEME.match(value)
    scheme = match.group(1).lower() if match else ""
    if scheme in URL_SCHEMES:
        return check_url(value)
    rest = value[len(scheme) + 1 :] if match else ""
    # A one-letter "scheme" is a Windows drive letter (C:\ or C:/).
    if len(scheme) > 1 and (rest.startswith("//") or scheme == "data"):
        raise ValueError(f"must be an http(s) URL or a local file path, not a {scheme}: URL")
    hint = " (if it is a URL: only http(s) URLs are supported)" if len(scheme) > 1 else ""
    return str(inspect_image(Path(value), hint=hint).path)


def check_url(value: str) -> str:
    """Parse an http(s) URL strictly; return it with the scheme in lower case."""
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"URL is longer than {MAX_URL_LENGTH} characters")
    bad = find_char(value, _URL_FORBIDDEN)
    if bad:
        position, kind = bad
        raise ValueError(
            f"URL has {kind} at position {position}; percent-encode it (a space is %20)"
        )
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ValueError(f"URL is malformed ({exc})") from None
    if parts.scheme.lower() not in URL_SCHEMES:
        raise ValueError("must be an http(s) URL or a local file path")
    if not host:
        raise ValueError(f"URL {quote_value(value)} has no host")
    if not _valid_host(host):
        raise ValueError(f"URL host {quote_value(host)} is not a valid host name or address")
    scheme_len = len(parts.scheme)
    return value[:scheme_len].lower() + value[scheme_len:]


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return False
    labels = ascii_host.rstrip(".").split(".")
    return len(ascii_host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def inspect_image(path: Path, *, hint: str = "") -> ImageInfo:
    """Check a local image: a regular file of a supported type and sane size whose data
    decodes completely. Raises ValueError naming the rule."""
    shown = quote_value(str(path))
    bad = find_char(str(path), _PATH_FORBIDDEN)
    if bad:
        raise ValueError(f"local file path has {bad[1]} at position {bad[0]}")
    path = path.expanduser()
    if not path.exists():
        raise ValueError(f"local file {shown} does not exist{hint}")
    if not path.is_file():
        raise ValueError(f"{shown} is not a regular file")
    stat = path.stat()
    if stat.st_size == 0:
        raise ValueError(f"local file {shown} is empty")
    if stat.st_size > MAX_IMAGE_BYTES:
        raise ValueError(
            f"local file {shown} is {stat.st_size} bytes; the limit is {MAX_IMAGE_BYTES} bytes"
        )
    resolved = path.resolve()
    # Manifests often reuse one image on many rows: decode each file version once.
    outcome = _decode_check(str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if isinstance(outcome, str):
        raise ValueError(f"image {shown} {outcome}")
    fmt, width, height = outcome
    return ImageInfo(resolved, fmt, SUPPORTED_FORMATS[fmt], width, height, stat.st_size)


@functools.lru_cache(maxsize=512)
def _decode_check(path: str, size: int, mtime_ns: int, inode: int) -> tuple[str, int, int] | str:
    """(format, width, height) of a good image, else what is wrong with it (the stat fields
    only key the cache, so an edited file is checked again)."""
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        return f"claims more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels in its header"
    # Pillow reports unreadable headers with many exception types (OSError, SyntaxError,
    # struct.error, ValueError, ...): any of them means "not an image we can read".
    except Exception:
        return f"is not an image of a supported type ({_FORMAT_NAMES})"
    with img:
        fmt, (width, height) = img.format or "", img.size
        if fmt not in SUPPORTED_FORMATS:
            return f"is {fmt}; supported: {_FORMAT_NAMES}"
        if min(width, height) < MIN_SIDE or max(width, height) > MAX_SIDE:
            return f"is {width}x{height}; each side must be {MIN_SIDE}-{MAX_SIDE} px"
        if width * height > MAX_PIXELS:
            return f"is {width}x{height}; the limit is {MAX_PIXELS} pixels"
        try:
            if fmt in ("JPEG", "MPO"):
                # JPEG decodes at 1/2..1/8 scale for free, still reading every byte of data.
                img.draft("RGB", (1024, 1024))
            img.load()  # the first frame of an animation, as the service uses
            img.getexif().get(0x0112)  # orientation: a broken EXIF block fails here
        except Exception as exc:
            return f"has a valid header but its data cannot be decoded ({type(exc).__name__})"
    return fmt, width, height


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
