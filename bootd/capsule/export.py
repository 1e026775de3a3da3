"""Write a capsule version back out as the tar stream it was made from."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import zstandard

from bootd.capsule.objects import CapsuleStore, describe_oserror
from bootd.capsule.verify import BadChunk, read_chunk
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
            raw = read_chunk(store, ref, d)
        except BadChunk as exc:
            what = "missing" if exc.problem == "missing" else f"corrupt ({exc.problem})"
            raise CapsuleError(f"chunk {ref.sha256} of {vid} is {what}; run verify") from None
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
        raise describe_oserror(exc, f"exporting {vid[:12]} to {dest}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return n
