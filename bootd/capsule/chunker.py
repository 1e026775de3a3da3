"""Content-defined chunking of the archive stream (FastCDC 2020, via pyfastcdc).

Cut points depend on the bytes around them, not on offsets, so inserting or
changing one file moves only the cuts next to it: every later chunk keeps its
hash and is already in the store. That is what makes an update of a 1 GiB
capsule cost a few MiB of new chunks instead of a new copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pyfastcdc import FastCDC

from bootd.errors import CapsuleError


class ReadInto(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


@dataclass(frozen=True, slots=True)
class ChunkParams:
    """Chunk size bounds in bytes; recorded in the manifest because they shape every cut."""

    min_size: int = 256 * 1024
    avg_size: int = 1024 * 1024
    max_size: int = 4 * 1024 * 1024

    def validate(self) -> None:
        if not 64 <= self.min_size <= self.avg_size <= self.max_size:
            raise CapsuleError(
                f"chunk sizes must satisfy 64 <= min ({self.min_size}) <= avg ({self.avg_size}) "
                f"<= max ({self.max_size})"
            )
        if self.min_size > 1 << 20 or self.avg_size > 4 << 20 or self.max_size > 16 << 20:
            raise CapsuleError("chunk sizes too large: min <= 1 MiB, avg <= 4 MiB, max <= 16 MiB")
        if self.max_size < 1024 or self.avg_size < 256:
            raise CapsuleError("chunk sizes too small: avg >= 256 B, max >= 1 KiB")

    def as_meta(self) -> dict[str, Any]:
        return {"algorithm": "fastcdc2020", "min": self.min_size, "avg": self.avg_size,
                "max": self.max_size, "normalization": 1, "seed": 0}


class Block:
    """One reusable buffer of the archive stream; chunks are views into it."""

    __slots__ = ("buf", "refs", "retired", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.refs = 0  # chunks handed out and not yet released
        self.retired = False  # the cutter has moved on to another block


class ChunkCutter:
    """FastCDC cuts of a stream, read into large recycled blocks.

    Same cut points as ``FastCDC.cut_stream`` (each cut looks at up to ``max_size`` bytes
    from the chunk start, fewer only at the end of the stream), but every chunk is a view
    into a block that stays valid until the caller ``release``s it, so chunks go to the
    compressor threads without a copy. (cut_stream's views are overwritten by its next
    read, and it moves its unread tail to the front of its buffer after every chunk.)
    Only the partial chunk at the end of a block is copied, into the next block. Blocks
    return to a free list once all their chunks are released: memory stays at a few blocks.
    """

    def __init__(self, stream: ReadInto, params: ChunkParams, block_size: int = 0) -> None:
        params.validate()
        self.params = params
        self.stream = stream
        self.block_size = max(block_size or 16 << 20, 4 * params.max_size)
        self.cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                           normalized_chunking=1, seed=0)
        self._free: list[Block] = []
        self.blocks = 0  # allocated so far (tests check that they are recycled)

    def _take(self) -> Block:
        if self._free:
            b = self._free.pop()
            b.retired = False
            return b
        self.blocks += 1
        return Block(self.block_size)

    def _retire(self, b: Block) -> None:
        b.retired = True
        if b.refs == 0:
            self._free.append(b)

    def release(self, b: Block) -> None:
        """A chunk taken from ``b`` is no longer needed."""
        b.refs -= 1
        if b.refs == 0 and b.retired:
            self._free.append(b)

    def __iter__(self) -> Iterator[tuple[memoryview, Block]]:
        max_size, size = self.params.max_size, self.block_size
        cur = self._take()
        pos = filled = 0
        eof = False
        while True:
            if not eof:
                if size - pos < max_size:  # too little room left: carry the tail over
                    nxt = self._take()
                    nxt.view[:filled - pos] = cur.view[pos:filled]
                    self._retire(cur)
                    cur, filled, pos = nxt, filled - pos, 0
                while filled < size:
                    n = self.stream.readinto(cur.view[filled:])
                    if not n:
                        eof = True
                        break
                    filled += n
            if pos == filled:
                break
            # Take only cuts that saw max_size bytes (or the end of the stream), as cut_stream does.
            last = filled if eof else filled - max_size
            cuts = self.cdc.cut_buf(cur.view[pos:filled])
            while pos <= last and pos < filled:
                n = next(cuts).length
                cur.refs += 1
                yield cur.view[pos:pos + n], cur
                pos += n
        self._retire(cur)
