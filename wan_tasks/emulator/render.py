"""Render the emulator's stand-in for a Wan 2.2 i2v 480p video.

The emulator has no model, so it fakes one: a short H.264 MP4 with the same size, frame
rate and frame count the real API returns, moving from the input image(s) in a way that is
cheap to compute, visibly animated, and byte-for-byte reproducible for the same inputs, so
that caching and "never pay twice" logic can be tested by comparing bytes.

Only Pillow and PyAV are used; numpy is deliberately not required.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import av
from av.video.reformatter import Interpolation
from PIL import Image, ImageOps

from wan_tasks.api.models import FPS

__all__ = ["FPS", "VideoInfo", "frame_count", "probe_mp4", "render_i2v"]

_LANDSCAPE: Final = (832, 480)
_PORTRAIT: Final = (480, 832)
# Sources are prepared this much larger than the output so zooming and panning crop real
# pixels instead of upscaling (the maximum zoom below never exceeds it).
_MARGIN: Final = 1.25
_DOT_RADIUS: Final = 28
_BAR_HEIGHT: Final = 3
_CROSSFADE_ZOOM: Final = 0.1
# Bit-exact rounding keeps swscale's output independent of which SIMD path the CPU takes.
_SCALER: Final = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.BITEXACT

_ENCODER_OPTIONS: Final = {
    # Fast enough for an emulator; the output only has to look plausible.
    "preset": "veryfast",
    "crf": "28",
    # With B-frames, x264's MB-tree reads uninitialised memory: output bytes changed with
    # MALLOC_PERTURB_ and between calls in one process. Without B-frames they are exact
    # (and, here, smaller and faster than turning MB-tree off).
    "x264-params": "bframes=0",
}
_CONTAINER_OPTIONS: Final = {
    # moov first so browsers and HTTP range clients can start playing immediately.
    "movflags": "+faststart",
    # Keeps libavformat's version string out of the file, so an FFmpeg bump alone does
    # not change the bytes.
    "fflags": "+bitexact",
}


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What :func:`probe_mp4` found by decoding a video."""

    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    codec: str


def frame_count(duration: int) -> int:
    """Frames Wan 2.2 produces for ``duration`` seconds (16 fps plus the first frame)."""
    if duration not in (5, 8):
        raise ValueError(f"duration must be 5 or 8 seconds, got {duration!r}")
    return FPS * duration + 1


def render_i2v(
    first: bytes, last: bytes | None, *, duration: int, seed: int, prompt: str = ""
) -> bytes:
    """Render a fake image-to-video result as complete MP4 bytes.

    With ``last`` the video crossfades from ``first`` to ``last`` under a gentle push-in,
    ending exactly on ``last``; without it, a seed-chosen pan/zoom moves across ``first``.
    A small seed-driven light dot and a progress bar make different seeds visibly
    different. The prompt only tints the dot, standing in for "the prompt matters".
    Raises ValueError for an unsupported duration or an undecodable image.
    """
    n = frame_count(duration)
    first_img = _decode(first, "first")
    size = _LANDSCAPE if first_img.width >= first_img.height else _PORTRAIT
    base_size = (round(size[0] * _MARGIN), round(size[1] * _MARGIN))
    base_first = _cover(first_img, base_size)
    base_last = _cover(_decode(last, "last"), base_size) if last is not None else None

    rng = random.Random(seed)
    overlay = _Overlay(rng, size, prompt)
    if base_last is None:
        shots = _ken_burns(base_first, n, rng)
    else:
        shots = _crossfade(base_first, base_last, n)

    # faststart rewrites the file through a second, read-only handle opened by name, which
    # an in-memory file object cannot provide; a private temporary file can.
    with tempfile.TemporaryDirectory(prefix="wan-render-") as tmp:
        path = os.path.join(tmp, "out.mp4")
        _encode(shots, overlay, size, n, path)
        with open(path, "rb") as fh:
            return fh.read()


def probe_mp4(data: bytes) -> VideoInfo:
    """Decode every frame of an MP4 and report its real geometry, length and codec.

    Raises ValueError if ``data`` is not an MP4 with a decodable video stream.
    """
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            # FFmpeg happily "decodes" a PNG or JPEG as a one-frame video.
            if "mp4" not in container.format.name.split(","):
                raise ValueError(f"not an MP4 file (detected {container.format.name!r})")
            stream = container.streams.video[0]
            frames, start, end = 0, None, None
            for frame in container.decode(stream):
                frames += 1
                if frame.pts is not None:
                    start = frame.pts if start is None else min(start, frame.pts)
                    end = max(end or 0, frame.pts + (frame.duration or 0))
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
            # Presentation span of the decoded frames: the muxer's own duration field can be
            # a few ticks short when B-frames shift timestamps.
            if start is not None and end is not None and stream.time_base is not None:
                duration_s = float((end - start) * stream.time_base)
            else:
                duration_s = frames / fps if fps else 0.0
            return VideoInfo(
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                frames=frames,
                fps=fps,
                duration_s=duration_s,
                codec=stream.codec_context.name,
            )
    except (av.FFmpegError, IndexError) as exc:
        raise ValueError(f"not a decodable video: {exc}") from exc


def _encode(
    shots: Iterator[Image.Image],
    overlay: _Overlay,
    size: tuple[int, int],
    n: int,
    path: str,
) -> None:
    with av.open(path, mode="w", format="mp4", container_options=_CONTAINER_OPTIONS) as out:
        stream = out.add_stream("libx264", rate=FPS, options=dict(_ENCODER_OPTIONS))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, FPS)
        # Multi-threaded x264 may make different decisions from run to run.
        stream.codec_context.thread_count = 1
        for i, shot in enumerate(shots):
            overlay.draw(shot, i, n)
            # PyAV's stub leaves from_image unannotated; it returns a VideoFrame.
            rgb: av.VideoFrame = av.VideoFrame.from_image(shot)  # type: ignore[no-untyped-call]
            # swscale does the final zoom and the YUV conversion in one fast pass, several
            # times cheaper than a sub-pixel Pillow resize.
            frame = rgb.reformat(
                width=size[0],
                height=size[1],
                format="yuv420p",
                interpolation=_SCALER,
                threads=1,
            )
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def _decode(data: bytes, name: str) -> Image.Image:
    try:
        opened = Image.open(io.BytesIO(data))
        # JPEG can decode at 1/2..1/8 scale for free; a square request keeps both sides
        # large enough whichever way EXIF later rotates the image.
        side = round(max(_LANDSCAPE) * _MARGIN)
        opened.draft("RGB", (side, side))
        img = ImageOps.exif_transpose(opened)
        img.load()
    # Pillow signals corrupt or unknown input with many exception types
    # (OSError, SyntaxError, struct.error, DecompressionBombError, ...).
    except Exception as exc:
        raise ValueError(f"{name} image could not be decoded: {exc}") from exc
    if img.width < 1 or img.height < 1:
        raise ValueError(f"{name} image is empty")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # A defined matte, rather than whatever colour hides under transparent pixels.
        rgba = img.convert("RGBA")
        matte = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(matte, rgba).convert("RGB")
    return img.convert("RGB")


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover ``size`` and centre-crop, preserving aspect ratio."""
    scale = max(size[0] / img.width, size[1] / img.height)
    crop_w, crop_h = size[0] / scale, size[1] / scale
    x0, y0 = (img.width - crop_w) / 2, (img.height - crop_h) / 2
    return img.resize(
        size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + crop_w, y0 + crop_h), reducing_gap=3.0
    )


def _smooth(t: float) -> float:
    return t * t * (3.0 - 2.0 * t)


def _window(
    base_size: tuple[int, int], zoom: float, ux: float, uy: float
) -> tuple[int, int, int, int]:
    """Integer crop box showing ``1/zoom`` of the base at relative position (ux, uy)."""
    bw, bh = base_size
    w, h = round(bw / zoom), round(bh / zoom)
    x0, y0 = round((bw - w) * ux), round((bh - h) * uy)
    return (x0, y0, x0 + w, y0 + h)


def _crossfade(first: Image.Image, last: Image.Image, n: int) -> Iterator[Image.Image]:
    for i in range(n):
        t = i / (n - 1)
        alpha = _smooth(t)
        # The push-in peaks mid-fade and returns, so the video starts on exactly the first
        # image and ends on exactly the last one, as Wan's first/last-frame mode does.
        box = _window(first.size, 1.0 + _CROSSFADE_ZOOM * math.sin(math.pi * t), 0.5, 0.5)
        if alpha <= 0.0:
            yield first.crop(box)
        elif alpha >= 1.0:
            yield last.crop(box)
        else:
            yield Image.blend(first.crop(box), last.crop(box), alpha)


def _ken_burns(base: Image.Image, n: int, rng: random.Random) -> Iterator[Image.Image]:
    wide, tight = rng.uniform(1.0, 1.04), rng.uniform(1.16, _MARGIN)
    z0, z1 = (wide, tight) if rng.random() < 0.5 else (tight, wide)
    ux0, uy0, ux1, uy1 = (rng.random() for _ in range(4))
    for i in range(n):
        s = _smooth(i / (n - 1))
        zoom = z0 + (z1 - z0) * s
        yield base.crop(_window(base.size, zoom, ux0 + (ux1 - ux0) * s, uy0 + (uy1 - uy0) * s))


class _Overlay:
    """A soft light dot on a seed-chosen Lissajous path, plus a thin progress bar.

    Drawn on the un-scaled crop, so sizes and positions are converted from output pixels.
    """

    def __init__(self, rng: random.Random, size: tuple[int, int], prompt: str) -> None:
        self._size = size
        self._freq = (rng.uniform(0.4, 1.2), rng.uniform(0.4, 1.2))
        self._phase = (rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi))
        # hashlib, not hash(): str hashing is salted per process.
        hue = (
            int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") / 2**32
            if prompt
            else rng.random()
        )
        r, g, b = colorsys.hsv_to_rgb(hue, 0.45, 1.0)
        self._colour = (round(r * 255), round(g * 255), round(b * 255))
        # radial_gradient is 0 at the centre and 181 at the middle of each edge (255 in the
        # corners); the squared falloff gives a bright core and an edge that fades to zero.
        self._glow = Image.radial_gradient("L").point(
            lambda v: round(230 * max(0.0, 1 - v / 181) ** 2)
        )
        self._masks: dict[int, Image.Image] = {}

    def _mask(self, radius: int) -> Image.Image:
        if radius not in self._masks:
            d = 2 * radius
            self._masks[radius] = self._glow.resize((d, d), Image.Resampling.BILINEAR)
        return self._masks[radius]

    def draw(self, img: Image.Image, i: int, n: int) -> None:
        t = i / (n - 1)
        w, h = self._size
        k = img.width / w
        x = k * w * (0.5 + 0.36 * math.sin(2 * math.pi * self._freq[0] * t + self._phase[0]))
        y = k * h * (0.5 + 0.32 * math.sin(2 * math.pi * self._freq[1] * t + self._phase[1]))
        r = round(_DOT_RADIUS * k)
        img.paste(self._colour, (round(x) - r, round(y) - r), self._mask(r))
        bar_h = max(1, round(_BAR_HEIGHT * k))
        img.paste(self._colour, (0, img.height - bar_h, round(img.width * (i + 1) / n), img.height))
