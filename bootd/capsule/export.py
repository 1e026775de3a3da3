"""Write a capsule version back out as the tar stream it was made from."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from bootd.capsule.store import CapsuleStore, _describe_oserror
from bootd.errors import CapsuleError


def write_archive(
    store: CapsuleStore, vid: str, out: BinaryIO, progress: Callable[[int], None] | None = None,
) -> int:
    """Stream the verified, decompressed chunks of ``vid`` to ``out``; returns bytes written.

    Each chunk is checked against the manifest before it is written, so a damaged
    store cannot produce a silently wrong tarball.
    """
    manifest = store.load_manifest(vid)
    d = zstandard.ZstdDecompressor()
    total = 0
    for ref in manifest.chunks:
        try:
            data = store.chunk_path(ref.sha256).read_bytes()
        except FileNotFoundError:
            raise CapsuleError(f"chunk {ref.sha256} of {vid} is missing; run verify") from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise CapsuleError(f"chunk {ref.sha256} of {vid} is corrupt (sha256 mismatch); run verify")
        raw = d.decompress(data, max_output_size=max(ref.raw_size, 1))
        if len(raw) != ref.raw_size:
            raise CapsuleError(f"chunk {ref.sha256} of {vid} has raw size {len(raw)}, expected {ref.raw_size}")
        out.write(raw)
        total += len(raw)
        if progress is not None:
            progress(len(raw))
    return total


def export_version(
    store: CapsuleStore, vid: str, dest: Path | str, progress: Callable[[int], None] | None = None,
) -> int:
    """Export to ``dest`` ('-' for stdout) atomically: a partial file never carries the final name."""
    if str(dest) == "-":
        return write_archive(store, vid, sys.stdout.buffer, progress)
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            n = write_archive(store, vid, f, progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _describe_oserror(exc, f"exporting {vid[:12]} to {dest}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return n
