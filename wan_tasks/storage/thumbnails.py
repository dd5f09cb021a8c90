"""Contact sheets: the first, middle and last frame of a video side by side, as one JPEG.

A glance at the sheet shows whether an image-to-video result starts and ends where it should,
without opening a player. Videos here are short (81-129 frames at 480p), so frames are decoded
sequentially and only the three that are needed are kept.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
from av.video.frame import VideoFrame
from PIL import Image

__all__ = ["GAP_PX", "contact_sheet"]

log = logging.getLogger(__name__)

GAP_PX = 4
_GAP_COLOUR = (24, 24, 24)
_MAX_HEIGHT = 4096
# FFmpeg "decodes" a PNG or JPEG as a one-frame video; a contact sheet of a still is a
# caller's mistake, so image demuxers are refused by name.
_IMAGE_DEMUXERS = frozenset(
    {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe"}
)


def contact_sheet(video: Path, *, height: int = 160, quality: int = 80) -> bytes:
    """Return JPEG bytes of the first, middle and last frames, each scaled to `height`
    pixels tall (aspect kept) and separated by a 4 px dark gap.

    Raises FileNotFoundError if `video` does not exist and ValueError if it is not a
    decodable video or the arguments are out of range.
    """
    if not 1 <= height <= _MAX_HEIGHT:
        raise ValueError(f"height must be 1-{_MAX_HEIGHT} px, got {height}")
    if not 1 <= quality <= 95:  # Pillow: values above 95 only grow the file
        raise ValueError(f"quality must be 1-95, got {quality}")
    if not video.is_file():
        raise FileNotFoundError(f"video {str(video)!r} does not exist or is not a file")

    first, middle, last, count, used = _three_frames(video, height, middle_index=None)
    if used != (count - 1) // 2:
        # The container did not state a frame count, or stated a wrong one: decode again
        # now that the real count is known (cheap for videos this short).
        used = (count - 1) // 2
        first, middle, last, count, _ = _three_frames(video, height, middle_index=used)
    if middle is None:
        raise ValueError(f"{str(video)!r}: frame count changed between two decodes")

    tiles = [first, middle, last]
    sheet = Image.new(
        "RGB", (sum(t.width for t in tiles) + GAP_PX * (len(tiles) - 1), height), _GAP_COLOUR
    )
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + GAP_PX
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=quality)
    log.debug("contact sheet of %s: %d frames, %dx%d", video, count, sheet.width, height)
    return buf.getvalue()


def _three_frames(
    video: Path, height: int, *, middle_index: int | None
) -> tuple[Image.Image, Image.Image | None, Image.Image, int, int]:
    """Decode `video` once; return the first, middle (None if not reached) and last frame
    scaled to `height`, the number of frames decoded and the index taken as the middle.

    With `middle_index` None the stream's stated frame count picks the middle frame.
    """
    where = str(video)
    try:
        with av.open(where, mode="r") as container:
            if container.format.name in _IMAGE_DEMUXERS:
                raise ValueError(
                    f"{where!r} is a still image ({container.format.name}), not a video"
                )
            if not container.streams.video:
                raise ValueError(f"{where!r} has no video stream")
            stream = container.streams.video[0]
            if middle_index is None:
                middle_index = (stream.frames - 1) // 2 if stream.frames > 0 else -1
            first: Image.Image | None = None
            middle: Image.Image | None = None
            # Only a reference to the newest frame is held, never the whole video.
            last: VideoFrame | None = None
            count = 0
            for frame in container.decode(stream):
                if first is None:
                    first = _scaled(frame, height)
                if count == middle_index:
                    middle = _scaled(frame, height)
                last = frame
                count += 1
    except av.FFmpegError as exc:
        raise ValueError(f"{where!r} is not a decodable video: {exc}") from exc
    if first is None or last is None:
        raise ValueError(f"{where!r} is not a decodable video: no frames could be decoded")
    return first, middle, _scaled(last, height), count, middle_index


def _scaled(frame: VideoFrame, height: int) -> Image.Image:
    width = max(1, round(frame.width * height / frame.height))
    # swscale resizes and converts to RGB in one pass, much cheaper than a Pillow resize of
    # the full frame.
    rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
    # PyAV's stub leaves to_image unannotated; it returns a PIL image.
    image: Image.Image = rgb.to_image()  # type: ignore[no-untyped-call]
    return image
