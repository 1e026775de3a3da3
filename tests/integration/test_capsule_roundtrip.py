"""Every file type through import -> export -> GNU tar extract (needs root for devices and owners)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from bootd.capsule.export import export_version
from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from tests.unit.capsule.trees import SMALL, fix_times, make_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (device nodes, owners, xattrs)")

# A v2 file capability blob for cap_net_raw+ep, as setcap writes it.
CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")


def build_every_type(root: Path) -> None:
    make_tree(root, files=12)
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    os.chown(root / "suid", 1234, 5678)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "data").write_bytes(os.urandom(300_000))
    (root / "data-hardlink").hardlink_to(root / "data")
    (root / "bin" / "also-data").hardlink_to(root / "data")
    (root / "abs-link").symlink_to("/etc/passwd")
    (root / "dangling").symlink_to("no/such/file")
    os.lchown(root / "dangling", 42, 43)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "loop200", 0o660 | stat.S_IFBLK, os.makedev(7, 200))
    os.mkfifo(root / "fifo", 0o640)
    (root / "ping").write_bytes(b"\x7fELF fake")
    os.chmod(root / "ping", 0o755)
    os.setxattr(root / "ping", "security.capability", CAP_NET_RAW_EP)
    os.setxattr(root / "data", "user.origin", b"bootd-test")
    deep = root / ("long-directory-name-" * 4) / ("x" * 60)
    deep.mkdir(parents=True)
    (deep / "file-with-a-long-name.txt").write_bytes(b"deep")
    (root / "unicod\u00e9-\u6587\u4ef6").write_bytes(b"utf8")
    (root / "empty").write_bytes(b"")
    fix_times(root, 1_650_000_000)
    os.utime(root / "data", (1_600_000_000, 1_600_000_000))


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything the archive promises to keep, per path (inode groups for hardlinks)."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*sorted(dirnames), *sorted(filenames), ""]:
            p = Path(dirpath) / name if name else Path(dirpath)
            rel = str(p.relative_to(root))
            if rel in out:
                continue
            st = os.lstat(p)
            content: object = None
            if stat.S_ISREG(st.st_mode):
                content = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                xattrs = {k: os.getxattr(p, k) for k in sorted(os.listxattr(p))
                          if k.startswith(("security.capability", "user."))}
            link_group = None
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link_group = inodes.setdefault(st.st_ino, rel)
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, int(st.st_mtime) if not stat.S_ISDIR(st.st_mode)
                        else None, rdev, content, tuple(xattrs.items()), link_group)
    return out


def test_every_file_type_round_trips_through_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_every_type(src)
    store = CapsuleStore(tmp_path / "store")
    r = import_capsule(store, "all", src, options=SMALL)
    tarball = tmp_path / "all.tar"
    export_version(store, r.version, tarball)
    dest = tmp_path / "dest"
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tarball),
                    "-C", str(dest)], check=True)
    before, after = snapshot(src), snapshot(dest)
    assert sorted(before) == sorted(after)
    for path in before:
        assert before[path] == after[path], path
    # Directory mtimes (set after their contents by GNU tar) survive too.
    assert int(os.lstat(dest / "bin").st_mtime) == 1_650_000_000
    assert os.getxattr(dest / "ping", "security.capability") == CAP_NET_RAW_EP
    if shutil.which("getcap"):
        out = subprocess.run(["getcap", str(dest / "ping")], capture_output=True, text=True).stdout
        assert "cap_net_raw" in out


def test_gnu_tar_archive_of_the_tree_gives_the_same_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_every_type(src)
    tarball = tmp_path / "src.tar.xz"
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(src), "-cJf", str(tarball), "."],
                   check=True)
    a = import_capsule(CapsuleStore(tmp_path / "s1"), "dir", src, options=SMALL)
    b = import_capsule(CapsuleStore(tmp_path / "s2"), "tar", tarball, options=SMALL)
    assert a.version == b.version
