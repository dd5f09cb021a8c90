"""The emulator's fake video renderer: geometry, length, motion and reproducibility."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import av
import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

from wan_tasks.emulator.render import VideoInfo, probe_mp4, render_i2v

REPO = Path(__file__).resolve().parents[1]


def _image(size: tuple[int, int], top: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    """A gradient with a few shapes, so motion and fades change real pixels."""
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    w, h = size
    for y in range(h):
        t = y / (h - 1)
        draw.line((0, y, w, y), fill=tuple(round(c * (1 - t) + 255 * t * 0.3) for c in top))
    draw.ellipse((w * 0.2, h * 0.2, w * 0.45, h * 0.45), fill=(250, 240, 200))
    draw.rectangle((w * 0.6, h * 0.55, w * 0.9, h * 0.9), fill=(30, 40, 60))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


LANDSCAPE = _image((640, 360), (40, 70, 160))
OTHER = _image((800, 600), (200, 60, 30), "JPEG")


def _frames(data: bytes) -> list[Image.Image]:
    with av.open(io.BytesIO(data), mode="r") as container:
        # PyAV's stub leaves to_image unannotated.
        return [frame.to_image() for frame in container.decode(video=0)]  # type: ignore[no-untyped-call]


def _mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute per-channel pixel difference."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


def _cover(data: bytes, size: tuple[int, int]) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = max(size[0] / img.width, size[1] / img.height)
    w, h = size[0] / scale, size[1] / scale
    box = ((img.width - w) / 2, (img.height - h) / 2, (img.width + w) / 2, (img.height + h) / 2)
    return img.resize(size, Image.Resampling.BILINEAR, box=box)


@pytest.fixture(scope="module")
def landscape_5s() -> bytes:
    return render_i2v(LANDSCAPE, None, duration=5, seed=7)


def test_five_seconds_landscape(landscape_5s: bytes) -> None:
    info = probe_mp4(landscape_5s)
    assert info == VideoInfo(
        width=832, height=480, frames=81, fps=16.0, duration_s=info.duration_s, codec="h264"
    )
    assert info.duration_s == pytest.approx(81 / 16)
    assert landscape_5s[4:8] == b"ftyp"
    # faststart: the index precedes the media data, so playback can begin while streaming.
    assert 0 < landscape_5s.find(b"moov") < landscape_5s.find(b"mdat")


def test_eight_seconds() -> None:
    info = probe_mp4(render_i2v(OTHER, None, duration=8, seed=1))
    assert (info.frames, info.fps, info.codec) == (129, 16.0, "h264")
    assert info.duration_s == pytest.approx(129 / 16)


def test_portrait_input_gives_portrait_video() -> None:
    # RGBA also exercises the transparency matte.
    portrait = Image.new("RGBA", (300, 500), (20, 120, 60, 128))
    buf = io.BytesIO()
    portrait.save(buf, "PNG")
    info = probe_mp4(render_i2v(buf.getvalue(), None, duration=5, seed=3))
    assert (info.width, info.height, info.frames) == (480, 832, 81)


def test_exif_rotation_decides_orientation() -> None:
    # Stored landscape, but a phone would display it portrait (EXIF orientation 6).
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(io.BytesIO(OTHER)).save(buf, "JPEG", exif=exif.tobytes())
    info = probe_mp4(render_i2v(buf.getvalue(), None, duration=5, seed=3))
    assert (info.width, info.height) == (480, 832)


def test_same_inputs_give_identical_bytes(landscape_5s: bytes) -> None:
    assert render_i2v(LANDSCAPE, None, duration=5, seed=7) == landscape_5s


def test_identical_bytes_across_processes(landscape_5s: bytes, tmp_path: Path) -> None:
    # A fresh interpreter must reproduce the file exactly, even with a different str-hash
    # salt and with glibc filling the heap with junk (which exposed an x264 uninitialised
    # read once: see _ENCODER_OPTIONS).
    src = tmp_path / "in.png"
    src.write_bytes(LANDSCAPE)
    code = textwrap.dedent(
        """
        import hashlib, pathlib, sys
        from wan_tasks.emulator.render import render_i2v
        video = render_i2v(pathlib.Path(sys.argv[1]).read_bytes(), None, duration=5, seed=7)
        sys.stdout.write(hashlib.sha256(video).hexdigest())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(src)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345", "MALLOC_PERTURB_": "165"},
    )
    assert out.stdout == hashlib.sha256(landscape_5s).hexdigest()


def test_different_seed_gives_different_video(landscape_5s: bytes) -> None:
    other = render_i2v(LANDSCAPE, None, duration=5, seed=8)
    assert other != landscape_5s
    assert _mad(_frames(other)[40], _frames(landscape_5s)[40]) > 1.0


def test_first_to_last_ends_on_last_image() -> None:
    video = render_i2v(LANDSCAPE, OTHER, duration=5, seed=2)
    frames = _frames(video)
    assert len(frames) == 81
    first, last = _cover(LANDSCAPE, (832, 480)), _cover(OTHER, (832, 480))
    assert _mad(frames[-1], last) < _mad(frames[-1], first)
    assert _mad(frames[0], first) < _mad(frames[0], last)


def test_no_last_image_still_moves(landscape_5s: bytes) -> None:
    frames = _frames(landscape_5s)
    assert _mad(frames[0], frames[-1]) > 1.0


@pytest.mark.parametrize("duration", [0, 4, 6, 10, -5])
def test_unsupported_duration_raises(duration: int) -> None:
    with pytest.raises(ValueError, match="duration"):
        render_i2v(LANDSCAPE, None, duration=duration, seed=1)


@pytest.mark.parametrize("data", [b"", b"not an image at all", LANDSCAPE[:100]])
def test_undecodable_first_image_raises(data: bytes) -> None:
    with pytest.raises(ValueError, match="first image could not be decoded"):
        render_i2v(data, None, duration=5, seed=1)


def test_undecodable_last_image_raises() -> None:
    with pytest.raises(ValueError, match="last image could not be decoded"):
        render_i2v(LANDSCAPE, b"\x89PNG broken", duration=5, seed=1)


def test_probe_rejects_non_video() -> None:
    with pytest.raises(ValueError, match="not an MP4"):
        probe_mp4(LANDSCAPE)
    with pytest.raises(ValueError):
        probe_mp4(b"\x00\x00\x00\x18ftypmp42 truncated")


def test_bundled_sample_image() -> None:
    data = resources.files("wan_tasks").joinpath("assets/sample.png").read_bytes()
    assert len(data) < 300_000
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.size == (1024, 576)
