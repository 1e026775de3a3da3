"""A capsule version as a compressed filesystem image (squashfs), for nodes whose root stays compressed in RAM.

Why: a node in the ``tmpfs`` root mode pays the capsule's whole unpacked size in RAM for as long as it
runs. In the ``squashfs`` mode it keeps a squashfs of the tree in one file on a tmpfs (about a third of
the size at zstd level 3), loop-mounts it read-only and writes into an overlayfs upper on a tmpfs.

The image is derived from a version, so it is made once per version (at first use) and cached; it is
stored like everything else: cut into fixed-size chunks, each named by its sha256 and stored under
``chunks/`` (raw: squashfs is compressed already), so ``GET /chunks/<sha256>`` serves and verifies them
with no new route. The chunk list is itself a chunk (the *image list*), so its sha256, the *image id*,
pins every byte of the image the way the version id pins the capsule: the boot line carries it
(``bootd.image=``) and the node verifies the list, then each chunk, before one byte is mounted
(bootd.capsule.imagelist). ``images/<version id>.squashfs`` holds the image id of a version (written
last, atomically, under the store lock): an image is there whole or not at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from bootd.capsule.export import write_archive
from bootd.capsule.imagelist import DEFAULT_CHUNK, IMAGE_KINDS, ImageList, cut_image, decode_image_list
from bootd.capsule.manifest import is_hex_digest
from bootd.capsule.objects import CapsuleStore, Staging, describe_oserror
from bootd.durable import fsync_path, replace_private
from bootd.errors import CapsuleError

log = logging.getLogger("bootd.capsule.image")


class ImageStore:
    """The squashfs images of a capsule store's versions: lookup, build (once, atomically) and gc roots."""

    def __init__(self, store: CapsuleStore, chunk_size: int = DEFAULT_CHUNK, zstd_level: int = 3,
                 mksquashfs: str = "mksquashfs", tar: str = "tar") -> None:
        self.store = store
        self.dir = store.root / "images"
        self.chunk_size = chunk_size
        self.zstd_level = zstd_level
        self.mksquashfs = mksquashfs
        self.tar = tar

    def index_path(self, vid: str, kind: str = "squashfs") -> Path:
        if not is_hex_digest(vid):
            raise CapsuleError(f"invalid capsule version id {vid!r}: expected 64 lowercase hex digits")
        return self.dir / f"{vid}.{kind}"

    def cached(self, vid: str, kind: str = "squashfs") -> str | None:
        """The image id of ``vid``'s image if it is built (its list and chunks are in the store), else None."""
        try:
            text = self.index_path(vid, kind).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CapsuleError(f"cannot read {self.index_path(vid, kind)}: {exc.strerror}") from exc
        if not is_hex_digest(text):
            raise CapsuleError(f"image index {self.index_path(vid, kind)} is corrupt: {text[:80]!r}")
        return text

    def load(self, image_id: str) -> ImageList:
        try:
            data = self.store.chunk_path(image_id).read_bytes()
        except FileNotFoundError:
            raise CapsuleError(f"image list {image_id} is not in the store") from None
        return decode_image_list(data, image_id)

    def versions(self) -> dict[str, str]:
        """Version id -> image id of every built image (gc's roots)."""
        out: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                vid, _, kind = name.partition(".")
                if kind in IMAGE_KINDS and is_hex_digest(vid):
                    image = self.cached(vid, kind)
                    if image is not None:
                        out[vid] = image
        return out

    @contextlib.contextmanager
    def _building(self, vid: str) -> Iterator[None]:
        """One build per version at a time, across processes (the daemon, the CLI)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.dir / f".{vid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def ensure(self, vid: str, progress: Callable[[str], None] | None = None) -> str:
        """The image id of ``vid``'s squashfs image, built now if it is not yet (blocking: minutes for GBs).

        Concurrent callers build it once: the others wait on the lock and find it built.
        """
        say = progress or (lambda msg: log.info("event=image %s", msg))
        found = self.cached(vid)
        if found is not None:
            return found
        with self._building(vid):
            found = self.cached(vid)
            if found is not None:
                return found
            return self._build(vid, say)

    def _build(self, vid: str, say: Callable[[str], None]) -> str:
        if os.geteuid() != 0:
            raise CapsuleError("building a squashfs image needs root (the tree is unpacked with its owners, devices "
                               f"and capabilities before mksquashfs reads it); bootd runs as uid {os.geteuid()}")
        if shutil.which(self.mksquashfs) is None:
            raise CapsuleError(f"{self.mksquashfs} not found: install squashfs-tools to boot nodes in the "
                               "squashfs root mode")
        manifest = self.store.load_manifest(vid)
        self.store.ensure_layout()
        with Staging(self.store) as staging:
            tree = staging.dir / "tree"
            tree.mkdir(mode=0o755)
            say(f"capsule {vid[:12]}: unpacking {manifest.raw_size} bytes for its squashfs image")
            self._unpack(vid, tree)
            img = staging.dir / "image.squashfs"
            say(f"capsule {vid[:12]}: mksquashfs (zstd level {self.zstd_level})")
            cmd = [self.mksquashfs, str(tree), str(img), "-noappend", "-no-progress", "-quiet", "-comp", "zstd",
                   "-Xcompression-level", str(self.zstd_level), "-mkfs-time", "0"]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
            if done.returncode != 0:
                raise CapsuleError(f"mksquashfs failed for capsule {vid[:12]} (exit {done.returncode}): "
                                   f"{done.stderr.decode(errors='replace').strip()[-400:]}")
            shutil.rmtree(tree)
            try:
                return self._publish(vid, img, staging, say)
            except OSError as exc:
                raise describe_oserror(exc, f"storing the squashfs image of {vid[:12]}") from exc

    def _unpack(self, vid: str, tree: Path) -> None:
        """The version's verified tar stream into ``tree`` with owners, modes, devices and xattrs."""
        tar = subprocess.Popen([self.tar, "-C", str(tree), "--xattrs", "--xattrs-include=*", "--numeric-owner",
                                "-xpf", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert tar.stdin is not None and tar.stderr is not None
        try:
            write_archive(self.store, vid, cast(BinaryIO, tar.stdin))
            tar.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            tar.kill()
            tar.wait()
            raise
        err = tar.stderr.read().decode(errors="replace").strip()
        if tar.wait() != 0:
            raise CapsuleError(f"unpacking capsule {vid[:12]} for its image failed: {err[-400:]}")

    def _publish(self, vid: str, img: Path, staging: Staging, say: Callable[[str], None]) -> str:
        def put(h: str, data: bytes) -> None:
            if staging.adopt_existing(h):
                return
            path = staging.staged_chunk(h)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)

        chunks = cut_image(img, self.chunk_size, put)
        listing = ImageList("squashfs", vid, img.stat().st_size, tuple(chunks))
        image_id = listing.image_id
        put(image_id, listing.encode())
        img.unlink()
        store = self.store
        with store.locked():
            dirs: set[Path] = set()
            for h in dict.fromkeys([*(c.sha256 for c in chunks), image_id]):
                dest = store.chunk_path(h)
                dest.parent.mkdir(exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(staging.staged_chunk(h), dest)
                    dirs.add(dest.parent)
            for d in sorted(dirs):
                fsync_path(d)
            # Last, under the store lock (gc reads the index under it): the image exists from here on.
            replace_private(self.index_path(vid), (image_id + "\n").encode())
        say(f"capsule {vid[:12]}: squashfs image {image_id[:12]} ready, {listing.size} bytes in "
            f"{len(chunks)} chunks ({listing.size * 100 // max(store.load_manifest(vid).raw_size, 1)}% of the tree)")
        return image_id
