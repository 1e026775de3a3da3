"""Image hygiene drops host identity and apt caches from what is imported, never from the source."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from bootd.capsule.archive import LNK, REG, walk_directory
from bootd.capsule.export import write_archive
from bootd.capsule.hygiene import HygieneReport, clean_entries, transform
from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore

MASTER = {b"etc/resolv.conf": b"nameserver 10.9.8.7\n", b"etc/hostname": b"master\n"}


def dirty_tree(root: Path) -> Path:
    files = {
        "etc/ssh/ssh_host_ed25519_key": b"PRIVATE", "etc/ssh/ssh_host_ed25519_key.pub": b"PUBLIC",
        "etc/ssh/ssh_host_rsa_key": b"PRIVATE", "etc/ssh/sshd_config": b"Port 22\n",
        "etc/machine-id": b"0123456789abcdef0123456789abcdef\n", "var/lib/dbus/machine-id": b"0123\n",
        "etc/resolv.conf": MASTER[b"etc/resolv.conf"], "etc/hostname": b"master\n",
        "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease": b"x" * 1000,
        "var/lib/apt/lists/lock": b"", "var/lib/apt/lists/partial/junk": b"j",
        "var/cache/apt/pkgcache.bin": b"p" * 500, "var/cache/apt/srcpkgcache.bin": b"s" * 500,
        "var/cache/apt/archives/hello_2.10_amd64.deb": b"d" * 300, "var/cache/apt/archives/lock": b"",
        "var/cache/apt/archives/partial/x.deb": b"x",
        "usr/bin/tool": b"#!/bin/sh\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.link(root / "etc/ssh/ssh_host_rsa_key", root / "etc/ssh/zz-hardlink-to-key")
    return root


def test_clean_entries_removes_identity_and_caches_and_reports_it(tmp_path: Path) -> None:
    tree = dirty_tree(tmp_path / "t")
    report = HygieneReport()
    out = clean_entries(walk_directory(tree), MASTER, report)
    paths = {e.path.decode() for e in out}
    for gone in ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub", "etc/ssh/ssh_host_rsa_key",
                 "var/lib/dbus/machine-id", "etc/resolv.conf", "etc/hostname",
                 "var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease",
                 "var/lib/apt/lists/partial/junk", "var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin",
                 "var/cache/apt/archives/hello_2.10_amd64.deb", "var/cache/apt/archives/partial/x.deb"):
        assert gone not in paths, gone
    for kept in ("etc/ssh/sshd_config", "var/lib/apt/lists", "var/lib/apt/lists/lock", "var/lib/apt/lists/partial",
                 "var/cache/apt/archives/lock", "var/cache/apt/archives/partial", "usr/bin/tool"):
        assert kept in paths, kept
    mid = next(e for e in out if e.path == b"etc/machine-id")
    assert mid.kind == REG and mid.size == 0
    # The hard link to a removed key keeps its (own) content as a plain file, not a dangling link.
    heir = next(e for e in out if e.path == b"etc/ssh/zz-hardlink-to-key")
    assert heir.kind == REG and heir.size == len(b"PRIVATE")
    summary = "\n".join(report.summary())
    assert "removed 3 ssh host keys (20 bytes)" in summary
    assert "removed 4 apt cache files (1301 bytes)" in summary
    assert "removed 2 apt lists (1001 bytes)" in summary
    assert "copies of the master's /etc/resolv.conf" in summary and "emptied /etc/machine-id" in summary
    assert (tree / "etc/ssh/ssh_host_rsa_key").exists()  # the source is never touched


def test_files_that_differ_from_the_masters_stay(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/resolv.conf").write_bytes(b"nameserver 10.0.0.1\n")
    (tree / "etc/hostname").write_bytes(b"node-template\n")
    (tree / "etc/machine-id").write_bytes(b"")
    (tree / "var/lib/dbus").mkdir(parents=True)
    (tree / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    report = HygieneReport()
    out = clean_entries(walk_directory(tree), MASTER, report)
    assert {e.path for e in out} >= {b"etc/resolv.conf", b"etc/hostname", b"etc/machine-id"}
    assert report.summary() == ["removed 1 copies of the machine id (0 bytes)"]
    assert all(e.kind != LNK for e in out)


def test_import_with_hygiene_exports_a_clean_tree(tmp_path: Path) -> None:
    tree = dirty_tree(tmp_path / "t")
    store = CapsuleStore(tmp_path / "s")
    report = HygieneReport()
    r = import_capsule(store, "x", tree, transform=transform(report, MASTER))
    buf = io.BytesIO()
    write_archive(store, r.version, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        names = set(tf.getnames())
        f = tf.extractfile("./etc/machine-id")
        assert f is not None and f.read() == b""
    assert "./etc/ssh/ssh_host_rsa_key" not in names and "./etc/ssh/sshd_config" in names
    assert report.removed
