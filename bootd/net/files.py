"""Serving files: the open-file cache shared by HTTP and TFTP, and HTTP's ranges, ETags and header blocks.

Content-addressed objects never change, and a boot wave fetches the same few
files hundreds of times, so both transports keep open file objects and their
sizes in one LRU cache (as nginx's ``open_file_cache`` does): a cache hit costs
no system call, and every transfer of one file shares one descriptor (each
counts against RLIMIT_NOFILE beside the sockets).  Mutable files (stage one,
NBPs, the TFTP root) are re-validated with one ``stat`` per request and
reopened when they changed; a transfer that is using the old file keeps it
until it ends.

Nothing here imports aiohttp: the TFTP transport uses the cache too, and the
header-block builders are plain string joins the chunk fast path also sends.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO

IMMUTABLE = "public, max-age=31536000, immutable"
OCTET = "application/octet-stream"


class OpenFile:
    """A cached open file; ``refs`` counts responses using it so eviction never closes it mid-send."""

    __slots__ = ("checked", "evicted", "file", "head", "ident", "key", "path", "refs", "size", "verified")

    def __init__(self, key: str, path: str, file: IO[bytes], st: os.stat_result, now: float,
                 verified: bool = False) -> None:
        self.key = key
        self.path = path
        self.file = file
        self.size = st.st_size
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.refs = 0
        self.evicted = False
        self.checked = now
        self.head: bytes | None = None  # a whole-chunk 200's header block up to its Date: chunk_head
        self.verified = verified  # its bytes were hashed against its name when it was opened

    @property
    def etag(self) -> str:
        _, ino, size, mtime = self.ident
        return f'"{ino:x}-{size:x}-{mtime:x}"'

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``: a TFTP session's FileSource (pread keeps no shared position)."""
        return os.pread(self.file.fileno(), n, offset)


class CorruptObject(OSError):
    """A content-addressed file whose bytes no longer hash to its name."""


class OpenFileCache:
    """LRU of open files keyed by object name.

    ``valid`` is how long an entry of an immutable object is trusted before one
    ``stat`` checks the path still names the same file (garbage collection may
    delete a chunk; a re-import may recreate it), or, for one hashed at open,
    before it is hashed again (see ``take``).  ``revalidate=True`` lookups
    (mutable files) stat on every request and reopen when the file changed.
    All calls are synchronous: open/fstat of a local file take microseconds,
    far less than a thread-pool hop.

    ``keep_unused=False`` closes a file as soon as no transfer uses it (TFTP:
    boot files are few and fetched in waves, and an idle descriptor helps
    nobody); ``follow_symlinks=False`` opens with O_NOFOLLOW, for callers that
    resolved the path themselves and must not be raced into following a link.
    """

    def __init__(self, max_entries: int = 2048, valid: float = 60.0, *, keep_unused: bool = True,
                 follow_symlinks: bool = True) -> None:
        self.max_entries = max_entries
        self.valid = valid
        self.keep_unused = keep_unused
        self._flags = os.O_RDONLY | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
        self._entries: OrderedDict[str, OpenFile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, key: str, path: Callable[[], Path | str], *, revalidate: bool = False,
                sha256: str | None = None, root: str | None = None) -> OpenFile:
        """Return an open file for ``key`` (refcount taken); raises OSError like open() would.

        With ``sha256``, a file is hashed when it is opened (once per cache entry,
        not per request) and refused with CorruptObject when it does not match:
        a content-addressed object that rotted on disk is never served as valid.
        With ``root`` (a real path), the file actually opened must lie beneath it,
        checked on the open descriptor, so a symlink swapped in between the
        resolve and the open cannot lead out either (OutsideRoot).
        """
        entry = self.take(key, revalidate=revalidate)
        if entry is None:
            self.misses += 1
            entry = self._open(key, str(path()), sha256, root)
            entry.refs += 1
        return entry

    def take(self, key: str, *, revalidate: bool = False) -> OpenFile | None:
        """The open entry for ``key`` with a reference taken (a hit), or None when the caller must open it.

        Inside ``valid`` an immutable object's entry costs no system call.  After it (or on every
        call with ``revalidate``) one ``stat`` confirms the path still names the same file, which
        is then trusted for another ``valid``; a changed or vanished file's entry is dropped.  An
        entry that was hashed at open (``sha256``) is not confirmed by a stat but hashed again, so
        a file that rots in place is served for at most ``valid`` (README, "Not promised"): None,
        and the entry stays until the new one replaces it (``adopt``; ``Sender.open_verified`` does
        it off the event loop).  Nothing is opened or hashed here, so the chunk fast path can ask.
        """
        entry = self._entries.get(key)
        if entry is None:
            return None
        if revalidate or time.monotonic() - entry.checked > self.valid:
            if entry.verified:
                return None
            if not self._still_valid(entry):
                self._drop(entry)
                return None
            entry.checked = time.monotonic()
        self._entries.move_to_end(key)
        self.hits += 1
        entry.refs += 1
        return entry

    def release(self, entry: OpenFile) -> None:
        entry.refs -= 1
        if entry.refs > 0:
            return
        if entry.evicted:
            entry.file.close()
        elif not self.keep_unused:
            self._drop(entry)

    def close(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry)

    def _still_valid(self, entry: OpenFile) -> bool:
        try:
            st = os.stat(entry.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == entry.ident

    def prepare(self, key: str, path: str, sha256: str | None = None, root: str | None = None) -> OpenFile:
        """Open (and hash) a file without touching the cache: safe on a worker thread.

        Hashing a 16 MiB chunk takes tens of milliseconds; the HTTP server does it off the event
        loop, then hands the result to ``adopt`` on the loop's thread.
        """
        fd = os.open(path, self._flags)
        try:
            if root is not None and not beneath(root, os.readlink(f"/proc/self/fd/{fd}")):
                raise OutsideRoot(f"{path} leads outside {root}")
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{path} is not a regular file")
            file = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - lives in the cache
        except BaseException:
            os.close(fd)
            raise
        if sha256 is not None:
            got = hashlib.file_digest(file, "sha256").hexdigest()
            if got != sha256:
                file.close()
                raise CorruptObject(f"{path} is corrupt on the server: its sha256 is {got}")
        return OpenFile(key, path, file, st, time.monotonic(), verified=sha256 is not None)

    def adopt(self, entry: OpenFile) -> None:
        """Put a prepared entry in the cache (replacing an older one of the same key)."""
        old = self._entries.get(entry.key)
        if old is not None:
            self._drop(old)
        self._entries[entry.key] = entry
        while len(self._entries) > self.max_entries:
            _, oldest = self._entries.popitem(last=False)
            self._retire(oldest)

    def _open(self, key: str, path: str, sha256: str | None = None, root: str | None = None) -> OpenFile:
        entry = self.prepare(key, path, sha256, root)
        self.adopt(entry)
        return entry

    def _drop(self, entry: OpenFile) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self._retire(entry)

    def _retire(self, entry: OpenFile) -> None:
        entry.evicted = True
        if entry.refs <= 0:
            entry.file.close()


class OutsideRoot(PermissionError):
    """A requested name that resolves (through a symlink) to a file outside the configured root."""


def beneath(root: str, real: str) -> bool:
    """Is the real path ``real`` the root itself or inside it?"""
    return real == root or real.startswith(root.rstrip("/") + "/")


def resolve_beneath(root: str | os.PathLike[str], rel: str) -> tuple[str, str]:
    """(real root, real path) of ``rel`` under ``root``; OutsideRoot if it leads out.

    The one place HTTP and TFTP decide "inside the root": symlinks are followed only while they
    stay beneath it (as openat2's RESOLVE_BENEATH would), and the open itself is checked again on
    its descriptor (OpenFileCache.acquire's ``root``).
    """
    real_root = os.path.realpath(os.fspath(root))
    real = os.path.realpath(os.path.join(real_root, rel.lstrip("/")))
    if not beneath(real_root, real):
        raise OutsideRoot(f"{rel!r} leads outside {real_root}")
    return real_root, real


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range as (start, count); None means "ignore Range, send it all".

    Multiple ranges and malformed headers are ignored (RFC 9110 allows it; a
    chunk is small, and nobody needs multipart/byteranges).  An unsatisfiable
    range raises ValueError so the caller can answer 416.
    """
    if not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep:
        return None
    first, last = first.strip(), last.strip()
    if not (first + last).isascii() or (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        n = min(n, size)
        return size - n, n
    start = int(first)
    end = int(last) if last else max(start, size - 1)
    if end < start:
        return None
    if start >= size:
        raise ValueError("range starts past the end")
    end = min(end, size - 1)
    return start, end - start + 1


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses weak comparison: W/"x" matches "x"."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def object_headers(tag: str, immutable: bool) -> dict[str, str]:
    """The caching headers of every file response (ETag, then Cache-Control and Accept-Ranges)."""
    return {"ETag": tag, "Cache-Control": IMMUTABLE if immutable else "no-cache", "Accept-Ranges": "bytes"}


def head_start(status: int, headers: dict[str, str], count: int) -> bytes:
    """A 200/206 header block up to the value of its Date line, the only part that changes by itself."""
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Partial Content'}"]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    lines.append(f"Content-Length: {count}\r\nDate: ")
    return "\r\n".join(lines).encode("latin-1")


def response_head(status: int, headers: dict[str, str], count: int, connection: str | None = None) -> bytes:
    """The header block of a 200/206 whose body is written straight to the socket after it.

    A few string joins instead of aiohttp's CIMultiDict serialisation (bench/http).
    """
    end = _HEAD_END if connection is None else b"\r\nServer: bootd\r\nConnection: %s\r\n\r\n" % connection.encode()
    return head_start(status, headers, count) + http_date() + end


_HEAD_END = b"\r\nServer: bootd\r\n\r\n"


def chunk_head(entry: OpenFile) -> bytes:
    """The header block of a whole-chunk 200 (the route's too): built once per open chunk but its Date."""
    start = entry.head
    if start is None:
        start = entry.head = head_start(200, {**object_headers(f'"{entry.key}"', True), "Content-Type": OCTET},
                                        entry.size)
    return start + http_date() + _HEAD_END


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """IMF-fixdate of now, formatted once per second (it is on every response)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]

