"""Re-check a stored capsule version against its manifest.

Every chunk is re-hashed (the hash names the stored bytes, so this catches bit
rot and truncation without trusting anything on disk) and decompressed to check
its raw size, on a thread pool since hashlib and zstandard release the GIL.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard

from bootd.capsule.manifest import ChunkRef
from bootd.capsule.objects import CapsuleStore
from bootd.errors import CapsuleError


@dataclass
class VerifyReport:
    version: str
    chunks: int = 0
    checked_bytes: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)  # {"sha256", "problem"} (kernel: "kernel")

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "ok": self.ok, "chunks": self.chunks,
                "checked_bytes": self.checked_bytes, "bad": self.bad}


class BadChunk(CapsuleError):
    """A stored chunk that does not match its manifest record; ``problem`` says how."""

    def __init__(self, sha256: str, problem: str) -> None:
        self.sha256 = sha256
        self.problem = problem
        super().__init__(f"chunk {sha256} is bad: {problem}")


def read_chunk(store: CapsuleStore, ref: ChunkRef, dctx: zstandard.ZstdDecompressor) -> bytes:
    """The raw bytes of one stored chunk, checked against its manifest record.

    The one place that decides whether a chunk is good (verify lists the bad
    ones, export refuses them): stored size, sha256 of the stored bytes, that
    it decompresses, and its raw size. Raises BadChunk.
    """
    path = store.chunk_path(ref.sha256)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadChunk(ref.sha256, "missing") from None
    except OSError as exc:
        raise BadChunk(ref.sha256, f"unreadable: {exc.strerror}") from None
    if len(data) != ref.stored_size:
        raise BadChunk(ref.sha256, f"stored size {len(data)} != {ref.stored_size} in manifest")
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise BadChunk(ref.sha256, "sha256 mismatch")
    try:
        raw = dctx.decompress(data, max_output_size=max(ref.raw_size, 1))
    except zstandard.ZstdError as exc:
        raise BadChunk(ref.sha256, f"does not decompress: {exc}") from None
    if len(raw) != ref.raw_size:
        raise BadChunk(ref.sha256, f"raw size {len(raw)} != {ref.raw_size} in manifest")
    return raw


def _check_chunk(store: CapsuleStore, ref: ChunkRef, local: threading.local) -> str | None:
    d = getattr(local, "d", None)
    if d is None:
        d = local.d = zstandard.ZstdDecompressor()
    try:
        read_chunk(store, ref, d)
    except BadChunk as exc:
        return exc.problem
    return None


def verify_version(
    store: CapsuleStore, vid: str, progress: Callable[[int], None] | None = None, workers: int = 0,
) -> VerifyReport:
    """Check manifest, kernel and every chunk; never raises for bad chunks, lists them instead."""
    manifest = store.load_manifest(vid)  # raises CapsuleError if the manifest itself is bad
    report = VerifyReport(version=vid, chunks=len(manifest.chunks))
    kernel = manifest.kernel
    if kernel is not None:
        try:
            h = hashlib.sha256()
            n = 0
            with open(store.kernel_path(kernel.sha256), "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
                    n += len(block)
            if h.hexdigest() != kernel.sha256 or n != kernel.size:
                report.bad.append({"kind": "kernel", "sha256": kernel.sha256, "problem": "sha256 mismatch"})
        except FileNotFoundError:
            report.bad.append({"kind": "kernel", "sha256": kernel.sha256, "problem": "missing"})
        except OSError as exc:
            raise CapsuleError(f"cannot read kernel {kernel.sha256}: {exc.strerror}") from exc
    local = threading.local()
    unique = list({c.sha256: c for c in manifest.chunks}.values())
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        for ref, problem in zip(unique, pool.map(lambda c: _check_chunk(store, c, local), unique),
                                strict=True):
            report.checked_bytes += ref.raw_size
            if progress is not None:
                progress(ref.raw_size)
            if problem is not None:
                report.bad.append({"kind": "chunk", "sha256": ref.sha256, "problem": problem})
    return report
