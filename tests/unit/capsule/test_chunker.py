"""ChunkCutter cuts exactly where pyfastcdc's cut_stream does (the chunk ids depend on it)."""

from __future__ import annotations

import io
import random

import pytest
from pyfastcdc import FastCDC

from bootd.capsule.chunker import ChunkCutter, ChunkParams


class Dribble(io.RawIOBase):
    """A stream that returns short reads of random length, like a tar member boundary does."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.rng = rng

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), len(self.data) - self.pos, self.rng.randint(1, 100_000))
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def stream_bytes(rng: random.Random, size: int) -> bytes:
    """Random runs mixed with repetitive runs, so cuts land both early and at max_size."""
    out = bytearray()
    while len(out) < size:
        n = rng.randint(1, 200_000)
        out += rng.randbytes(n) if rng.random() < 0.5 else bytes([rng.randrange(3)]) * n
    return bytes(out[:size])


def reference(data: bytes, p: ChunkParams) -> list[int]:
    cdc = FastCDC(p.avg_size, min_size=p.min_size, max_size=p.max_size, normalized_chunking=1, seed=0)
    return [c.length for c in cdc.cut_stream(io.BytesIO(data))]


@pytest.mark.parametrize("seed", range(12))
def test_cuts_match_cut_stream(seed: int) -> None:
    rng = random.Random(seed)
    mn = rng.choice([64, 1024, 16 * 1024])
    avg = max(256, mn * rng.choice([1, 2, 4]))
    p = ChunkParams(mn, avg, max(1024, avg * rng.choice([1, 2, 4, 8])))
    size = rng.choice([0, 1, p.min_size, p.max_size - 1, p.max_size, p.max_size + 1, 3 << 20])
    data = stream_bytes(rng, size + rng.randint(0, 3000) * (size > 1))
    cutter = ChunkCutter(Dribble(data, rng), p, block_size=4 * p.max_size + rng.randint(0, 4096))
    held, lengths, out = [], [], bytearray()
    for view, block in cutter:
        lengths.append(len(view))
        out += view
        held.append(block)
        if len(held) > 5:  # like the importer: release a few chunks behind
            cutter.release(held.pop(0))
    assert lengths == reference(data, p)
    assert out == data


def test_chunks_stay_valid_until_released_and_blocks_are_reused() -> None:
    rng = random.Random(7)
    p = ChunkParams(1024, 4096, 16 * 1024)
    data = stream_bytes(rng, 4 << 20)
    cutter = ChunkCutter(Dribble(data, rng), p, block_size=64 * 1024)
    pending: list[tuple[memoryview, bytes, object]] = []
    pos = 0
    for view, block in cutter:
        pending.append((view, data[pos:pos + len(view)], block))
        pos += len(view)
        if len(pending) > 8:
            v, expect, b = pending.pop(0)
            assert v == expect  # not overwritten by the reads since it was cut
            cutter.release(b)  # type: ignore[arg-type]
    for v, expect, _ in pending:
        assert v == expect
    assert pos == len(data)
    # 4 MiB through 64 KiB blocks: blocks come back and are reused, memory stays bounded.
    assert cutter.blocks <= 8


def test_default_block_is_large() -> None:
    cutter = ChunkCutter(io.BytesIO(b""), ChunkParams())
    assert cutter.block_size >= 4 * ChunkParams().max_size
    assert list(cutter) == []
