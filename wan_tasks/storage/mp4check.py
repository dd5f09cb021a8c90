"""Is a downloaded MP4 whole? A streaming check of its top-level box structure.

A download that ends early with no Content-Length (or a proxy that drops the end) leaves bytes
whose SHA-256 is perfectly good and whose video is not. An ISO-BMFF file is a sequence of
boxes, each starting with its size: a whole file ends exactly where its last box ends, and has
its `ftyp`, `moov` (the index) and `mdat` (the media). `checked_mp4` passes the chunks through
unchanged, reading only the box headers (bounded memory), and raises before the last chunk is
handed on when the file is not whole, so the archive never completes an upload of it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from wan_tasks.errors import ArchiveError

REQUIRED_BOXES = frozenset({b"ftyp", b"moov", b"mdat"})


class Mp4Structure:
    """Feed the bytes in order; `check()` at the end raises ArchiveError when not whole."""

    def __init__(self) -> None:
        self.size = 0  # bytes seen
        self._next = 0  # offset of the next box header
        self._header = b""  # a header split across chunks
        self._to_end = False  # a box of size 0 runs to the end of the file
        self.boxes: list[bytes] = []
        self._bad: str | None = None

    def feed(self, chunk: bytes) -> None:
        base = self.size
        self.size += len(chunk)
        while self._bad is None and not self._to_end:
            # Where the next header (or the rest of a split one) starts in this chunk.
            at = self._next + len(self._header) - base
            if at >= len(chunk):
                return  # the next box starts beyond this chunk (inside the media)
            large = len(self._header) >= 8 and self._header[:4] == b"\0\0\0\1"
            need = 16 if large else 8
            self._header += chunk[at : at + need - len(self._header)]
            if len(self._header) < 8:
                return  # the rest of the header is in the next chunk
            if self._header[:4] == b"\0\0\0\1" and len(self._header) < 16:
                continue  # a 64-bit size follows the type
            self._box(self._header)
            self._header = b""

    def _box(self, header: bytes) -> None:
        size, kind = struct.unpack(">I4s", header[:8])
        if size == 1:
            (size,) = struct.unpack(">Q", header[8:16])
        if not all(32 <= c < 127 for c in kind):
            self._bad = f"bytes at offset {self._next} are not an MP4 box"
            return
        self.boxes.append(kind)
        if size == 0:
            self._to_end = True
        elif size < len(header):
            self._bad = f"box {kind.decode()} at offset {self._next} has size {size}"
        else:
            self._next += size

    def problem(self) -> str | None:
        if self._bad:
            return self._bad
        if self.size == 0:
            return "no bytes"
        if not self._to_end and (self._header or self._next != self.size):
            return (
                f"it ends at byte {self.size} inside a box that runs to byte "
                f"{max(self._next, self.size + 1)}"
            )
        missing = REQUIRED_BOXES - set(self.boxes)
        if missing:
            names = ", ".join(sorted(b.decode() for b in missing))
            return f"it has no {names} box"
        return None

    def check(self, what: str = "the download") -> None:
        problem = self.problem()
        if problem:
            raise ArchiveError(
                f"{what} is not a whole MP4 ({problem}); not archived", retryable=True
            )


def checked_mp4(chunks: Iterable[bytes], what: str = "the download") -> Iterator[bytes]:
    """The chunks, unchanged; raises ArchiveError (retryable) instead of ending when the bytes
    are not a whole MP4. The last chunk is held back until the check passes."""
    structure = Mp4Structure()
    held: bytes | None = None
    for chunk in chunks:
        if not chunk:
            continue
        structure.feed(chunk)
        if held is not None:
            yield held
        held = chunk
    structure.check(what)
    if held is not None:
        yield held


__all__ = ["Mp4Structure", "checked_mp4"]
