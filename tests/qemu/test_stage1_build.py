"""The stage-one build: reproducible bytes, a complete image (the copied GNU tar and zstd and the compiled
bootd-fetch really run from it), and a module load order that puts every dependency first."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
import zstandard

from bootd.stage1.build import BuildResult, CpioEntry, Stage1Error, build, compile_fetcher, write_cpio


def test_two_builds_are_byte_identical(stage1: BuildResult, tmp_path: Path) -> None:
    again = build(tmp_path / "again", log=lambda m: None, kernel_package=stage1.kernel.package)
    assert again.initramfs_sha256 == stage1.initramfs_sha256
    assert again.vmlinuz_sha256 == stage1.vmlinuz_sha256
    assert (tmp_path / "again" / "stage1.json").read_bytes() == (stage1.out_dir / "stage1.json").read_bytes()


def test_load_order_puts_dependencies_first(stage1: BuildResult) -> None:
    order = list(stage1.load_order)
    assert "virtio_net" in order and "virtio_pci" in order
    for mod in order:
        for dep in stage1.kernel.depends.get(mod, ()):
            assert order.index(dep) < order.index(mod), f"{dep} must load before {mod}"


def unpack(stage1: BuildResult, dest: Path) -> Path:
    dest.mkdir()
    raw = stage1.initramfs.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zstandard.ZstdDecompressor().decompress(raw)
    subprocess.run(["cpio", "-idm", "--quiet"], input=data, cwd=dest, check=True)
    return dest


def test_image_contents_run_on_their_own(stage1: BuildResult, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = unpack(stage1, tmp_path / "root")
    assert os.major((root / "dev/console").stat().st_rdev) == 5
    assert (root / "init").stat().st_mode & 0o111
    kver = stage1.kernel.kver
    assert (root / f"lib/modules/{kver}/load-order").read_text().split() == list(stage1.load_order)
    # Only the libraries the build copied exist inside: if one were missing, these would not start.
    tar = subprocess.run(["chroot", str(root), "/usr/bin/tar", "--version"], capture_output=True, text=True)
    assert tar.returncode == 0 and "GNU tar" in tar.stdout, tar.stderr
    zstd = subprocess.run(["chroot", str(root), "/usr/bin/zstd", "--version"], capture_output=True, text=True)
    assert zstd.returncode == 0, zstd.stderr
    if (root / "usr/bin/openssl").exists():
        ossl = subprocess.run(["chroot", str(root), "/usr/bin/openssl", "dgst", "-sha256", "-r", "/init"],
                              capture_output=True, text=True)
        assert ossl.returncode == 0 and len(ossl.stdout.split()[0]) == 64, ossl.stderr
    # The compiled fetcher is static (the image has no libcrypto) and accepts an IPv4 bootd URL.
    fetch = subprocess.run(["chroot", str(root), "/usr/bin/bootd-fetch", "-c", "-u", "http://10.0.2.2:8080"],
                           capture_output=True, text=True)
    assert fetch.returncode == 0, fetch.stderr
    for script in ("/bootd/agent.sh", "/bootd/overlay.sh", "/bootd/node-agent.sh"):
        sh = subprocess.run(["chroot", str(root), "/bin/sh", "-n", script], capture_output=True, text=True)
        assert sh.returncode == 0, (script, sh.stderr)
    # busybox's own tar must not shadow GNU tar on the agent's PATH.
    assert not (root / "bin/tar").exists()


def test_cpio_writer_round_trips_through_gnu_cpio(tmp_path: Path) -> None:
    entries = {
        "a": CpioEntry(0o040755),
        "a/file": CpioEntry(0o100644, b"hello\n"),
        "a/link": CpioEntry(0o120777, b"file"),
        "odd name": CpioEntry(0o100600, b"x" * 1001),
    }
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=write_cpio(entries), capture_output=True,
                             check=True).stdout.decode().split("\n")
    assert [x for x in listing if x] == sorted(entries)


def test_fetcher_compiles_warnings_clean_and_reproducibly(tmp_path: Path) -> None:
    try:
        a = compile_fetcher(tmp_path / "a" / "bootd-fetch", extra_flags=("-Werror",))
    except Stage1Error as exc:
        if "apt-get install" in str(exc):
            pytest.skip(str(exc))
        raise
    b = compile_fetcher(tmp_path / "b" / "bootd-fetch")
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_mode & 0o111
    ldd = subprocess.run(["ldd", str(a)], capture_output=True, text=True)
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr or "statically linked" in ldd.stdout
    # Only http://IPv4[:port] URLs: for anything else the agent keeps its shell workers.
    for url, ok in (("http://192.0.2.1", True), ("http://192.0.2.1:8080/prefix", True),
                    ("http://bootd.example:8080", False), ("https://192.0.2.1", False),
                    # Several sources: the first must be usable, a later unusable one is skipped.
                    ("http://192.0.2.1,http://192.0.2.2:8080", True), ("http://192.0.2.1,http://bootd.example", True),
                    ("http://bootd.example,http://192.0.2.1", False), (",", False)):
        assert (subprocess.run([str(a), "-c", "-u", url]).returncode == 0) is ok, url


def test_missing_compiler_is_named_with_its_package(tmp_path: Path) -> None:
    with pytest.raises(Stage1Error, match="apt-get install gcc"):
        compile_fetcher(tmp_path / "bootd-fetch", cc="/nonexistent/gcc")
