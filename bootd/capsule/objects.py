"""The content-addressed capsule store on disk.

Layout (contract; the HTTP server and the stage one read it)::

    <root>/chunks/<hh>/<sha256>   one zstd frame, named by the sha256 of its stored bytes
    <root>/kernels/<sha256>       raw kernel image
    <root>/manifests/<vid>        manifest bytes, vid = sha256(manifest)
    <root>/refs/<name>            "<vid>\\n", replaced by rename
    <root>/history/<name>         one JSON line per version the name was given (0600), replaced by rename
    <root>/tmp/<import>/          staging of one import, flocked (``lock``) while it lives
    <root>/.lock                  flock: publish, delete and gc exclude each other

Why it is crash safe: an import writes only into its own staging directory.
Publishing hard-links the staged files into place (a name appears complete or
not at all), fsyncs the directories, and only then renames the ref; a ref is
the only thing that makes a version visible. The history is written after the
ref (so a crash can lose a history line, never show a version that is not
there); the current version always comes from the ref. Whatever a crash leaves behind is
unreferenced and ``gc`` removes it. Chunks an import reuses are hard-linked into
its staging directory when found, so a concurrent ``gc`` cannot pull them away
from under it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootd.capsule.imagelist import IMAGE_KINDS, decode_image_list
from bootd.capsule.manifest import Manifest, decode_manifest, is_hex_digest
from bootd.durable import fsync_path
from bootd.errors import CapsuleError, CapsuleNotFound

log = logging.getLogger("bootd.capsule")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise CapsuleError(
            f"invalid capsule name {name!r}: use 1-128 of A-Z a-z 0-9 . _ + -, starting with a letter or digit"
        )
    return name


def describe_oserror(exc: OSError, action: str) -> CapsuleError:
    """An OSError as the CapsuleError an operator can act on (full disk, quota, the path that failed)."""
    if exc.errno == errno.ENOSPC:
        return CapsuleError(f"no space left on device while {action}; nothing was published")
    if exc.errno == errno.EDQUOT:
        return CapsuleError(f"disk quota exceeded while {action}; nothing was published")
    where = f" ({exc.filename})" if exc.filename else ""
    return CapsuleError(f"{action} failed: {exc.strerror or exc}{where}")


@dataclass
class GcReport:
    removed_chunks: int = 0
    removed_kernels: int = 0
    removed_manifests: int = 0
    removed_staging: int = 0
    freed_bytes: int = 0
    kept_versions: list[str] = field(default_factory=list)
    live_imports: int = 0
    dropped_history: int = 0  # history lines of versions the retention rule let go


ORIGINS = ("import", "build", "exec", "rollback", "sync")


@dataclass(frozen=True)
class HistoryRecord:
    """One version a name was given: when, by what, and what it cost the store."""

    time: float
    version: str
    origin: str  # one of ORIGINS
    stored_bytes: int  # the version's stored size (every chunk it lists, once per listing)
    new_bytes: int  # bytes this publish added to the store (chunks and kernel that were not there)
    detail: str = ""  # the source, recipe or command; for a rollback the version it replaced

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "version": self.version, "origin": self.origin,
                "stored_bytes": self.stored_bytes, "new_bytes": self.new_bytes, "detail": self.detail}

    @classmethod
    def from_json(cls, data: Any) -> HistoryRecord:
        if not isinstance(data, dict) or not is_hex_digest(str(data.get("version", ""))):
            raise ValueError("not a history record")
        return cls(float(data["time"]), str(data["version"]), str(data["origin"]), int(data["stored_bytes"]),
                   int(data["new_bytes"]), str(data.get("detail", "")))


class Staging:
    """One import's private directory under tmp/, flocked for as long as the import lives."""

    def __init__(self, store: CapsuleStore) -> None:
        self.store = store
        name = f"import-{os.getpid()}-{time.time_ns():x}"
        self.dir = store.tmp_dir / name
        self.chunks_dir = self.dir / "chunks"
        # Created under the store lock and flocked before the lock is released, so gc
        # never sees a staging directory whose owner has not locked it yet.
        with store.locked():
            try:
                self.chunks_dir.mkdir(parents=True)
                self.lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise describe_oserror(exc, f"creating staging directory {self.dir}") from exc
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)

    def staged_chunk(self, hexhash: str) -> Path:
        return self.chunks_dir / hexhash

    def adopt_existing(self, hexhash: str) -> bool:
        """Hard-link an existing store chunk into staging; False if the store lacks it."""
        dest = self.staged_chunk(hexhash)
        try:
            os.link(self.store.chunk_path(hexhash), dest)
        except FileNotFoundError:
            return False
        except FileExistsError:
            return True  # staged already (the same chunk twice in one import)
        return True

    def close(self) -> None:
        """Drop the staging directory (after publish, or to abandon the import)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


OBJECT_KINDS = ("chunk", "kernel", "manifest")


class ObjectWriter:
    """One object received from another server, written beside the store until it proves itself.

    Every object is named by the sha256 of its bytes (a chunk, a kernel, a manifest whose name is its
    version id), so a copy from anywhere is as good as the original once it hashes to its name.  The
    bytes go to a private file in a flocked staging directory (gc leaves it alone while we live and
    removes it after a crash) and are hashed as they come; ``commit`` refuses them unless the hash and
    the declared size match, fsyncs the file, hard-links it into place under the store lock (a name
    appears complete or not at all, and gc cannot take it between link and use) and fsyncs the directory.
    """

    def __init__(self, staging: Staging, kind: str, name: str, limit: int, size: int | None = None) -> None:
        if kind not in OBJECT_KINDS or not is_hex_digest(name):
            raise CapsuleError(f"cannot receive {kind} {name!r}: expected one of {', '.join(OBJECT_KINDS)} "
                               "named by 64 lowercase hex digits")
        self.staging = staging
        self.kind = kind
        self.name = name
        self.size = size  # the declared size (a manifest's chunk table), when known
        self.limit = size if size is not None else limit
        self.received = 0
        self._hash = hashlib.sha256()
        self.tmp = staging.dir / f"{kind}-{name}-{time.time_ns():x}"
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, data: bytes) -> None:
        """Take the next bytes; more than the declared size (or the limit) is refused at once."""
        if self._fd is None:
            raise CapsuleError(f"{self.kind} {self.name}: write after commit or abort")
        self.received += len(data)
        if self.received > self.limit:
            what = "its declared size" if self.size is not None else "the limit"
            raise CapsuleError(f"{self.kind} {self.name} is longer than {what} of {self.limit} bytes; not stored")
        self._hash.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def check(self) -> None:
        """Raise unless the bytes so far are the whole object (size and sha256)."""
        if self.size is not None and self.received != self.size:
            raise CapsuleError(f"{self.kind} {self.name} has {self.received} bytes where the manifest says "
                               f"{self.size}; not stored")
        got = self._hash.hexdigest()
        if got != self.name:
            raise CapsuleError(f"{self.kind} {self.name} arrived with sha256 {got}: the bytes are not the "
                               "object; not stored")

    def commit(self) -> bool:
        """Verify, make durable and place the object; True if it was new (False: it was there already).

        Blocking (fsync, the store lock): the daemon calls it off the event loop.
        """
        try:
            self.check()
            assert self._fd is not None
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            store = self.staging.store
            dest = store.object_path(self.kind, self.name)
            with store.locked():
                try:
                    os.link(self.tmp, dest)
                except FileExistsError:
                    return False
                fsync_path(dest.parent)
            return True
        except OSError as exc:
            raise describe_oserror(exc, f"storing {self.kind} {self.name}") from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary file (nothing of it was ever visible in the store)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class CapsuleStore:
    """Read API used by the HTTP server, plus the writer side used by import/delete/gc."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.kernels_dir = self.root / "kernels"
        self.manifests_dir = self.root / "manifests"
        self.refs_dir = self.root / "refs"
        self.history_dir = self.root / "history"
        self.tmp_dir = self.root / "tmp"

    # ------------------------------------------------------------ read API (contract)

    def resolve(self, name: str) -> str | None:
        """Version id a name points to now, or None."""
        if not NAME_RE.fullmatch(name):
            return None
        try:
            text = (self.refs_dir / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise CapsuleError(f"cannot read ref {name}: {exc.strerror}") from exc
        if not is_hex_digest(text):
            raise CapsuleError(f"ref {self.refs_dir / name} is corrupt: {text[:80]!r}")
        return text

    def manifest_path(self, vid: str) -> Path:
        if not is_hex_digest(vid):
            raise CapsuleError(f"invalid capsule version id {vid!r}: expected 64 lowercase hex digits")
        return self.manifests_dir / vid

    def chunk_path(self, hexhash: str) -> Path:
        if not is_hex_digest(hexhash):
            raise CapsuleError(f"invalid chunk id {hexhash!r}: expected 64 lowercase hex digits")
        return self.chunks_dir / hexhash[:2] / hexhash

    def kernel_path(self, hexhash: str) -> Path:
        if not is_hex_digest(hexhash):
            raise CapsuleError(f"invalid kernel id {hexhash!r}: expected 64 lowercase hex digits")
        return self.kernels_dir / hexhash

    def object_path(self, kind: str, hexhash: str) -> Path:
        """Where an object of ``kind`` (one of OBJECT_KINDS) named ``hexhash`` lives."""
        if kind == "chunk":
            return self.chunk_path(hexhash)
        if kind == "kernel":
            return self.kernel_path(hexhash)
        if kind == "manifest":
            return self.manifest_path(hexhash)
        raise CapsuleError(f"unknown object kind {kind!r}; expected one of {', '.join(OBJECT_KINDS)}")

    def load_manifest(self, vid: str) -> Manifest:
        """Parse a manifest after checking its bytes hash to ``vid`` (so it is trusted)."""
        return decode_manifest(self.read_manifest_bytes(vid))

    def read_manifest_bytes(self, vid: str) -> bytes:
        path = self.manifest_path(vid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CapsuleError(f"capsule version {vid} not found in {self.manifests_dir}") from None
        except OSError as exc:
            raise CapsuleError(f"cannot read manifest {path}: {exc.strerror}") from exc
        if hashlib.sha256(data).hexdigest() != vid:
            raise CapsuleError(f"manifest {path} is corrupt: its sha256 does not match its name")
        return data

    def names(self) -> dict[str, str]:
        """All refs, name -> version id."""
        out: dict[str, str] = {}
        try:
            entries = sorted(os.listdir(self.refs_dir))
        except FileNotFoundError:
            return out
        for name in entries:
            if not NAME_RE.fullmatch(name):
                continue  # temp files of an in-flight ref update
            vid = self.resolve(name)
            if vid is not None:
                out[name] = vid
        return out

    def history(self, name: str) -> list[HistoryRecord]:
        """Every recorded version of ``name``, oldest first (empty for a store older than history)."""
        check_name(name)
        path = self.history_dir / name
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CapsuleError(f"cannot read history {path}: {exc.strerror}") from exc
        out: list[HistoryRecord] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(HistoryRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as exc:
                raise CapsuleError(f"history {path} line {lineno} is corrupt ({exc}): {line[:80]!r}") from None
        return out

    # ------------------------------------------------------------ helpers

    def find_version(self, name_or_vid: str) -> tuple[str | None, str]:
        """Accept a name, a full version id or a unique prefix (>= 6 hex digits) of a stored one."""
        vid = self.resolve(name_or_vid)
        if vid is not None:
            return name_or_vid, vid
        if is_hex_digest(name_or_vid) and self.manifest_path(name_or_vid).exists():
            return None, name_or_vid
        if re.fullmatch(r"[0-9a-f]{6,63}", name_or_vid):
            matches = [v for v in self.versions() if v.startswith(name_or_vid)]
            if len(matches) == 1:
                return None, matches[0]
            if len(matches) > 1:
                raise CapsuleError(f"version prefix {name_or_vid} is ambiguous ({len(matches)} versions)")
        raise CapsuleNotFound(f"no capsule named {name_or_vid!r} (and no version with that id)")

    def versions(self) -> list[str]:
        try:
            return sorted(v for v in os.listdir(self.manifests_dir) if is_hex_digest(v))
        except FileNotFoundError:
            return []

    def ensure_layout(self) -> None:
        """Create the directories (and all 256 chunk fan-out dirs, so publish never mkdirs)."""
        try:
            for d in (self.chunks_dir, self.kernels_dir, self.manifests_dir, self.refs_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            self.history_dir.mkdir(mode=0o700, exist_ok=True)
            for i in range(256):
                (self.chunks_dir / f"{i:02x}").mkdir(exist_ok=True)
        except OSError as exc:
            raise describe_oserror(exc, f"creating capsule store in {self.root}") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive store lock for the short critical sections (publish, delete, gc)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def begin_import(self) -> Staging:
        self.ensure_layout()
        return Staging(self)

    # ------------------------------------------------------------ writers

    def publish(
        self,
        staging: Staging,
        name: str,
        vid: str,
        manifest: Manifest,
        manifest_file: Path,
        kernel_file: Path | None,
        origin: str = "import",
        detail: str = "",
        modules_file: Path | None = None,
    ) -> int:
        """Make a staged version visible as ``name``; on failure undo what was linked.

        Returns the bytes this publish added to the store: the chunks and kernel it
        linked that were not there yet. A new version of the name is recorded in its
        history with ``origin`` (one of ORIGINS) and ``detail``.
        """
        check_name(name)
        if origin not in ORIGINS:
            raise CapsuleError(f"unknown version origin {origin!r}; expected one of: {', '.join(ORIGINS)}")
        created: list[Path] = []
        dirs: set[Path] = set()
        new_bytes = 0

        def place(src: Path, dest: Path, size: int = 0) -> None:
            nonlocal new_bytes
            try:
                os.link(src, dest)
            except FileExistsError:
                return
            created.append(dest)
            dirs.add(dest.parent)
            new_bytes += size

        with self.locked():
            previous = self.resolve(name)
            try:
                for c in manifest.chunks:
                    place(staging.staged_chunk(c.sha256), self.chunk_path(c.sha256), c.stored_size)
                kernel = manifest.kernel
                if kernel is not None:
                    if kernel_file is None:
                        raise CapsuleError("manifest names a kernel but none was staged")
                    place(kernel_file, self.kernel_path(kernel.sha256), kernel.size)
                    if kernel.modules is not None:
                        # Stored as a chunk: GET /chunks/<hash> serves (and verifies) it with no new route.
                        if modules_file is None:
                            raise CapsuleError("manifest names kernel modules but none were staged")
                        self.chunk_path(kernel.modules).parent.mkdir(exist_ok=True)
                        place(modules_file, self.chunk_path(kernel.modules), modules_file.stat().st_size)
                place(manifest_file, self.manifest_path(vid))
                for d in sorted(dirs):
                    fsync_path(d)
                self._write_ref(name, vid)
            except BaseException as exc:
                for p in created:
                    with contextlib.suppress(OSError):
                        os.unlink(p)
                if isinstance(exc, OSError):
                    raise describe_oserror(exc, f"publishing capsule {name}") from exc
                raise
            if previous != vid:
                self._append_history(name, HistoryRecord(time.time(), vid, origin, manifest.stored_size,
                                                         new_bytes, detail))
        return new_bytes

    def _write_ref(self, name: str, vid: str) -> None:
        """Point ``name`` at ``vid`` by rename (caller holds the store lock)."""
        tmp_ref = self.refs_dir / f".{name}.{os.getpid()}.tmp"
        try:
            with open(tmp_ref, "w") as f:
                f.write(vid + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp_ref, self.refs_dir / name)
            fsync_path(self.refs_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_ref)
            raise

    def _write_history(self, name: str, records: list[HistoryRecord]) -> None:
        """Replace ``name``'s history atomically (caller holds the store lock)."""
        path = self.history_dir / name
        if not records:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        self.history_dir.mkdir(mode=0o700, exist_ok=True)
        tmp = self.history_dir / f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "w") as f:
                for r in records:
                    f.write(json.dumps(r.to_json(), sort_keys=True, separators=(",", ":")) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            fsync_path(self.history_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _append_history(self, name: str, record: HistoryRecord) -> None:
        try:
            self._write_history(name, [*self.history(name), record])
        except OSError as exc:
            # The version is published (the ref moved); only its history line is lost.
            raise describe_oserror(exc, f"recording the history of {name} (version {record.version} "
                                        "is published)") from exc

    def rollback(self, name: str, version: str | None = None) -> HistoryRecord:
        """Make an older version of ``name`` current again (default: the one before the current).

        ``version`` is a full id or a unique prefix of a version in the name's
        history whose manifest is still stored (gc has not dropped it).
        """
        check_name(name)
        with self.locked():
            current = self.resolve(name)
            if current is None:
                raise CapsuleError(f"no capsule named {name!r}")
            records = self.history(name)
            known = list(dict.fromkeys(r.version for r in reversed(records)))  # newest first
            stored = [v for v in known if self.manifest_path(v).exists()]
            if version is None:
                older = [v for v in stored if v != current]
                if not older:
                    raise CapsuleError(f"{name} has no older version to roll back to "
                                       f"(history: {len(known)} version(s), gc keeps capsule.keep_versions)")
                target = older[0]
            else:
                matches = [v for v in known if v.startswith(version.lower())] if version else []
                if len(matches) != 1:
                    listed = ", ".join(v[:12] for v in stored) or "none"
                    why = "is ambiguous" if matches else "is not in its history"
                    raise CapsuleError(f"version {version!r} of {name} {why}; versions kept: {listed}")
                target = matches[0]
                if target not in stored:
                    raise CapsuleError(f"version {target[:12]} of {name} was removed by gc; "
                                       f"versions kept: {', '.join(v[:12] for v in stored) or 'none'}")
            if target == current:
                raise CapsuleError(f"version {target[:12]} is already the current version of {name}")
            manifest = self.load_manifest(target)  # refuses a corrupt manifest
            missing = [c.sha256 for c in manifest.chunks if not self.chunk_path(c.sha256).exists()]
            if missing:
                raise CapsuleError(f"version {target[:12]} of {name} misses {len(missing)} chunk(s) "
                                   f"(first {missing[0]}); not rolled back")
            record = HistoryRecord(time.time(), target, "rollback", manifest.stored_size, 0, current)
            try:
                self._write_ref(name, target)
            except OSError as exc:
                raise describe_oserror(exc, f"rolling back {name}") from exc
            self._append_history(name, record)
        return record

    def delete(self, name: str) -> str:
        """Remove a ref; its chunks stay until ``gc`` (a booting node may still need them)."""
        check_name(name)
        with self.locked():
            vid = self.resolve(name)
            if vid is None:
                raise CapsuleNotFound(f"no capsule named {name!r}")
            try:
                os.unlink(self.refs_dir / name)
                fsync_path(self.refs_dir)
                self._write_history(name, [])
            except OSError as exc:
                raise describe_oserror(exc, f"deleting capsule {name}") from exc
        return vid

    def gc(self, in_use: Iterable[str] = (), keep_versions: int = 1) -> GcReport:
        """Remove what no ref, no retained version and no ``in_use`` version needs, and dead imports' staging.

        Retention: for every name, its current version and the versions it had
        most recently, ``keep_versions`` distinct ones in all (1: the current one
        only); history lines of the others are dropped with them. ``in_use`` lets
        the daemon protect versions that nodes are booting right now even if their
        ref has since moved on.
        """
        if keep_versions < 1:
            raise CapsuleError(f"keep_versions must be at least 1 (the current version), got {keep_versions}")
        report = GcReport()
        self.ensure_layout()
        with self.locked():
            # Dead imports: their flock died with them.
            for entry in sorted(os.listdir(self.tmp_dir)):
                path = self.tmp_dir / entry
                if _is_live(path):
                    report.live_imports += 1
                    continue
                shutil.rmtree(path, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                report.removed_staging += 1
            refs = self.names()
            keep = set(refs.values())
            keep.update(self._retain_history(refs, keep_versions, report))
            for v in in_use:
                if is_hex_digest(v) and self.manifest_path(v).exists():
                    keep.add(v)
            keep_chunks: set[str] = set()
            keep_kernels: set[str] = set()
            for vid in sorted(keep):
                m = self.load_manifest(vid)  # raises on a corrupt manifest: better stop than guess
                keep_chunks.update(c.sha256 for c in m.chunks)
                if m.kernel is not None:
                    keep_kernels.add(m.kernel.sha256)
                    if m.kernel.modules is not None:
                        keep_chunks.add(m.kernel.modules)
            keep_chunks |= self._image_chunks(keep)
            report.kept_versions = sorted(keep)
            for vid in self.versions():
                if vid not in keep:
                    report.freed_bytes += _unlink(self.manifest_path(vid))
                    report.removed_manifests += 1
            for k in sorted(os.listdir(self.kernels_dir)):
                if k not in keep_kernels:
                    report.freed_bytes += _unlink(self.kernels_dir / k)
                    report.removed_kernels += 1
            for sub in sorted(os.listdir(self.chunks_dir)):
                subdir = self.chunks_dir / sub
                if not subdir.is_dir():
                    continue
                for h in os.listdir(subdir):
                    if h not in keep_chunks:
                        report.freed_bytes += _unlink(subdir / h)
                        report.removed_chunks += 1
        return report

    def _image_chunks(self, keep: set[str]) -> set[str]:
        """The squashfs images (bootd.capsule.image) of kept versions: their lists and chunks; the index
        of a version that goes is removed first (caller holds the lock), so no image outlives its capsule."""
        chunks: set[str] = set()
        images = self.root / "images"
        try:
            names = sorted(os.listdir(images))
        except FileNotFoundError:
            return chunks
        for entry in names:
            vid, _, kind = entry.partition(".")
            if not is_hex_digest(vid) or kind not in IMAGE_KINDS:
                continue
            if vid not in keep:
                _unlink(images / entry)
                with contextlib.suppress(FileNotFoundError):
                    (images / f".{vid}.lock").unlink()
                continue
            image_id = (images / entry).read_text().strip()
            try:
                listing = decode_image_list(self.chunk_path(image_id).read_bytes(), image_id)
            except (OSError, CapsuleError) as exc:  # a broken image is dropped: first use builds it again
                log.warning("event=image-dropped version=%s error=%r", vid, str(exc))
                _unlink(images / entry)
                continue
            chunks.add(image_id)
            chunks.update(c.sha256 for c in listing.chunks)
        return chunks

    def _retain_history(self, refs: dict[str, str], keep_versions: int, report: GcReport) -> set[str]:
        """Apply the retention rule to every history (caller holds the lock); the versions it keeps."""
        kept: set[str] = set()
        try:
            names = sorted(n for n in os.listdir(self.history_dir) if NAME_RE.fullmatch(n))
        except FileNotFoundError:
            return kept
        for name in names:
            records = self.history(name)
            current = refs.get(name)
            if current is None:  # a name deleted before history was removed with it
                report.dropped_history += len(records)
                self._write_history(name, [])
                continue
            newest_first = [current, *(r.version for r in reversed(records))]
            retained = set(list(dict.fromkeys(newest_first))[:keep_versions])
            retained = {v for v in retained if self.manifest_path(v).exists()}
            left = [r for r in records if r.version in retained]
            if len(left) != len(records):
                report.dropped_history += len(records) - len(left)
                self._write_history(name, left)
            kept |= retained
        return kept


def _unlink(path: Path) -> int:
    try:
        size = path.lstat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


def _is_live(staging_dir: Path) -> bool:
    """An import is live while some process holds the flock on its lock file."""
    lock = staging_dir / "lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False  # a stray file or a half-created directory of a dead import
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
