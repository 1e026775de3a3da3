"""Overlays on disk: shipped ones in the package, site ones under a root the caller gives.

Layout of the site root (private: 0700 directories, 0600 files, because an
overlay may be marked secret)::

    ROOT/NAME -> .v/NAME.<token>     one symlink per overlay, swapped atomically on every change
    ROOT/.v/NAME.<token>/overlay.json
    ROOT/.v/NAME.<token>/files/etc/hosts.j2

Why the symlink: a change is staged in full, validated (every template
compiled), fsynced and only then published with one rename, so a reader (the
daemon rendering for a booting node) sees the old overlay or the new one,
never half of each; and a refused edit leaves the old one untouched. A site
overlay with a shipped overlay's name shadows it (Warewulf's lesson: shipped
overlays stay pristine; editing one makes a site copy first).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from bootd.durable import fsync_path
from bootd.errors import NotFound, OverlayError
from bootd.overlay.meta import FILES_DIR, META_FILE, FileMeta, OverlayMeta, check_name, check_path, parse_meta
from bootd.overlay.overlay import MAX_BYTES, MAX_FILES, Overlay, load_overlay, walk_files
from bootd.overlay.render import BLOCK, tar_header

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
VERSIONS = ".v"


def write_private(path: Path, data: bytes) -> None:
    """Write a file 0600 and fsync it (the caller renames or publishes the directory it is in)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


class OverlayStore:
    def __init__(self, root: Path, builtin: Path | None = BUILTIN_DIR) -> None:
        self.root = Path(root)
        self.builtin = builtin
        self._cache: dict[str, Overlay] = {}

    # -- reading ----------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """Every overlay name and where it comes from ("site" shadows "builtin")."""
        out: dict[str, str] = {}
        if self.builtin is not None and self.builtin.is_dir():
            out.update({p.name: "builtin" for p in self.builtin.iterdir() if p.is_dir()})
        if self.root.is_dir():
            out.update({p.name: "site" for p in self.root.iterdir()
                        if p.is_symlink() and not p.name.startswith(".")})
        return dict(sorted(out.items()))

    def locate(self, name: str) -> tuple[Path, str]:
        check_name(name)
        site = self.root / name
        if site.is_symlink():
            return site.resolve(), "site"
        if self.builtin is not None and (self.builtin / name).is_dir():
            return self.builtin / name, "builtin"
        known = ", ".join(self.names()) or "none"
        raise NotFound(f"no overlay {name!r} (overlays: {known})")

    def load(self, name: str) -> Overlay:
        """Load and compile, cached per published version (a change publishes a new directory)."""
        path, source = self.locate(name)
        cached = self._cache.get(name)
        if cached is not None and cached.path == path:
            return cached
        overlay = load_overlay(path, name, source)
        self._cache[name] = overlay  # replaces the previous version's entry: one per name
        return overlay

    def load_many(self, names: Sequence[str]) -> list[Overlay]:
        return [self.load(n) for n in names]

    # -- writing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stage(self, name: str) -> Path:
        versions = self.root / VERSIONS
        versions.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = versions / f"{name}.{secrets.token_hex(6)}"
        path.mkdir(mode=0o700)
        fsync_path(versions)
        return path

    def _publish(self, name: str, staged: Path) -> Overlay:
        """Validate the staged tree, then swap the symlink; on refusal the staged tree is removed."""
        try:
            overlay = load_overlay(staged, name, "site")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        for dirpath, _dirs, _files in os.walk(staged):
            fsync_path(Path(dirpath))
        link = self.root / name
        old = link.resolve() if link.is_symlink() else None
        tmp_link = self.root / f".{name}.{secrets.token_hex(6)}.lnk"
        os.symlink(staged.relative_to(self.root), tmp_link)
        os.replace(tmp_link, link)
        fsync_path(self.root)
        if old is not None and old != staged.resolve():
            shutil.rmtree(old, ignore_errors=True)
        return overlay

    def _write_tree(self, staged: Path, meta: OverlayMeta, files: dict[str, bytes]) -> None:
        write_private(staged / META_FILE, meta.dumps().encode())
        (staged / FILES_DIR).mkdir(mode=0o700, exist_ok=True)
        for rel, data in files.items():
            write_private(staged / FILES_DIR / check_path(rel), data)

    def create(self, name: str, meta: OverlayMeta, files: dict[str, bytes] | None = None) -> Overlay:
        check_name(name)
        with self._locked():
            if name in self.names():
                raise OverlayError(f"overlay {name!r} already exists ({self.names()[name]}); "
                                   "use edit or import --replace")
            staged = self._stage(name)
            try:
                self._write_tree(staged, meta, files or {})
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._publish(name, staged)

    def import_tree(self, name: str, source: Path, *, replace: bool = False) -> Overlay:
        """Import a directory or tar: an overlay (overlay.json + files/) or a plain tree of files.

        A plain tree keeps each file's executable bit in the metadata; owners are root.
        """
        check_name(name)
        with self._locked():
            source_kind = self.names().get(name)
            if source_kind == "site" and not replace:
                raise OverlayError(f"overlay {name!r} already exists; add --replace to replace it")
            staged = self._stage(name)
            try:
                with contextlib.ExitStack() as stack:
                    if source.is_dir():
                        tree = source
                    elif source.is_file():
                        tree = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.root / VERSIONS)))
                        _extract(source, tree)
                        tops = list(tree.iterdir())
                        if len(tops) == 1 and (tops[0] / META_FILE).is_file():  # exported as NAME/overlay.json
                            tree = tops[0]
                    else:
                        raise OverlayError(f"{source}: no such file or directory")
                    _copy_overlay(tree, staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._publish(name, staged)

    def checkout(self, name: str, into: Path) -> Path:
        """Copy an overlay (site or shipped) into a private work directory for editing."""
        path, _ = self.locate(name)
        dest = into / name
        shutil.copytree(path, dest, symlinks=True)
        for p in [dest, *dest.rglob("*")]:
            p.chmod(0o700 if p.is_dir() else 0o600)
        return dest

    def commit(self, name: str, tree: Path) -> Overlay:
        """Publish an edited work tree as the site overlay ``name`` (refused, unchanged, if it does not load)."""
        check_name(name)
        with self._locked():
            staged = self._stage(name)
            try:
                _copy_overlay(tree, staged)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
            return self._publish(name, staged)

    def delete(self, name: str) -> None:
        check_name(name)
        with self._locked():
            link = self.root / name
            if not link.is_symlink():
                if self.builtin is not None and (self.builtin / name).is_dir():
                    raise OverlayError(f"overlay {name!r} is shipped with bootd and cannot be deleted "
                                       "(unassign it; a site overlay of the same name would shadow it)")
                raise NotFound(f"no overlay {name!r}")
            target = link.resolve()
            link.unlink()
            fsync_path(self.root)
            shutil.rmtree(target, ignore_errors=True)

    def export(self, name: str, out: BinaryIO) -> int:
        """Write the overlay's source (overlay.json + files/) as a deterministic tar; returns bytes written."""
        path, _ = self.locate(name)
        n = 0
        entries = [META_FILE] if (path / META_FILE).exists() else []
        entries += [f"{FILES_DIR}/{rel}" for rel in walk_files(path / FILES_DIR)]
        for rel in entries:
            data = (path / rel).read_bytes()
            mode = 0o755 if (path / rel).stat().st_mode & 0o100 else 0o644
            block = tar_header(rel, size=len(data), mode=mode, owner=0, group=0, mtime=0, typeflag=b"0")
            pad = b"\0" * (-len(data) % BLOCK)
            for chunk in (block, data, pad):
                out.write(chunk)
                n += len(chunk)
        out.write(b"\0" * (2 * BLOCK))
        return n + 2 * BLOCK


def _copy_overlay(tree: Path, staged: Path) -> None:
    """Copy an overlay layout, or a plain tree as files/, into ``staged`` with private modes."""
    is_overlay = (tree / META_FILE).is_file() or (tree / FILES_DIR).is_dir()
    files_root = tree / FILES_DIR if is_overlay else tree
    rels = walk_files(files_root)
    if len(rels) > MAX_FILES:
        raise OverlayError(f"{tree}: {len(rels)} files, more than the limit of {MAX_FILES}")
    if _tree_bytes(files_root) > MAX_BYTES:
        raise OverlayError(f"{tree}: larger than the limit of {MAX_BYTES} bytes")
    if is_overlay:
        meta_text = (tree / META_FILE).read_text() if (tree / META_FILE).is_file() else ""
        parse_meta(meta_text)  # refuse early, with the key, before copying anything big
        write_private(staged / META_FILE, meta_text.encode())
    else:
        files = {rel: FileMeta(mode=0o755) for rel in rels if (files_root / rel).stat().st_mode & stat.S_IXUSR}
        write_private(staged / META_FILE, OverlayMeta(files=files).dumps().encode())
    (staged / FILES_DIR).mkdir(mode=0o700, exist_ok=True)
    for rel in rels:
        write_private(staged / FILES_DIR / rel, (files_root / rel).read_bytes())


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a tar safely: regular files and directories only, inside ``dest``, bounded in size."""
    try:
        tf = tarfile.open(archive)  # noqa: SIM115 (the with below closes it; open errors need their own message)
    except (tarfile.TarError, OSError) as exc:
        raise OverlayError(f"{archive}: not a tar archive ({exc})") from None
    total = 0
    with tf:
        members = tf.getmembers()
        if len(members) > MAX_FILES:
            raise OverlayError(f"{archive}: {len(members)} entries, more than the limit of {MAX_FILES}")
        for m in members:
            name = m.name.removeprefix("./")
            if m.isdir() or name in ("", "."):
                continue
            if not m.isfile():
                raise OverlayError(f"{archive}: {m.name}: only regular files and directories can be imported")
            rel = check_path(name, f"{archive}: member")
            total += m.size
            if total > MAX_BYTES:
                raise OverlayError(f"{archive}: larger than the limit of {MAX_BYTES} bytes")
            fh = tf.extractfile(m)
            assert fh is not None
            data = fh.read()
            write_private(dest / rel, data)
            if m.mode & 0o100:
                (dest / rel).chmod(0o700)


def read_source_file(store: OverlayStore, name: str, rel: str) -> bytes:
    path, _ = store.locate(name)
    target = path / FILES_DIR / check_path(rel)
    if not target.is_file():
        raise NotFound(f"overlay {name} has no file {rel!r}")
    return target.read_bytes()


