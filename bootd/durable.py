"""What "written" means on disk: fsync of a file or directory by name.

A rename or a new directory entry is durable only once its directory is
synced; the capsule store and the overlay store publish that way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync a file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_private(path: Path, data: bytes, *, owner: os.stat_result | None = None) -> None:
    """Publish ``data`` at ``path`` whole or not at all: a 0600 temporary file beside it, fsync, rename,
    fsync of the directory. ``owner``: give the file that uid/gid first (root writing a daemon's file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            if owner is not None:
                os.fchown(fd, owner.st_uid, owner.st_gid)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)
