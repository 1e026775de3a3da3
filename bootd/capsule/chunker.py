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


def iter_chunks(stream: ReadInto, params: ChunkParams) -> Iterator[memoryview]:
    """Yield the chunks of ``stream``; each view is valid only until the next one is taken."""
    params.validate()
    cdc = FastCDC(params.avg_size, min_size=params.min_size, max_size=params.max_size,
                  normalized_chunking=1, seed=0)
    for chunk in cdc.cut_stream(stream):
        yield chunk.data
