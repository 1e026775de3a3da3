"""Deterministic POSIX pax tar stream of a root tree.

Why not ``tarfile``: the capsule id is a hash over this stream, so every byte of
it must depend only on the tree, never on the walk order of the filesystem, the
local user database, the Python version or the time of the import. The writer
below therefore emits a fixed subset of pax:

* entries in name order (depth first, siblings sorted by their raw bytes), the
  root as ``./`` and every other name as ``./path`` (dirs end in ``/``);
* numeric uid/gid only (empty uname/gname), mtime in whole seconds;
* regular files, hardlinks (later names link to the first one in sort order),
  symlinks, character and block devices, fifos and directories; sockets are
  skipped (no tar format can restore them);
* a pax extended header only where ustar cannot hold a value: long or
  non-ASCII names, big numbers, and ``SCHILY.xattr.*`` for extended attributes
  in the ``security.`` and ``user.`` namespaces (file capabilities live in
  ``security.capability``). GNU tar restores them with ``--xattrs --xattrs-include='*'``.

Sources are a directory (walked with lstat) or a tar archive (plain, gz, xz,
bz2 or zstd), which is re-serialised through the same writer in the same order,
so a tree and a tarball of that tree give the same stream.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import lzma
import os
import re
import stat
import tarfile
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from bootd.errors import CapsuleError

BLOCK = 512
XATTR_PREFIXES = (b"security.", b"user.")

REG, LNK, SYM, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"


@dataclass
class Entry:
    """One archive member, independent of where it came from (directory or tar)."""

    path: bytes  # relative to the root, no leading "./"; b"" is the root itself
    kind: bytes  # tar typeflag
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int
    size: int = 0
    linkname: bytes = b""  # symlink target, or hardlink target *path* (relative, like ``path``)
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    opener: Callable[[], BinaryIO] | None = None  # content of a regular file

    @property
    def archive_name(self) -> bytes:
        if not self.path:
            return b"./"
        name = b"./" + self.path
        return name + b"/" if self.kind == DIR else name


def sort_key(path: bytes) -> tuple[bytes, ...]:
    """Depth-first, siblings by raw bytes: the order a sorted recursive walk produces."""
    return tuple(path.split(b"/")) if path else ()


# ---------------------------------------------------------------- header writer


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n).encode()) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _ustar_header(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes,
    linkname: bytes, devmajor: int, devminor: int,
) -> bytes:
    hdr = bytearray(BLOCK)
    hdr[0:len(name)] = name
    hdr[100:108] = _octal(mode, 8)
    hdr[108:116] = _octal(uid, 8)
    hdr[116:124] = _octal(gid, 8)
    hdr[124:136] = _octal(size, 12)
    hdr[136:148] = _octal(mtime, 12)
    hdr[148:156] = b" " * 8
    hdr[156:157] = kind
    hdr[157:157 + len(linkname)] = linkname
    hdr[257:265] = b"ustar\x0000"
    if kind in (CHR, BLK):
        hdr[329:337] = _octal(devmajor, 8)
        hdr[337:345] = _octal(devminor, 8)
    chksum = sum(hdr)
    hdr[148:156] = b"%06o\0 " % chksum
    return bytes(hdr)


def _fits(name: bytes, limit: int) -> bool:
    return len(name) <= limit and name.isascii()


def _padding(size: int) -> int:
    return -size % BLOCK


def entry_header(e: Entry) -> bytes:
    """Header block(s) for one entry: an optional pax 'x' header, then the ustar header."""
    name = e.archive_name
    linkname = b""
    if e.kind == LNK:
        linkname = b"./" + e.linkname
    elif e.kind == SYM:
        linkname = e.linkname
    size = e.size if e.kind == REG else 0
    records: list[bytes] = []
    if not _fits(name, 100):
        records.append(_pax_record(b"path", name))
    if linkname and not _fits(linkname, 100):
        records.append(_pax_record(b"linkpath", linkname))
    uid, gid, mtime, hsize = e.uid, e.gid, e.mtime, size
    if not 0 <= uid < 8**7:
        records.append(_pax_record(b"uid", str(uid).encode()))
        uid = 0
    if not 0 <= gid < 8**7:
        records.append(_pax_record(b"gid", str(gid).encode()))
        gid = 0
    if not 0 <= mtime < 8**11:
        records.append(_pax_record(b"mtime", str(mtime).encode()))
        mtime = 0
    if size >= 8**11:
        records.append(_pax_record(b"size", str(size).encode()))
        hsize = 0
    for key in sorted(e.xattrs):
        records.append(_pax_record(b"SCHILY.xattr." + key, e.xattrs[key]))
    out = []
    if records:
        data = b"".join(records)
        base = name.rstrip(b"/").rsplit(b"/", 1)[-1] or b"root"
        xname = (b"./PaxHeaders/" + base)[:100]
        if not xname.isascii():
            xname = b"./PaxHeaders/entry"
        out.append(_ustar_header(xname, 0o644, 0, 0, len(data), 0, b"x", b"", 0, 0))
        out.append(data + b"\0" * _padding(len(data)))
    out.append(_ustar_header(
        name[:100] if _fits(name, 100) else name[:100].decode("ascii", "replace").encode("ascii", "replace"),
        e.mode & 0o7777, uid, gid, hsize, mtime, e.kind,
        linkname if _fits(linkname, 100) else b"", e.devmajor, e.devminor,
    ))
    return b"".join(out)


class ArchiveStream:
    """A file-like ``readinto`` over the archive of ``entries``.

    File contents are read straight into the caller's buffer (the chunker's), so
    the stream is produced without an intermediate copy and without holding more
    than one buffer of the archive in memory.

    With ``solo_min``, ``boundaries`` gets, for every regular file of at least that
    size, the stream offsets of its header (soft), of its data and of the end of its
    data and padding (hard), for the chunker's member cuts (chunker.py). They are
    appended when the header is queued, so before any byte they point into is read.
    The soft one moves back over the headers of members without data (directories,
    links, empty files) right before it, as far as ``join_max`` bytes: a directory
    then shares the small chunk of the file header after it, not a run's chunk.
    """

    def __init__(self, entries: Iterator[Entry], solo_min: int = 0, join_max: int = 0) -> None:
        self._entries = entries
        self.solo_min = solo_min
        self.join_max = join_max
        self.boundaries: deque[tuple[int, bool]] = deque()
        self._queued = 0  # stream offset just after everything queued so far
        # Starts of the members without data queued since the last one with data, at most join_max back.
        self._bare: deque[int] = deque()
        self._pending = memoryview(b"")
        self._file: BinaryIO | None = None
        self._file_left = 0
        self._file_pad = 0
        self._file_name = b""
        self._done = False
        self.raw_bytes = 0
        self.files = 0

    def _next(self) -> bool:
        try:
            e = next(self._entries)
        except StopIteration:
            if self._done:
                return False
            self._done = True
            self._pending = memoryview(b"\0" * (2 * BLOCK))
            return True
        self.files += 1
        header = entry_header(e)
        self._pending = memoryview(header)
        start = self._queued
        self._queued += len(header)
        if e.kind == REG and e.size > 0:
            data = self._queued
            self._queued += e.size + _padding(e.size)
            if self.solo_min and e.size >= self.solo_min:
                soft = next((s for s in self._bare if start - s <= self.join_max), start)
                self.boundaries.extend(((soft, True), (data, False), (self._queued, False)))
            self._bare.clear()
            if e.opener is None:
                raise CapsuleError(f"no content for {e.path!r}")
            self._file = e.opener()
            self._file_left = e.size
            self._file_pad = _padding(e.size)
            self._file_name = e.path
        elif self.solo_min:
            self._bare.append(start)
            while start - self._bare[0] > self.join_max:
                self._bare.popleft()
        return True

    def readinto(self, buf: memoryview) -> int:
        n = 0
        want = len(buf)
        while n < want:
            if self._pending:
                k = min(len(self._pending), want - n)
                buf[n:n + k] = self._pending[:k]
                self._pending = self._pending[k:]
                n += k
                continue
            if self._file is not None:
                k = min(self._file_left, want - n)
                got = self._file.readinto(buf[n:n + k]) or 0  # type: ignore[attr-defined]
                if got == 0:
                    # The file shrank while we read it: the header already promised
                    # its size, so pad with zeros rather than corrupt the stream.
                    buf[n:n + k] = b"\0" * k
                    got = k
                n += got
                self._file_left -= got
                if self._file_left == 0:
                    self._file.close()
                    self._file = None
                    self._pending = memoryview(b"\0" * self._file_pad)
                continue
            if not self._next():
                break
        self.raw_bytes += n
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ---------------------------------------------------------------- directory source


def _xattrs_of(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for n in names:
        key = os.fsencode(n)
        if key.startswith(XATTR_PREFIXES):
            try:
                out[key] = os.getxattr(path, n, follow_symlinks=False)
            except OSError:
                continue
    return out


def _opener(path: bytes) -> Callable[[], BinaryIO]:
    def open_() -> BinaryIO:
        return open(path, "rb", buffering=0)
    return open_


def walk_directory(root: Path) -> list[Entry]:
    """All entries of the tree under ``root`` in archive order (lstat, never follows links)."""
    rootb = os.fsencode(root)
    try:
        st = os.lstat(rootb)
    except OSError as exc:
        raise CapsuleError(f"cannot read source directory {root}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise CapsuleError(f"source {root} is not a directory")
    out: list[Entry] = [Entry(b"", DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime),
                              xattrs=_xattrs_of(rootb))]
    seen: dict[tuple[int, int], bytes] = {}

    def walk(rel: bytes) -> None:
        full = rootb + b"/" + rel if rel else rootb
        try:
            names = sorted(os.listdir(full))
        except OSError as exc:
            raise CapsuleError(f"cannot list {os.fsdecode(full)}: {exc.strerror}") from exc
        for name in names:
            child_rel = rel + b"/" + name if rel else name
            child = full + b"/" + name
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # vanished while we walked
            mode = st.st_mode
            perm = stat.S_IMODE(mode)
            mtime = int(st.st_mtime)
            if stat.S_ISSOCK(mode):
                continue
            if not stat.S_ISDIR(mode) and st.st_nlink > 1:
                key = (st.st_dev, st.st_ino)
                first = seen.get(key)
                if first is not None:
                    out.append(Entry(child_rel, LNK, perm, st.st_uid, st.st_gid, mtime, linkname=first))
                    continue
                seen[key] = child_rel
            xattrs = _xattrs_of(child)
            if stat.S_ISREG(mode):
                out.append(Entry(child_rel, REG, perm, st.st_uid, st.st_gid, mtime, size=st.st_size,
                                 xattrs=xattrs, opener=_opener(child)))
            elif stat.S_ISDIR(mode):
                out.append(Entry(child_rel, DIR, perm, st.st_uid, st.st_gid, mtime, xattrs=xattrs))
                walk(child_rel)
            elif stat.S_ISLNK(mode):
                out.append(Entry(child_rel, SYM, perm, st.st_uid, st.st_gid, mtime,
                                 linkname=os.readlink(child), xattrs=xattrs))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                out.append(Entry(child_rel, CHR if stat.S_ISCHR(mode) else BLK, perm, st.st_uid, st.st_gid,
                                 mtime, devmajor=os.major(st.st_rdev), devminor=os.minor(st.st_rdev),
                                 xattrs=xattrs))
            elif stat.S_ISFIFO(mode):
                out.append(Entry(child_rel, FIFO, perm, st.st_uid, st.st_gid, mtime, xattrs=xattrs))

    walk(b"")
    return out


# ---------------------------------------------------------------- tar source

_COMPRESSED_MAGIC: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gz"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bz2"),
    (b"\x28\xb5\x2f\xfd", "zst"),
]


def compression_of(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            return name
    return None


def decompress_to(src: Path, dest: Path, kind: str, progress: Callable[[int], None] | None = None) -> None:
    """Spool a compressed tarball to a plain one, so members can be read in sorted order."""
    def opener() -> BinaryIO:
        f: Any
        if kind == "gz":
            f = gzip.open(src, "rb")  # noqa: SIM115
        elif kind == "xz":
            f = lzma.open(src, "rb")  # noqa: SIM115
        elif kind == "bz2":
            f = bz2.open(src, "rb")  # noqa: SIM115
        else:
            f = zstandard.ZstdDecompressor().stream_reader(open(src, "rb"), closefd=True)  # noqa: SIM115
        return cast(BinaryIO, f)
    try:
        with opener() as fin, open(dest, "wb") as fout:
            while True:
                block = fin.read(4 << 20)
                if not block:
                    break
                fout.write(block)
                if progress:
                    progress(len(block))
    except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a real I/O error (e.g. ENOSPC): the importer reports it with its cause
        raise CapsuleError(f"cannot decompress {src} ({kind}): {exc}") from exc


_DOTS = re.compile(rb"(^|/)\.\.(/|$)")


def normalize_member_name(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if _DOTS.search(raw):
        raise CapsuleError(f"tar member {name!r} escapes the root (contains '..'); refusing it")
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    return b"/".join(parts)


def _xattrs_from_pax(pax: dict[str, str]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")
            data = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr."):])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
        else:
            continue
        if name.startswith(XATTR_PREFIXES):
            out[name] = data
    return out


Member = tuple[tarfile.TarFile, tarfile.TarInfo]


def open_tar(path: Path) -> tuple[tarfile.TarFile, list[tarfile.TarInfo]]:
    """An uncompressed tar file and its members, or a CapsuleError that names it."""
    try:
        tf = tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CapsuleError(f"cannot read tar archive {path}: {exc}") from exc
    try:
        return tf, tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        tf.close()
        raise CapsuleError(f"cannot read tar archive {path}: {exc}") from exc


class TarSource:
    """Members of uncompressed tar files, normalised and sorted like ``walk_directory``.

    One archive (``TarSource(path)``), or the merged members of several (container
    image layers, ``TarSource.merged``), each read from the archive it came from.
    """

    def __init__(self, path: Path) -> None:
        tf, members = open_tar(path)
        self.path = path
        self._tfs = [tf]
        by_name: dict[bytes, Member] = {}
        for m in members:
            by_name[normalize_member_name(m.name)] = (tf, m)  # a later duplicate wins, as on extraction
        self._members = by_name

    @classmethod
    def merged(cls, path: Path, tfs: list[tarfile.TarFile], members: dict[bytes, Member]) -> TarSource:
        """A source over ``members`` already merged from ``tfs`` (which it closes)."""
        self = cls.__new__(cls)
        self.path = path
        self._tfs = list(tfs)
        self._members = members
        return self

    def close(self) -> None:
        for tf in self._tfs:
            tf.close()

    def _opener(self, member: Member) -> Callable[[], BinaryIO]:
        tf, m = member

        def open_() -> BinaryIO:
            f: IO[bytes] | None = tf.extractfile(m)
            if f is None:
                raise CapsuleError(f"cannot read tar member {m.name!r}")
            return cast(BinaryIO, f)
        return open_

    def entries(self) -> list[Entry]:
        members = {path: m for path, (_, m) in self._members.items()}
        # Resolve hardlink groups: the sorted-first name carries the content, the rest link to it.
        group_of: dict[bytes, bytes] = {}
        for path, m in members.items():
            if m.islnk():
                target = normalize_member_name(m.linkname)
                hops = 0
                while target in members and members[target].islnk() and hops < 64:
                    target = normalize_member_name(members[target].linkname)
                    hops += 1
                if target not in members:
                    raise CapsuleError(f"tar member {m.name!r} is a hard link to missing {m.linkname!r}")
                group_of[path] = target
        first_of: dict[bytes, bytes] = {}
        for path, target in group_of.items():
            cur = first_of.get(target, target)
            first_of[target] = min(cur, path, key=sort_key)

        out: list[Entry] = []
        if b"" not in members:
            out.append(Entry(b"", DIR, 0o755, 0, 0, 0))
        for path in sorted(members, key=sort_key):
            m = members[path]
            target = group_of.get(path, path)
            src = members[target]
            src_member = self._members[target]
            first = first_of.get(target, path)
            mode, uid, gid, mtime = src.mode & 0o7777, src.uid, src.gid, int(src.mtime)
            if path != first:
                out.append(Entry(path, LNK, mode, uid, gid, mtime, linkname=first))
                continue
            xattrs = _xattrs_from_pax(dict(src.pax_headers))
            if src.isreg():
                out.append(Entry(path, REG, mode, uid, gid, mtime, size=src.size, xattrs=xattrs,
                                 opener=self._opener(src_member)))
            elif src.isdir():
                out.append(Entry(path, DIR, mode, uid, gid, mtime, xattrs=xattrs))
            elif src.issym():
                out.append(Entry(path, SYM, mode, uid, gid, mtime,
                                 linkname=src.linkname.encode("utf-8", "surrogateescape"), xattrs=xattrs))
            elif src.ischr() or src.isblk():
                out.append(Entry(path, CHR if src.ischr() else BLK, mode, uid, gid, mtime,
                                 devmajor=src.devmajor, devminor=src.devminor, xattrs=xattrs))
            elif src.isfifo():
                out.append(Entry(path, FIFO, mode, uid, gid, mtime, xattrs=xattrs))
            # other member types (GNU sparse, volume labels) carry no tree content we keep
        return out
