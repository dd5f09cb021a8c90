"""Contact sheets show the video's first, middle and last frames, at the asked height."""

from __future__ import annotations

import io
from pathlib import Path

import av
import pytest
from PIL import Image, ImageStat

from wan_tasks.emulator.render import render_i2v
from wan_tasks.storage.thumbnails import GAP_PX, contact_sheet

RED, BLUE = (255, 0, 0), (0, 0, 255)
# The emulator renders a 64x48 (landscape) input at 832x480.
VIDEO_W, VIDEO_H = 832, 480


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 81-frame H.264 MP4 fading from red to blue (rendered once: it takes ~1 s)."""
    path = tmp_path_factory.mktemp("video") / "red-to-blue.mp4"
    path.write_bytes(render_i2v(_png(RED), _png(BLUE), duration=5, seed=1))
    return path


def _thirds(sheet: Image.Image) -> list[tuple[float, ...]]:
    tile = (sheet.width - 2 * GAP_PX) // 3
    boxes = [(i * (tile + GAP_PX), 0, i * (tile + GAP_PX) + tile, sheet.height) for i in range(3)]
    return [tuple(ImageStat.Stat(sheet.crop(box)).mean) for box in boxes]


def _close(mean: tuple[float, ...], colour: tuple[int, ...], tolerance: float = 25) -> bool:
    return all(abs(m - c) <= tolerance for m, c in zip(mean, colour, strict=True))


@pytest.mark.parametrize("height", [160, 90])
def test_sheet_size_and_frames(video: Path, height: int) -> None:
    sheet = Image.open(io.BytesIO(contact_sheet(video, height=height)))
    assert sheet.format == "JPEG"
    tile = round(VIDEO_W * height / VIDEO_H)
    assert sheet.size == (3 * tile + 2 * GAP_PX, height)
    first, middle, last = _thirds(sheet)
    assert _close(first, RED), first
    assert _close(last, BLUE), last
    # Frame 40 of 81 is halfway through the crossfade.
    assert _close(middle, (128, 0, 128), tolerance=35), middle
    gap = sheet.crop((tile, 0, tile + GAP_PX, height)).convert("L")
    assert ImageStat.Stat(gap).mean[0] < 60


def test_quality_changes_size(video: Path) -> None:
    assert len(contact_sheet(video, quality=20)) < len(contact_sheet(video, quality=95))


def test_container_without_frame_count(video: Path, tmp_path: Path) -> None:
    """Matroska states no frame count, so the middle is found by decoding twice."""
    mkv = tmp_path / "copy.mkv"
    with av.open(str(video)) as src, av.open(str(mkv), "w", format="matroska") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:  # the demuxer's final flush packet
                packet.stream = out
                dst.mux(packet)
    with av.open(str(mkv)) as check:
        assert check.streams.video[0].frames == 0
    first, middle, last = _thirds(Image.open(io.BytesIO(contact_sheet(mkv))))
    assert _close(first, RED) and _close(last, BLUE)
    assert _close(middle, (128, 0, 128), tolerance=35), middle


def test_not_a_video_raises_value_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="not a decodable video"):
        contact_sheet(text)
    still = tmp_path / "still.png"
    still.write_bytes(_png(RED))
    with pytest.raises(ValueError, match="still image"):
        contact_sheet(still)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a decodable video"):
        contact_sheet(empty)


def test_truncated_video_raises_value_error(video: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a decodable video"):
        contact_sheet(cut)


def test_missing_file_and_bad_arguments(video: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        contact_sheet(tmp_path / "absent.mp4")
    with pytest.raises(ValueError, match="height"):
        contact_sheet(video, height=0)
    with pytest.raises(ValueError, match="quality"):
        contact_sheet(video, quality=101)
