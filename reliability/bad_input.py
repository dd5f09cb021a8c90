"""The bad-input table: malformed requests, files, templates and manifests.

Each case must be rejected locally, before any HTTP call, with an error that names the field
(or the row and field), and never quote a credential pasted into the input. Beside them, the
valid inputs that must pass: real-world images of every supported type (phone JPEGs with EXIF
orientation or an MPF segment, CMYK, 16-bit and palette PNGs, animations, BMP, TIFF) and
unusual but valid references. `python -m reliability.bad_input` prints the table; the test
suite runs the same cases.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError

from wan_tasks.api.models import I2VRequest
from wan_tasks.core.manifest import parse_manifest
from wan_tasks.errors import ManifestError
from wan_tasks.flows.options import ArchiveOptions

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "wan_tasks" / "assets" / "sample.png"
URL = "https://example.com/a.png"


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # request | file | template | manifest
    build: Callable[[Path], Any]  # makes the input (files go in the given folder)
    field: str  # what the error must name
    rule: str  # words the error must contain
    secret: str = ""  # text the error must never contain


@dataclass(frozen=True)
class Outcome:
    case: Case
    rejected: bool
    message: str

    @property
    def ok(self) -> bool:
        text = self.message.lower()
        leaked = bool(self.case.secret) and self.case.secret in self.message
        return (
            self.rejected
            and not leaked
            and self.case.field.lower() in text
            and self.case.rule.lower() in text
        )


def _req(**fields: Any) -> Callable[[Path], Any]:
    base: dict[str, Any] = {"image": URL, "prompt": "p"}
    base.update(fields)
    return lambda _: {k: v for k, v in base.items() if v is not ...}


def _file(
    name: str, content: bytes | None = None, size: int | None = None
) -> Callable[[Path], Any]:
    def build(folder: Path) -> dict[str, Any]:
        path = folder / name
        if size is not None:
            with path.open("wb") as fh:
                fh.truncate(size)  # sparse: a "huge" file without writing it
        else:
            path.write_bytes(content or b"")
        return {"image": str(path), "prompt": "p"}

    return build


def _manifest(name: str, content: bytes) -> Callable[[Path], Any]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(content)
        return path

    return build


def _jsonl(*rows: Any) -> bytes:
    good = json.dumps({"id": "good", "image": str(SAMPLE), "prompt": "fine"})
    return "\n".join([good, *[r if isinstance(r, str) else json.dumps(r) for r in rows]]).encode()


LORA = {"path": "https://example.com/l.safetensors", "scale": 1.0}
# Credential-shaped values (made up): pasted into a manifest they must never be echoed.
API_KEY = "8f3a9c2e71b04d6f9e5a3c1b7d2e4f60a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4"
SK_KEY = "sk-live-Zq8vR2mX4pL9tK7wB3nF"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
SIGNATURE = "X-Amz-Signature=4c1f9a8e7d6b5a4c3e2f1a0b9c8d7e6f"


# -- images -----------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression bomb's shape)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _picture(mode: str = "RGB", size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A small gradient, so encoders produce real data rather than one flat run."""
    img = Image.linear_gradient("L").resize(size).convert("RGB")
    img.paste((200, 40, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return img.convert(mode) if mode != "RGB" else img


def _encoded(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def phone_jpeg() -> bytes:
    """A JPEG as phones write it: EXIF with a camera model and orientation 6 (rotate 90)."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "PhoneMaker", "Phone 15", 6
    return _encoded(_picture(), "JPEG", exif=exif.tobytes(), quality=90)


def mpo_jpeg() -> bytes:
    """A phone JPEG with an APP2 'MPF' segment and a second (depth or preview) frame."""
    second = _picture(size=(48, 32))
    return _encoded(_picture(), "MPO", save_all=True, append_images=[second])


def png_16bit() -> bytes:
    gradient = Image.linear_gradient("L").resize((96, 64))
    return _encoded(gradient.point(lambda v: v * 257, "I").convert("I;16"), "PNG")


def palette_png(transparent: bool = False) -> bytes:
    img = _picture().quantize(16)
    return _encoded(img, "PNG", **({"transparency": 0} if transparent else {}))


def animated(fmt: str) -> bytes:
    frames = [
        _picture(),
        _picture().rotate(180),
        _picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    ]
    return _encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)


VALID_IMAGES: dict[str, Callable[[], bytes]] = {
    "phone JPEG, EXIF orientation 6": phone_jpeg,
    "phone JPEG with MPF segment (MPO)": mpo_jpeg,
    "progressive JPEG": lambda: _encoded(_picture(), "JPEG", progressive=True),
    "CMYK JPEG": lambda: _encoded(_picture("CMYK"), "JPEG"),
    "greyscale JPEG": lambda: _encoded(_picture("L"), "JPEG"),
    "16-bit greyscale PNG": png_16bit,
    "palette PNG": palette_png,
    "palette PNG with transparency": lambda: palette_png(transparent=True),
    "RGBA PNG": lambda: _encoded(_picture("RGBA"), "PNG"),
    "greyscale+alpha PNG": lambda: _encoded(_picture("LA"), "PNG"),
    "animated GIF": lambda: animated("GIF"),
    "animated WebP": lambda: animated("WEBP"),
    "lossless WebP": lambda: _encoded(_picture(), "WEBP", lossless=True),
    "BMP": lambda: _encoded(_picture(), "BMP"),
    "TIFF (LZW)": lambda: _encoded(_picture(), "TIFF", compression="tiff_lzw"),
    "TIFF (uncompressed, CMYK)": lambda: _encoded(_picture("CMYK"), "TIFF"),
}
_SUFFIX = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "GIF": ".gif",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


def write_valid_image(name: str, folder: Path) -> Path:
    data = VALID_IMAGES[name]()
    with Image.open(io.BytesIO(data)) as img:
        suffix = _SUFFIX[img.format or "PNG"]
    path = folder / ("img-" + "".join(c if c.isalnum() else "-" for c in name) + suffix)
    path.write_bytes(data)
    return path


def _truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def _corrupt_png_data() -> bytes:
    """A PNG whose chunks and CRCs are intact but whose compressed pixel data is garbage."""
    header = struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 4)
        + _png_chunk(b"IEND", b"")
    )


def _gif_claiming_real(width: int, height: int) -> bytes:
    """A real GIF whose logical screen (what Pillow reports as its size) was rewritten."""
    data = bytearray(_encoded(_picture(), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\0" * 16


def _with_file(
    name: str, make: Callable[[], bytes], then: Callable[[Path], Any]
) -> Callable[[Path], Any]:
    def build(folder: Path) -> Any:
        (folder / name).write_bytes(make())
        return then(folder)

    return build


def _image_file(name: str, make: Callable[[], bytes]) -> Callable[[Path], Any]:
    def build(folder: Path) -> dict[str, Any]:
        path = folder / name
        path.write_bytes(make())
        return {"image": str(path), "prompt": "p"}

    return build


CASES: list[Case] = [
    Case("image missing", "request", _req(image=...), "image", "field required"),
    Case("prompt missing", "request", _req(prompt=...), "prompt", "field required"),
    Case("prompt blank", "request", _req(prompt="  "), "prompt", "blank"),
    Case("prompt is a number", "request", _req(prompt=3), "prompt", "valid string"),
    Case("image is a list", "request", _req(image=[URL]), "image", "valid string"),
    Case("image ftp URL", "request", _req(image="ftp://h/a.png"), "image", "http(s) url"),
    Case(
        "image data URI", "request", _req(image="data:image/png;base64,AA"), "image", "http(s) url"
    ),
    Case("image URL without host", "request", _req(image="https:///a.png"), "image", "no host"),
    Case(
        "image URL too long",
        "request",
        _req(image="https://h/" + "a" * 3000),
        "image",
        "longer than",
    ),
    Case(
        "last_image bad scheme",
        "request",
        _req(last_image="s3://b/k.png"),
        "last_image",
        "http(s) url",
    ),
    Case(
        "negative_prompt not text",
        "request",
        _req(negative_prompt=["x"]),
        "negative_prompt",
        "valid string",
    ),
    Case("duration 6", "request", _req(duration=6), "duration", "5 or 8"),
    Case("duration '5' as text", "request", _req(duration="5"), "duration", "5 or 8"),
    Case("seed -2", "request", _req(seed=-2), "seed", "greater than or equal to -1"),
    Case("seed 2^31", "request", _req(seed=2**31), "seed", "less than or equal"),
    Case("seed 1.5", "request", _req(seed=1.5), "seed", "valid integer"),
    Case("seed true", "request", _req(seed=True), "seed", "valid integer"),
    Case("4 loras", "request", _req(loras=[LORA] * 4), "loras", "at most 3"),
    Case(
        "4 high-noise loras",
        "request",
        _req(high_noise_loras=[LORA] * 4),
        "high_noise_loras",
        "at most 3",
    ),
    Case(
        "4 low-noise loras",
        "request",
        _req(low_noise_loras=[LORA] * 4),
        "low_noise_loras",
        "at most 3",
    ),
    Case(
        "lora scale 4.5",
        "request",
        _req(loras=[{"path": "p", "scale": 4.5}]),
        "loras.0.scale",
        "less than or equal to 4",
    ),
    Case(
        "lora scale -1",
        "request",
        _req(loras=[{"path": "p", "scale": -1}]),
        "loras.0.scale",
        "greater than or equal to 0",
    ),
    Case(
        "lora scale inf",
        "request",
        _req(loras=[{"path": "p", "scale": float("inf")}]),
        "loras.0.scale",
        "finite",
    ),
    Case(
        "lora without path", "request", _req(loras=[{"scale": 1}]), "loras.0.path", "field required"
    ),
    Case("loras not a list", "request", _req(loras="a=1"), "loras", "valid list"),
    Case(
        "unknown field (typo)",
        "request",
        _req(negative_promt="x"),
        "negative_promt",
        "extra inputs",
    ),
    # Invisible text: blank to a person, billed by the service.
    Case("prompt only NULs", "request", _req(prompt="\0\0\0"), "prompt", "blank"),
    Case(
        "prompt only zero-width spaces",
        "request",
        _req(prompt="\u200b\u200c\u2060"),
        "prompt",
        "blank",
    ),
    Case(
        "prompt only an ANSI escape", "request", _req(prompt="\x1b[31m\x1b[0m"), "prompt", "blank"
    ),
    Case("prompt only a BOM and tabs", "request", _req(prompt="\ufeff\t\r\n"), "prompt", "blank"),
    Case("prompt only Hangul fillers", "request", _req(prompt="\u3164\u3164"), "prompt", "blank"),
    Case("prompt only combining marks", "request", _req(prompt="\u0301\u0308"), "prompt", "blank"),
    Case("prompt only C1 controls", "request", _req(prompt="\x85\x9b\x90"), "prompt", "blank"),
    Case("prompt with a lone surrogate", "request", _req(prompt="cat \ud800"), "prompt", "unicode"),
    # Malformed URLs: the service could not fetch them and would fail the paid task.
    Case(
        "image URL with a space",
        "request",
        _req(image="https://example.com/a b.png"),
        "image",
        "space",
    ),
    Case(
        "image URL with a newline",
        "request",
        _req(image="https://example.com/a\n.png"),
        "image",
        "line break",
    ),
    Case(
        "image URL with a NUL",
        "request",
        _req(image="https://example.com/a\0.png"),
        "image",
        "control character",
    ),
    Case(
        "image URL with a zero-width space",
        "request",
        _req(image="https://example.com/\u200ba.png"),
        "image",
        "invisible",
    ),
    Case(
        "image URL with a bad port",
        "request",
        _req(image="https://example.com:99999/a.png"),
        "image",
        "malformed",
    ),
    Case(
        "image URL with a broken IPv6 host",
        "request",
        _req(image="https://[::1/a.png"),
        "image",
        "malformed",
    ),
    Case(
        "image URL with an invalid host",
        "request",
        _req(image="https://-bad-.com/a.png"),
        "image",
        "not a valid host",
    ),
    Case("image file: URL", "request", _req(image="file:///etc/passwd"), "image", "http(s) url"),
    Case(
        "image URL upper-case data:",
        "request",
        _req(image="DATA:image/png;base64,AA"),
        "image",
        "http(s) url",
    ),
    Case(
        "last_image URL with a tab",
        "request",
        _req(last_image="https://example.com/\ta.png"),
        "last_image",
        "line break",
    ),
    Case(
        "lora path with a newline",
        "request",
        _req(loras=[{"path": "owner/lora\nx", "scale": 1.0}]),
        "loras.0.path",
        "line break",
    ),
    Case(
        "lora path ftp URL",
        "request",
        _req(loras=[{"path": "ftp://h/l.safetensors"}]),
        "loras.0.path",
        "http(s) url",
    ),
    Case(
        "lora path only zero-width",
        "request",
        _req(loras=[{"path": "\u200b"}]),
        "loras.0.path",
        "blank",
    ),
    # Hostile and corrupt images: a header that lies, or data that does not decode.
    Case(
        "PNG header claims 30000x30000",
        "file",
        _image_file("bomb.png", lambda: png_claiming(30000, 30000)),
        "image",
        "pixels",
    ),
    Case(
        "PNG header claims 8000x8000",
        "file",
        _image_file("big.png", lambda: png_claiming(8000, 8000)),
        "image",
        "pixels",
    ),
    Case(
        "PNG header claims 1x1",
        "file",
        _image_file("dot.png", lambda: png_claiming(1, 1)),
        "image",
        "each side must be",
    ),
    Case(
        "GIF header claims 65535x65535",
        "file",
        _image_file("bomb.gif", lambda: _gif_claiming_real(65535, 65535)),
        "image",
        "pixels",
    ),
    Case(
        "GIF header claims 9000x300",
        "file",
        _image_file("wide.gif", lambda: _gif_claiming_real(9000, 300)),
        "image",
        "each side must be",
    ),
    Case(
        "BMP header claims 50000x50000",
        "file",
        _image_file("bomb.bmp", lambda: _bmp_claiming(50000, 50000)),
        "image",
        "image",
    ),
    Case(
        "truncated PNG",
        "file",
        _image_file("cut.png", lambda: _truncated(_encoded(_picture(), "PNG"))),
        "image",
        "cannot be decoded",
    ),
    Case(
        "PNG with corrupt pixel data",
        "file",
        _image_file("bad.png", _corrupt_png_data),
        "image",
        "cannot be decoded",
    ),
    Case(
        "truncated phone JPEG",
        "file",
        _image_file("cut.jpg", lambda: _truncated(phone_jpeg(), 0.8)),
        "image",
        "cannot be decoded",
    ),
    Case(
        "truncated GIF",
        "file",
        _image_file("cut.gif", lambda: _truncated(animated("GIF"), 0.3)),
        "image",
        "cannot be decoded",
    ),
    Case(
        "truncated WebP",
        "file",
        _image_file("cut.webp", lambda: _truncated(_encoded(_picture(), "WEBP"))),
        "image",
        "image",
    ),
    Case(
        "JPEG of headers only",
        "file",
        _image_file("head.jpg", lambda: phone_jpeg()[:400]),
        "image",
        "image",
    ),
    Case(
        "ICO (not a supported type)",
        "file",
        _image_file("icon.png", lambda: _encoded(_picture(size=(32, 32)), "ICO")),
        "image",
        "supported",
    ),
    Case(
        "local path with a NUL",
        "file",
        lambda f: {"image": str(f / "a\0.png"), "prompt": "p"},
        "image",
        "control character",
    ),
    Case(
        "text file named .png",
        "file",
        _file("notes.png", b"hello"),
        "image",
        "not an image of a supported type",
    ),
    Case("empty file", "file", _file("empty.png", b""), "image", "is empty"),
    Case(
        "huge file (31 MiB)",
        "file",
        _file("huge.png", size=31 * 1024 * 1024),
        "image",
        "the limit is",
    ),
    Case(
        "local file missing",
        "file",
        lambda f: {"image": str(f / "nope.png"), "prompt": "p"},
        "image",
        "does not exist",
    ),
    Case(
        "a folder, not a file",
        "file",
        lambda f: {"image": str(f), "prompt": "p"},
        "image",
        "not a regular file",
    ),
    Case(
        "key template with ..",
        "template",
        lambda _: "../{prediction_id}.mp4",
        "key_template",
        "'..'",
    ),
    Case(
        "key template absolute",
        "template",
        lambda _: "/etc/{prediction_id}.mp4",
        "key_template",
        "absolute",
    ),
    Case(
        "key template without unique field",
        "template",
        lambda _: "{prefix}/{date}.mp4",
        "key_template",
        "{prediction_id} or {sha256}",
    ),
    Case(
        "key template unknown field",
        "template",
        lambda _: "{prefix}/{user}/{sha256}.mp4",
        "key_template",
        "unknown field",
    ),
    Case(
        "key template control character",
        "template",
        lambda _: "a\nb/{prediction_id}.mp4",
        "key_template",
        "control characters",
    ),
    Case(
        "JSONL row not JSON",
        "manifest",
        _manifest("m.jsonl", _jsonl("{oops")),
        "row 2",
        "not valid json",
    ),
    Case(
        "JSONL row not an object",
        "manifest",
        _manifest("m.jsonl", _jsonl("[1, 2]")),
        "row 2",
        "object",
    ),
    Case(
        "JSONL row bad duration",
        "manifest",
        _manifest("m.jsonl", _jsonl({"image": URL, "prompt": "p", "duration": 7})),
        "duration",
        "5 or 8",
    ),
    Case(
        "JSONL row non-UTF-8",
        "manifest",
        _manifest("m.jsonl", _jsonl() + b'\n{"image": "\xff", "prompt": "p"}'),
        "row 2",
        "utf-8",
    ),
    Case(
        "JSONL duplicate id",
        "manifest",
        _manifest("m.jsonl", _jsonl({"id": "good", "image": URL, "prompt": "p"})),
        "row 2",
        "duplicate",
    ),
    Case(
        "CSV seed not a number",
        "manifest",
        _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL},p,abc\n".encode()),
        "seed",
        "integer",
    ),
    Case(
        "CSV short row",
        "manifest",
        _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL}\n".encode()),
        "row 3",
        "cells",
    ),
    Case(
        "CSV bad lora cell",
        "manifest",
        _manifest("m.csv", f"image,prompt,loras\n{SAMPLE},p,\n{URL},p,x=heavy\n".encode()),
        "loras",
        "not a number",
    ),
    Case(
        "CSV unknown column",
        "manifest",
        _manifest("m.csv", f"image,prompt,sead\n{URL},p,1\n".encode()),
        "sead",
        "unknown",
    ),
    Case(
        "CSV not UTF-8",
        "manifest",
        _manifest("m.csv", b"image,prompt\nhttps://x/a.png,caf\xe9\n"),
        "m.csv",
        "utf-8",
    ),
    # One bad value must cost only its own row: oversized numbers and hostile structure.
    Case(
        "JSONL integer of 5000 digits",
        "manifest",
        _manifest("m.jsonl", _jsonl(f'{{"image": "{URL}", "prompt": "p", "seed": {"9" * 5000}}}')),
        "seed",
        "5000 digits",
    ),
    Case(
        "JSONL float 1e400",
        "manifest",
        _manifest(
            "m.jsonl",
            _jsonl(
                f'{{"image": "{URL}", "prompt": "p", "loras": [{{"path": "x", "scale": 1e400}}]}}'
            ),
        ),
        "loras.0.scale",
        "too large",
    ),
    Case(
        "JSONL NaN",
        "manifest",
        _manifest("m.jsonl", _jsonl(f'{{"image": "{URL}", "prompt": "p", "seed": NaN}}')),
        "seed",
        "not a number json allows",
    ),
    Case(
        "JSONL -Infinity",
        "manifest",
        _manifest("m.jsonl", _jsonl(f'{{"image": "{URL}", "prompt": "p", "seed": -Infinity}}')),
        "seed",
        "not a number json allows",
    ),
    Case(
        "JSONL nested 100000 deep",
        "manifest",
        _manifest("m.jsonl", _jsonl("[" * 100_000 + "]" * 100_000)),
        "row 2",
        "nested",
    ),
    Case(
        "JSONL duplicate key",
        "manifest",
        _manifest("m.jsonl", _jsonl(f'{{"image": "{URL}", "prompt": "p", "prompt": "q"}}')),
        "prompt",
        "given twice",
    ),
    Case(
        "JSONL bomb image row",
        "manifest",
        _with_file(
            "bomb.png",
            lambda: png_claiming(30000, 30000),
            _manifest("m.jsonl", _jsonl({"image": "bomb.png", "prompt": "p"})),
        ),
        "row 2",
        "pixels",
    ),
    Case(
        "JSONL prompt of NULs",
        "manifest",
        _manifest("m.jsonl", _jsonl({"image": URL, "prompt": "\0\0"})),
        "prompt",
        "blank",
    ),
    Case(
        "CSV prompt cell of NULs",
        "manifest",
        _manifest("m.csv", f"image,prompt\n{SAMPLE},p\n{URL},\0\0\0\n".encode()),
        "prompt",
        "blank",
    ),
    Case(
        "CSV seed of 5000 digits",
        "manifest",
        _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL},p,{'7' * 5000}\n".encode()),
        "seed",
        "digits",
    ),
    Case(
        "CSV cell of 300 KB",
        "manifest",
        _manifest("m.csv", f"image,prompt\n{SAMPLE},p\n{URL},{'a' * 300_000}\n".encode()),
        "prompt",
        "at most 10000",
    ),
    Case(
        "CSV image URL with a space",
        "manifest",
        _manifest("m.csv", f"image,prompt\n{SAMPLE},p\nhttps://h/a b.png,p\n".encode()),
        "image",
        "space",
    ),
    # Credentials pasted into data: the error says where, never what.
    Case(
        "API key as an id",
        "manifest",
        _manifest("m.jsonl", _jsonl({"id": SK_KEY, "image": URL, "prompt": "p"})),
        "id",
        "credential",
        secret=SK_KEY,
    ),
    Case(
        "API key in the image column",
        "manifest",
        _manifest("m.jsonl", _jsonl({"image": API_KEY, "prompt": "p"})),
        "image",
        "does not exist",
        secret=API_KEY,
    ),
    Case(
        "API key as a field name",
        "manifest",
        _manifest("m.jsonl", _jsonl({"image": URL, "prompt": "p", SK_KEY: 1})),
        "row 2",
        "extra inputs",
        secret=SK_KEY,
    ),
    Case(
        "Bearer header as a seed",
        "manifest",
        _manifest("m.csv", f"image,prompt,seed\n{SAMPLE},p,1\n{URL},p,Bearer {API_KEY}\n".encode()),
        "seed",
        "integer text",
        secret=API_KEY,
    ),
    Case(
        "AWS key in a lora cell",
        "manifest",
        _manifest("m.csv", f"image,prompt,loras\n{SAMPLE},p,\n{URL},p,{AWS_KEY}=x\n".encode()),
        "loras",
        "not a number",
        secret=AWS_KEY,
    ),
    Case(
        "API key as a CSV header",
        "manifest",
        _manifest("m.csv", f"image,prompt,{API_KEY}\n{URL},p,1\n".encode()),
        "column 3",
        "unknown",
        secret=API_KEY,
    ),
    Case(
        "signed URL without host",
        "manifest",
        _manifest("m.jsonl", _jsonl({"image": f"https:///a.png?{SIGNATURE}", "prompt": "p"})),
        "image",
        "no host",
        secret=SIGNATURE.split("=")[1],
    ),
    Case("manifest of unknown type", "manifest", _manifest("m.xlsx", b"PK"), "m.xlsx", ".jsonl"),
    Case("empty manifest", "manifest", _manifest("m.jsonl", b"\n\n"), "m.jsonl", "no rows"),
]


@dataclass(frozen=True)
class Valid:
    """An input that is unusual but valid: it must be accepted (and the service renders it)."""

    name: str
    kind: str  # request | file | manifest
    build: Callable[[Path], Any]


def _valid_image(name: str) -> Callable[[Path], Any]:
    return lambda folder: {"image": str(write_valid_image(name, folder)), "prompt": "p"}


def _colon_manifest(folder: Path) -> Path:
    shots = folder / "shots"
    shots.mkdir(exist_ok=True)
    (shots / "take:1.png").write_bytes(_encoded(_picture(), "PNG"))
    (folder / "take:2.png").write_bytes(_encoded(_picture(), "PNG"))
    rows = [{"image": "shots/take:1.png", "prompt": "p"}, {"image": "take:2.png", "prompt": "q"}]
    path = folder / "m.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


VALID: list[Valid] = [
    *[Valid(f"image: {name}", "file", _valid_image(name)) for name in VALID_IMAGES],
    Valid("upper-case HTTPS URL", "request", _req(image="HTTPS://Example.COM/a.png")),
    Valid(
        "URL with port, query and IDN host",
        "request",
        _req(image="https://bücher.example:8443/a.png?w=1&fmt=png"),
    ),
    Valid("IPv6 URL", "request", _req(image="http://[2001:db8::1]:8080/a.png")),
    Valid(
        "prompt with emoji ZWJ, tabs and newlines",
        "request",
        _req(prompt="a family \U0001f468\u200d\U0001f469\u200d\U0001f467\tin\nthe park"),
    ),
    Valid(
        "prompt with ANSI colour around words", "request", _req(prompt="\x1b[1ma bold cat\x1b[0m")
    ),
    Valid(
        "prompt in Hindi with combining marks",
        "request",
        _req(prompt="\u0928\u092e\u0938\u094d\u0924\u0947"),
    ),
    Valid(
        "lora hub id and upper-case URL",
        "request",
        _req(loras=[{"path": "owner/name"}, {"path": "HTTPS://h.example/l.safetensors"}]),
    ),
    Valid("largest seed", "request", _req(seed=2**31 - 1)),
    Valid("relative file names with a colon", "manifest", _colon_manifest),
    Valid(
        "JSONL with CRLF and a BOM on a later line",
        "manifest",
        _manifest(
            "m.jsonl",
            _jsonl()
            + b"\r\n\xef\xbb\xbf"
            + json.dumps({"image": URL, "prompt": "p"}).encode()
            + b"\r\n",
        ),
    ),
    Valid(
        "CSV with a BOM and a quoted multi-line prompt",
        "manifest",
        _manifest(
            "m.csv", b"\xef\xbb\xbfimage,prompt\r\n" + URL.encode() + b',"a cat\r\nin the rain"\r\n'
        ),
    ),
]


def accept(valid: Valid, folder: Path) -> tuple[bool, str]:
    """(accepted, what went wrong)."""
    built = valid.build(folder)
    try:
        if valid.kind in ("request", "file"):
            I2VRequest.model_validate(built)
        else:
            items = parse_manifest(built.read_bytes(), name=built.name, base_dir=folder)
            bad = [i.error or "" for i in items if not i.ok]
            if bad:
                return False, " | ".join(bad)
    except (ValidationError, ManifestError, ValueError) as exc:
        return False, str(exc)
    return True, ""


def check(case: Case, folder: Path) -> Outcome:
    built = case.build(folder)
    try:
        if case.kind in ("request", "file"):
            I2VRequest.model_validate(built)
        elif case.kind == "template":
            ArchiveOptions(key_template=built)
        else:
            items = parse_manifest(built.read_bytes(), name=built.name, base_dir=folder)
            bad = [i for i in items if not i.ok]
            if not bad:
                return Outcome(case, False, "accepted")
            return Outcome(case, True, " | ".join(i.error or "" for i in bad))
    except (ValidationError, ManifestError, ValueError) as exc:
        return Outcome(case, True, str(exc))
    return Outcome(case, False, "accepted")


def run(folder: Path) -> list[Outcome]:
    outcomes = []
    for i, case in enumerate(CASES):
        sub = folder / f"case-{i:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        outcomes.append(check(case, sub))
    return outcomes


def main() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outcomes = run(Path(tmp))
        accepted = []
        for i, valid in enumerate(VALID):
            sub = Path(tmp) / f"valid-{i:02d}"
            sub.mkdir()
            accepted.append((valid, *accept(valid, sub)))
    width = max(*(len(c.name) for c in CASES), *(len(v.name) for v in VALID))
    for o in outcomes:
        first = o.message.replace("\n", " ")
        print(f"{'ok ' if o.ok else 'BAD'} {o.case.name:<{width}}  {first[:110]}")
    for valid, ok, why in accepted:
        print(f"{'ok ' if ok else 'BAD'} {valid.name:<{width}}  {'accepted' if ok else why[:110]}")
    good = sum(o.ok for o in outcomes) + sum(ok for _, ok, _ in accepted)
    total = len(outcomes) + len(accepted)
    print(f"{good} passed, {total - good} failed")
    return 0 if good == total else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    raise SystemExit(main())
