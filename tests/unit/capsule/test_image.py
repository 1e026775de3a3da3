"""The squashfs image of a capsule version: the image list format (pure), the build (real mksquashfs and tar,
cached, once under concurrency, nothing visible after a failure) and gc keeping what a kept version needs."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from bootd.capsule.image import ImageStore
from bootd.capsule.imagelist import ImageChunk, ImageList, cut_image, decode_image_list
from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.errors import CapsuleError

VID = "ab" * 32


def _listing(*sizes: int) -> ImageList:
    chunks = tuple(ImageChunk(hashlib.sha256(str(i).encode()).hexdigest(), s) for i, s in enumerate(sizes))
    return ImageList("squashfs", VID, sum(sizes), chunks)


def test_list_round_trip_and_id() -> None:
    listing = _listing(4096, 100)
    data = listing.encode()
    assert data.startswith(f"BDIMAGE1 squashfs {VID} 4196 2\n".encode())
    assert data.splitlines()[1].endswith(b" 00001000 00001000")
    assert decode_image_list(data, listing.image_id) == listing
    assert listing.image_id == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda d: d.replace(b"BDIMAGE1", b"BDIMAGE2"), "header line"),
    (lambda d: d[:-1], "newline"),
    (lambda d: d.replace(b" 2\n", b" 3\n", 1), "says 3 chunks"),
    (lambda d: d.replace(b"4196", b"4197", 1), "add up to 4196"),
    (lambda d: d.replace(b"00001000 00001000", b"00001000 00001001"), "line 2"),
    (lambda d: d.replace(b"squashfs", b"erofs", 1), "kind 'erofs'"),
    (lambda d: d + b"\xff\n", "ASCII"),
])
def test_list_refuses_malformed(mutate: object, why: str) -> None:
    data = mutate(_listing(4096, 100).encode())  # type: ignore[operator]
    with pytest.raises(CapsuleError, match=why):
        decode_image_list(data)


def test_list_refuses_bytes_that_are_not_the_id() -> None:
    listing = _listing(4096)
    with pytest.raises(CapsuleError, match="does not hash to its id"):
        decode_image_list(listing.encode(), "0" * 64)


def test_cut_image_fixed_size(tmp_path: Path) -> None:
    f = tmp_path / "img"
    data = os.urandom(10_000)
    f.write_bytes(data)
    got: dict[str, bytes] = {}
    chunks = cut_image(f, 4096, lambda h, b: got.__setitem__(h, b))
    assert [c.size for c in chunks] == [4096, 4096, 1808]
    assert b"".join(got[c.sha256] for c in chunks) == data
    assert all(hashlib.sha256(got[c.sha256]).hexdigest() == c.sha256 for c in chunks)
    with pytest.raises(CapsuleError, match="below 4096"):
        cut_image(f, 1000, lambda h, b: None)


needs_tools = pytest.mark.skipif(shutil.which("mksquashfs") is None or os.geteuid() != 0,
                                 reason="needs squashfs-tools and root")


def _tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("x\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(300_000))
    os.chown(root / "etc" / "hostname", 1234, 5678)
    (root / "bin" / "tool").chmod(0o4755)
    return root


@needs_tools
def test_build_cached_and_served_from_chunks(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    vid = import_capsule(store, "t", _tree(tmp_path / "tree")).version
    images = ImageStore(store, chunk_size=64 * 1024)
    assert images.cached(vid) is None
    image_id = images.ensure(vid)
    assert images.cached(vid) == image_id == images.ensure(vid)
    listing = images.load(image_id)
    assert listing.version == vid and len(listing.chunks) > 1
    img = tmp_path / "img.sqfs"
    img.write_bytes(b"".join(store.chunk_path(c.sha256).read_bytes() for c in listing.chunks))
    assert img.stat().st_size == listing.size
    # The chunks are the squashfs: unsquashfs lists the tree with its owners and modes.
    out = subprocess.run(["unsquashfs", "-lln", str(img)], capture_output=True, text=True, check=True).stdout
    assert "1234/5678" in out and "/etc/hostname" in out
    assert any(line.startswith("-rwsr-xr-x") and line.endswith("/bin/tool") for line in out.splitlines())
    assert not list((store.root / "tmp").iterdir())  # the staging is gone
    # Reproducible: another server with the same version makes the same image (the same id on every server).
    other = CapsuleStore(tmp_path / "other")
    assert import_capsule(other, "t", tmp_path / "tree").version == vid
    assert ImageStore(other, chunk_size=64 * 1024).ensure(vid) == image_id


@needs_tools
def test_concurrent_first_uses_build_once(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    vid = import_capsule(store, "t", _tree(tmp_path / "tree")).version
    calls: list[str] = []
    ids: list[str] = []

    def use() -> None:
        ids.append(ImageStore(store).ensure(vid, progress=calls.append))

    threads = [threading.Thread(target=use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(ids)) == 1 and len(ids) == 3
    assert sum("mksquashfs" in c for c in calls) == 1


@needs_tools
def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    vid = import_capsule(store, "t", _tree(tmp_path / "tree")).version
    before = {p for p in (store.root / "chunks").rglob("*") if p.is_file()}
    fake = tmp_path / "mksquashfs"
    fake.write_text("#!/bin/sh\necho 'no space left' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(CapsuleError, match=r"mksquashfs failed .*no space left"):
        ImageStore(store, mksquashfs=str(fake)).ensure(vid)
    assert ImageStore(store).cached(vid) is None
    assert {p for p in (store.root / "chunks").rglob("*") if p.is_file()} == before
    assert not list((store.root / "tmp").iterdir())


@needs_tools
def test_gc_keeps_image_of_kept_version_and_drops_the_rest(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    vid = import_capsule(store, "t", _tree(tmp_path / "tree")).version
    images = ImageStore(store, chunk_size=64 * 1024)
    image_id = images.ensure(vid)
    store.gc()
    listing = images.load(image_id)  # still whole
    assert all(store.chunk_path(c.sha256).exists() for c in listing.chunks)
    store.delete("t")
    store.gc()
    assert images.cached(vid) is None
    assert not store.chunk_path(image_id).exists()
    assert not any(store.chunk_path(c.sha256).exists() for c in listing.chunks)


@needs_tools
def test_cli_makes_the_image_then_shows_it(tmp_path: Path) -> None:
    import json
    import sys

    store = CapsuleStore(tmp_path / "state" / "capsules")
    vid = import_capsule(store, "t", _tree(tmp_path / "tree")).version
    conf = tmp_path / "bootd.toml"
    conf.write_text(f'[server]\nstate_dir = "{tmp_path / "state"}"\n[capsule]\nimage_chunk = 65536\n')
    cmd = [sys.executable, "-m", "bootd", "-c", str(conf), "capsule", "image", "t", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(first.stdout)
    assert data["version"] == vid and data["image"] == ImageStore(store).cached(vid)
    assert data["chunks"] == len(ImageStore(store).load(data["image"]).chunks) > 1
    assert "mksquashfs" in first.stderr  # the progress of the build
    again = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout)["image"] == data["image"] and "mksquashfs" not in again.stderr
