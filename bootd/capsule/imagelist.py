"""The image list: the chunk list of a capsule version's squashfs image (see bootd.capsule.image). Pure.

Image list (text, ASCII, LF line ends)::

    BDIMAGE1 squashfs <capsule version id> <image bytes> <chunk count>
    <sha256 hex> <size, 8 hex digits> <size, 8 hex digits>     (one line per chunk, in image order)

The chunk lines are exactly the stage one's fetch table (``bootd-fetch``: sha256, stored and raw size),
so the node hands them to the fetcher as they are. Stored as a chunk itself, its sha256 (the image id)
pins every byte of the image.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootd.capsule.manifest import is_hex_digest
from bootd.errors import CapsuleError

IMAGE_KINDS = ("squashfs",)
MAGIC = "BDIMAGE1"
DEFAULT_CHUNK = 1024 * 1024
MAX_CHUNKS = 1 << 20
_LINE = re.compile(r"([0-9a-f]{64}) ([0-9a-f]{8}) ([0-9a-f]{8})")


@dataclass(frozen=True)
class ImageChunk:
    sha256: str
    size: int


@dataclass(frozen=True)
class ImageList:
    """The decoded image list: which version it was made from and its chunks in order."""

    kind: str
    version: str
    size: int
    chunks: tuple[ImageChunk, ...]

    def encode(self) -> bytes:
        lines = [f"{MAGIC} {self.kind} {self.version} {self.size} {len(self.chunks)}"]
        lines += [f"{c.sha256} {c.size:08x} {c.size:08x}" for c in self.chunks]
        return ("\n".join(lines) + "\n").encode("ascii")

    @property
    def image_id(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()


def decode_image_list(data: bytes, image_id: str | None = None) -> ImageList:
    """Parse an image list, refusing anything that is not exactly one (and, given ``image_id``, not it)."""
    if image_id is not None and hashlib.sha256(data).hexdigest() != image_id:
        raise CapsuleError(f"image list {image_id} does not hash to its id: the bytes are not the list")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CapsuleError("image list is not ASCII text") from None
    if not text.endswith("\n"):
        raise CapsuleError("image list does not end with a newline (truncated?)")
    lines = text[:-1].split("\n")
    head = lines[0].split(" ")
    if len(head) != 5 or head[0] != MAGIC:
        raise CapsuleError(f"image list has no '{MAGIC} KIND VERSION SIZE COUNT' header line: {lines[0][:80]!r}")
    _, kind, version, size_s, count_s = head
    if kind not in IMAGE_KINDS:
        raise CapsuleError(f"image list names kind {kind!r}; known: {', '.join(IMAGE_KINDS)}")
    if not is_hex_digest(version) or not size_s.isdigit() or not count_s.isdigit():
        raise CapsuleError(f"image list header is malformed: {lines[0][:120]!r}")
    count = int(count_s)
    if count != len(lines) - 1:
        raise CapsuleError(f"image list header says {count} chunks, the list has {len(lines) - 1}")
    chunks = []
    for n, line in enumerate(lines[1:], start=2):
        m = _LINE.fullmatch(line)
        if m is None or m.group(2) != m.group(3):
            raise CapsuleError(f"image list line {n} is not '<sha256> <size hex8> <size hex8>': {line[:100]!r}")
        chunks.append(ImageChunk(m.group(1), int(m.group(2), 16)))
    if sum(c.size for c in chunks) != int(size_s):
        raise CapsuleError(f"image list chunks add up to {sum(c.size for c in chunks)} bytes, "
                           f"the header says {size_s}")
    return ImageList(kind, version, int(size_s), tuple(chunks))


def cut_image(path: Path, chunk_size: int, put: Callable[[str, bytes], None]) -> list[ImageChunk]:
    """Cut the file at ``path`` into ``chunk_size`` pieces (the last may be shorter), hand each to ``put``."""
    if chunk_size < 4096:
        raise CapsuleError(f"image chunk size {chunk_size} is below 4096 bytes")
    chunks: list[ImageChunk] = []
    with open(path, "rb") as f:
        while piece := f.read(chunk_size):
            h = hashlib.sha256(piece).hexdigest()
            put(h, piece)
            chunks.append(ImageChunk(h, len(piece)))
    if len(chunks) > MAX_CHUNKS:
        raise CapsuleError(f"image of {len(chunks)} chunks is over the limit of {MAX_CHUNKS}; raise the chunk size")
    return chunks
