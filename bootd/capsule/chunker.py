"""Content-defined chunking of the archive stream (FastCDC 2020, via pyfastcdc).

Cut points depend on the bytes around them, not on offsets, so inserting or
changing one file moves only the cuts next to it: every later chunk keeps its
hash and is already in the store. That is what makes an update of a 1 GiB
capsule cost a few MiB of new chunks instead of a new copy.

Member cuts (``ChunkParams.members``, the default): plain CDC over the whole
stream put a file's tar header in the same chunk as megabytes of its (and its
neighbours') data, so a chmod re-stored a MiB, and a new file merged with the
data around it. So the archive writer also reports where each *solo* member
(a regular file of at least ``solo_min`` bytes, default ``min_size``) has its header and its data,
and the cutter always cuts where such a file's data starts and where it ends
(hard cuts), and before its header unless the piece ending there is at most
``join_max`` bytes (a soft cut: a directory header or two join the file's
header instead of making a chunk of a few hundred bytes). Between these cuts
it cuts with FastCDC as before, but the runs of small members between solo
files with sizes divided by ``run_scale`` (a chunk there mixes many files, so
a change to one of them re-stores less); a segment's last piece shorter than
its minimum joins the piece before it when both fit in its maximum. The
stream itself is the same tar stream: only the cut points differ, so nodes
unpack such capsules exactly as before.
"""

from __future__ import annotations

from collections import deque
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
    # Member cuts (see the module docstring). False: plain CDC over the stream, the cuts (and so the
    # version ids) of capsules imported before 2026-12; their manifests keep the old chunker meta.
    members: bool = True
    # A regular file this large gets chunks of its own; 0: min_size. (64 KiB on the debian-hpc capsule:
    # 7x the chunks, a 64 KiB manifest and 6% more stored bytes, small frames compress worse.)
    solo_min: int = 0
    join_max: int = 16 * 1024  # a piece this small before a solo file's header joins the header's chunk
    # Runs of small members (between solo files) are cut with min, avg and max divided by this: a
    # chunk there holds many files' headers and data, so smaller ones make a change to one cost less.
    run_scale: int = 4

    def run_sizes(self) -> tuple[int, int, int]:
        """min, avg and max for the runs between solo files (see run_scale)."""
        s = self.run_scale if self.members else 1
        return max(64, self.min_size // s), max(256, self.avg_size // s), max(1024, self.max_size // s)

    @property
    def solo(self) -> int:
        """The effective solo threshold (``solo_min``, or ``min_size`` (at least 512) when that is 0)."""
        return self.solo_min or max(self.min_size, 512)

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
        if self.members and (self.solo < 512 or self.join_max < 0 or self.run_scale < 1):
            raise CapsuleError(f"member cuts need solo_min >= 512 (got {self.solo}), join_max >= 0 "
                               f"(got {self.join_max}) and run_scale >= 1 (got {self.run_scale})")

    def as_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"algorithm": "fastcdc2020", "min": self.min_size, "avg": self.avg_size,
                                "max": self.max_size, "normalization": 1, "seed": 0}
        if self.members:  # absent for plain CDC, so those manifests keep their bytes (and ids)
            meta["members"] = {"solo_min": self.solo, "join_max": self.join_max, "tail_merge": True,
                               "runs": dict(zip(("min", "avg", "max"), self.run_sizes(), strict=True))}
        return meta


class Block:
    """One reusable buffer of the archive stream; chunks are views into it."""

    __slots__ = ("buf", "refs", "retired", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.refs = 0  # chunks handed out and not yet released
        self.retired = False  # the cutter has moved on to another block


# Forced cut points, in stream offsets and in stream order: (offset, soft). A hard one is always a
# cut; a soft one only if the piece that would end there is longer than ChunkParams.join_max.
Boundaries = deque[tuple[int, bool]]


class ChunkCutter:
    """FastCDC cuts of a stream, read into large recycled blocks.

    Same cut points as ``FastCDC.cut_stream`` (each cut looks at up to ``max_size`` bytes
    from the chunk start, fewer only at the end of the stream), but every chunk is a view
    into a block that stays valid until the caller ``release``s it, so chunks go to the
    compressor threads without a copy. (cut_stream's views are overwritten by its next
    read, and it moves its unread tail to the front of its buffer after every chunk.)
    Only the partial chunk at the end of a block is copied, into the next block. Blocks
    return to a free list once all their chunks are released: memory stays at a few blocks.

    With ``boundaries`` (filled by the stream before it produces the bytes they point into,
    see ArchiveStream), each stretch between two boundaries is cut on its own as if it were
    a whole stream, so the cuts still do not depend on the block size or on short reads.
    """

    def __init__(self, stream: ReadInto, params: ChunkParams, block_size: int = 0,
                 boundaries: Boundaries | None = None) -> None:
        params.validate()
        self.params = params
        self.stream = stream
        self.boundaries = boundaries
        self.block_size = max(block_size or 16 << 20, 4 * params.max_size)
        self.cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                           normalized_chunking=1, seed=0)
        rmin, ravg, rmax = params.run_sizes()
        self.run_cdc = FastCDC(ravg, min_size=rmin, max_size=rmax, normalized_chunking=1, seed=0)
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

    def _segment(self, view: memoryview, soft: bool, run: bool) -> list[int]:
        """The piece lengths of a whole segment (it ends at a boundary or at the end of the stream);
        with a soft boundary, the last piece is left out when it is short enough to join the next."""
        if self.boundaries is None:
            return [c.length for c in self.cdc.cut_buf(view)]
        pieces = [c.length for c in (self.run_cdc if run else self.cdc).cut_buf(view)]
        mn, _, mx = self.params.run_sizes() if run else (self.params.min_size, 0, self.params.max_size)
        if len(pieces) >= 2 and pieces[-1] < mn and pieces[-2] + pieces[-1] <= mx:
            pieces[-2:] = [pieces[-2] + pieces[-1]]
        if soft and pieces and pieces[-1] <= self.params.join_max:
            pieces.pop()
        return pieces

    def __iter__(self) -> Iterator[tuple[memoryview, Block]]:
        max_size, size = self.params.max_size, self.block_size
        bounds = self.boundaries
        cur = self._take()
        pos = filled = 0
        base = 0  # stream offset of cur.view[0]
        eof = False
        while True:
            if not eof:
                if size - pos < max_size:  # too little room left: carry the tail over
                    nxt = self._take()
                    nxt.view[:filled - pos] = cur.view[pos:filled]
                    self._retire(cur)
                    base += pos
                    cur, filled, pos = nxt, filled - pos, 0
                while filled < size:
                    n = self.stream.readinto(cur.view[filled:])
                    if not n:
                        eof = True
                        break
                    filled += n
            if pos == filled:
                break
            end, final, soft, run = filled, eof, False, False
            if bounds is not None:
                while bounds and bounds[0][0] <= base + pos:
                    bounds.popleft()  # a cut is already there (two boundaries at one offset)
                # A run of small members ends at a solo file's header (soft) or at the end of the stream;
                # a boundary not known yet is further than the next solo header, so this is a run too.
                run = not bounds or bounds[0][1]
                if bounds and bounds[0][0] - base <= filled:
                    offset, soft = bounds.popleft()
                    end, final = offset - base, True
            if final:  # the segment is whole in the block: cut it like a stream of its own
                for n in self._segment(cur.view[pos:end], soft, run):
                    cur.refs += 1
                    yield cur.view[pos:pos + n], cur
                    pos += n
                continue
            # Take only cuts that saw max_size bytes, as cut_stream does (the boundary is further).
            last = filled - (self.params.run_sizes()[2] if run else max_size)
            cuts = (self.run_cdc if run else self.cdc).cut_buf(cur.view[pos:filled])
            while pos <= last:
                n = next(cuts).length
                cur.refs += 1
                yield cur.view[pos:pos + n], cur
                pos += n
        self._retire(cur)
