"""Deterministic test trees and small helpers shared by the capsule tests."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

from bootd.capsule.chunker import ChunkParams
from bootd.capsule.importer import ImportOptions

# Small chunks so a few-MiB tree has enough chunks for dedup bounds to mean something.
SMALL = ImportOptions(chunk=ChunkParams(16 * 1024, 64 * 1024, 256 * 1024), durable=False)

WORDS = [b"node", b"boot", b"capsule", b"kernel", b"chunk", b"zstd", b"init", b"cluster", b"stateless",
         b"rack", b"switch", b"daemon", b"\n", b"=", b"0", b"1", b"/usr/lib", b"/etc"]


def text_bytes(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += rng.choice(WORDS) + b" "
    return bytes(out[:size])


def make_tree(root: Path, seed: int = 1, files: int = 60, mean_size: int = 96 * 1024) -> Path:
    """A tree of mixed text (compressible) and random (incompressible) files, same bytes every time."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "etc", "usr/lib", "usr/share/doc", "var/log"):
        (root / d).mkdir(parents=True, exist_ok=True)
    dirs = ["bin", "etc", "usr/lib", "usr/share/doc", "var/log"]
    for i in range(files):
        size = int(rng.expovariate(1 / mean_size)) + 1
        data = text_bytes(rng, size) if i % 2 else rng.randbytes(size)
        p = root / dirs[i % len(dirs)] / f"file{i:04d}"
        p.write_bytes(data)
    fix_times(root)
    return root


def fix_times(root: Path, when: int = 1_700_000_000) -> None:
    """Same mtimes everywhere, so copies made at different moments archive identically."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (when, when), follow_symlinks=False)
    os.utime(root, (when, when))


def crc_of(path: Path) -> int:
    return zlib.crc32(path.read_bytes())
