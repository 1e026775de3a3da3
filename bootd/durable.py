"""What "written" means on disk: fsync of a file or directory by name.

A rename or a new directory entry is durable only once its directory is
synced; the capsule store and the overlay store publish that way.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path | str) -> None:
    """fsync a file or directory by name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
