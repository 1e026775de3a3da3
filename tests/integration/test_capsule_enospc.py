"""A full disk fails the import with a clear error and changes nothing (root: mounts a small tmpfs)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.verify import verify_version
from bootd.errors import CapsuleError
from tests.unit.capsule.trees import SMALL, make_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0755", "bootd-capsule-test", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def test_full_disk_gives_clear_error_and_changes_nothing(tmp_path: Path, small_fs: Path) -> None:
    store = CapsuleStore(small_fs / "capsules")
    small = make_tree(tmp_path / "small-tree", files=6, mean_size=16 * 1024)
    old = import_capsule(store, "base", small, options=SMALL)
    before = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*"))

    big = tmp_path / "big-tree"
    big.mkdir()
    for i in range(8):
        (big / f"blob{i}").write_bytes(os.urandom(1 << 20))  # incompressible, 8 MiB > 3 MiB fs
    with pytest.raises(CapsuleError, match="no space left on device"):
        import_capsule(store, "other", big, options=dataclasses.replace(SMALL, processes=True))
    fds = len(os.listdir("/proc/self/fd"))  # (after the process pool: it leaves a resource-tracker pipe)
    with pytest.raises(CapsuleError, match="no space left on device"):
        import_capsule(store, "base", big, options=SMALL)
    with pytest.raises(CapsuleError, match="no space left on device"):
        import_capsule(store, "other", big, options=dataclasses.replace(SMALL, durable=True))
    assert len(os.listdir("/proc/self/fd")) == fds  # chunk files handed to the I/O threads are all closed

    assert store.names() == {"base": old.version}
    assert sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")) == before
    assert verify_version(store, old.version).ok
