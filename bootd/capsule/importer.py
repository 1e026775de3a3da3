"""Import a root tree (directory or tarball) as a new capsule version.

The pipeline is: deterministic archive stream -> FastCDC cuts (main thread) ->
zstd + sha256 + write (a pool of threads, or of forked processes with
``processes=True``). zstandard and hashlib release the GIL, so on N cores N
chunks compress at once while the main thread reads the tree; the number of
chunks in flight is bounded, so memory stays at a few blocks no matter how big
the capsule is. The main thread reads the tree straight into the cutter's
blocks and the compressors read the chunks from there (no copy per chunk);
new chunk files are written with O_DIRECT (workers.ChunkWriter) and fsynced
on I/O threads, and the ref is only renamed after all of them are on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from bootd.capsule.archive import (
    LNK,
    REG,
    ArchiveStream,
    Entry,
    TarSource,
    compression_of,
    decompress_to,
    walk_directory,
)
from bootd.capsule.chunker import Block, ChunkCutter, ChunkParams
from bootd.capsule.manifest import (
    ChunkRef,
    KernelRef,
    build_meta,
    decode_manifest,
    encode_manifest,
    version_id,
)
from bootd.capsule.objects import CapsuleStore, Staging, check_name, describe_oserror
from bootd.capsule.oci import open_image
from bootd.capsule.workers import (
    ChunkWriter,
    Stage,
    compress_and_stage,
    direct_io_works,
    open_new,
    run_process_pool,
    worth_direct,
)
from bootd.durable import fsync_path
from bootd.errors import CapsuleError
from bootd.stage1.kmods import ModuleError, is_module_file, mod_name, module_initramfs, plain_module

Progress = Callable[[int], None]


@dataclass(frozen=True)
class ImportOptions:
    chunk: ChunkParams = field(default_factory=ChunkParams)
    zstd_level: int = 3
    workers: int = 0  # 0: one per CPU
    durable: bool = True  # fsync every staged file before publishing
    # Compress in forked worker processes (workers.py) instead of threads: no GIL hand-offs,
    # but one fork per worker, a copy of every chunk into the shared ring, and writes inside
    # the workers. bench/capsule measures both; on the 2-core test machine threads are now
    # clearly faster (0.94x vs 0.79x of tar | zstd), and they need no fork inside a daemon.
    processes: bool = False
    # Kernel releases the stage one has NIC modules for (its stage1.json "module_sets"); None: unknown.
    # A capsule whose kernel has no modules of its own must match one of them, or it is refused.
    stage1_releases: frozenset[str] | None = None


@dataclass(frozen=True)
class ImportResult:
    name: str
    version: str
    previous: str | None
    raw_size: int
    stored_size: int
    chunks: int
    new_chunks: int
    new_bytes: int  # stored bytes that were not in the store before
    kernel: KernelRef | None
    entries: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "previous": self.previous,
            "raw_size": self.raw_size, "stored_size": self.stored_size, "chunks": self.chunks,
            "new_chunks": self.new_chunks, "new_bytes": self.new_bytes, "entries": self.entries,
            "kernel": None if self.kernel is None else self.kernel.as_meta(),
            "seconds": round(self.seconds, 3),
        }


def _version_key(name: bytes) -> list[tuple[int, int | bytes]]:
    """Natural sort key: vmlinuz-6.1.0-10 sorts after vmlinuz-6.1.0-9."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(rb"(\d+)", name) if p]


def find_kernel(entries: list[Entry]) -> Entry | None:
    """The newest /boot/vmlinuz* regular file (hardlinks resolved), by version in its name."""
    by_path = {e.path: e for e in entries}
    candidates: list[Entry] = []
    for e in entries:
        if not (e.path.startswith(b"boot/vmlinuz") and b"/" not in e.path[5:]):
            continue
        target = e
        if e.kind == LNK:
            target = by_path.get(e.linkname, e)
        if target.kind == REG and target.size > 0:
            candidates.append(Entry(e.path, REG, target.mode, target.uid, target.gid, target.mtime,
                                    size=target.size, opener=target.opener))
    if not candidates:
        return None
    return max(candidates, key=lambda e: _version_key(e.path))


class _DiskIO:
    """Writes and fsyncs of new chunk files, on their own threads.

    Both block on the disk, not the CPU. Done inline, an O_DIRECT write kept a compressor
    thread waiting about 0.7 ms per chunk (a fifth of its time on the test machine) and one
    fsync per chunk cost about 40% of the import's wall time; here the compressors keep
    both cores busy while earlier chunks reach the disk. A compressor creates the file
    (O_EXCL decides whether the chunk is new) and hands the descriptor and the frame over;
    at most ``max_pending`` frames wait, so a slow disk slows the import instead of filling
    memory. ``finish`` returns once every new chunk is written and (if durable) fsynced.
    """

    def __init__(self, durable: bool, direct: bool, threads: int = 4, max_pending: int = 16) -> None:
        self.durable = durable
        self.direct = direct  # cleared if a write finds that the filesystem wants another alignment
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="capsule-io")
        self.local = threading.local()
        self.slots = threading.BoundedSemaphore(max_pending)
        self.pending: deque[Future[None]] = deque()
        self.error: BaseException | None = None

    def stage(self, path: str, data: bytes) -> bool:
        """From a compressor thread: create ``path`` and queue its write; False if it exists."""
        err = self.error
        if err is not None:  # stop early (ENOSPC): the same error, so the import reports its cause
            if isinstance(err, OSError):
                raise OSError(err.errno, err.strerror, err.filename) from err
            raise CapsuleError(f"writing a chunk failed: {err}") from err
        direct = self.direct and worth_direct(len(data))
        fd = open_new(path, direct)
        if fd is None:
            return False
        self.slots.acquire()
        try:
            self.pending.append(self.pool.submit(self._write, fd, data, direct))
        except BaseException:
            self.slots.release()
            os.close(fd)
            raise
        return True

    def _write(self, fd: int, data: bytes, direct: bool) -> None:
        try:
            writer = getattr(self.local, "writer", None)
            if writer is None:
                writer = self.local.writer = ChunkWriter(True)
            writer.write(fd, data, direct)
            if not writer.direct:
                self.direct = False
            if self.durable:
                os.fsync(fd)
        except BaseException as exc:
            if self.error is None:
                self.error = exc
            raise
        finally:
            os.close(fd)
            self.slots.release()

    def sync(self, path: Path) -> None:
        """fsync a chunk a worker process wrote."""
        if self.durable:
            self.pending.append(self.pool.submit(fsync_path, path))

    def finish(self) -> None:
        """Wait for every queued write and fsync; raise the first error."""
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)  # no cancelling: every queued write closes its descriptor


def _copy_hashing(src: BinaryIO, dest: Path, durable: bool) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(dest, "wb") as out:
        while block := src.read(1 << 20):
            h.update(block)
            out.write(block)
            n += len(block)
        if durable:
            os.fsync(out.fileno())
    return h.hexdigest(), n


def import_capsule(
    store: CapsuleStore,
    name: str,
    source: Path,
    *,
    kernel: Path | None = None,
    options: ImportOptions | None = None,
    progress: Progress | None = None,
    on_total: Callable[[int], None] | None = None,
    transform: Callable[[list[Entry]], list[Entry]] | None = None,
    origin: str = "import",
    detail: str = "",
) -> ImportResult:
    """Import ``source`` as capsule ``name``; the old version stays visible until this one is complete.

    ``source`` is a directory, a tar archive, an OCI image layout (directory or
    tar) or a docker-save archive (oci.py). ``transform`` may drop or replace
    entries before they are archived (image hygiene); ``origin`` and ``detail``
    go into the name's history.
    """
    check_name(name)
    opts = options or ImportOptions()
    opts.chunk.validate()
    if not 1 <= opts.zstd_level <= 22:
        raise CapsuleError(f"zstd level {opts.zstd_level} out of range 1..22")
    source = Path(source)
    if not source.exists():
        raise CapsuleError(f"source {source} does not exist")
    if kernel is not None and not Path(kernel).is_file():
        raise CapsuleError(f"kernel {kernel} is not a file")
    started = time.monotonic()
    previous = store.resolve(name)
    staging = store.begin_import()
    # The main thread (tree walk, chunker) hands chunks to compressor threads that each
    # need the GIL several times per chunk; with the default 5 ms switch interval they
    # queue behind the main thread (a GIL convoy) and the import runs at half speed on
    # 2 cores. A short interval for the import's duration fixes that; it is restored after.
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(min(old_interval, 0.0005))
    tar: TarSource | None = None
    try:
        try:
            tar = open_image(source, staging.dir)
            if tar is not None:
                entries = tar.entries()
            elif source.is_dir():
                entries = walk_directory(source)
            else:
                kind = compression_of(source)
                plain = source
                if kind is not None:
                    plain = staging.dir / "source.tar"
                    decompress_to(source, plain, kind)
                tar = TarSource(plain)
                entries = tar.entries()
            if transform is not None:
                entries = transform(entries)
            if on_total is not None:
                on_total(sum(512 + e.size for e in entries if e.kind == REG))
            kref = _stage_kernel(staging, entries, kernel, opts.durable, opts.stage1_releases)
            refs, new = _stage_chunks(staging, entries, opts, progress)
            extra = {"chunker": opts.chunk.as_meta(), "zstd_level": opts.zstd_level, "entries": len(entries)}
            meta = build_meta(refs, kref, extra)
            data = encode_manifest(meta, refs)
            vid = version_id(data)
            manifest_file = staging.dir / "manifest"
            with open(manifest_file, "wb") as f:
                f.write(data)
                if opts.durable:
                    os.fsync(f.fileno())
            store.publish(staging, name, vid, decode_manifest(data), manifest_file,
                          staging.dir / "kernel" if kref else None, origin=origin, detail=detail or str(source),
                          modules_file=staging.dir / "modules" if kref and kref.modules else None)
        except OSError as exc:
            raise describe_oserror(exc, f"importing {source} as {name}") from exc
    finally:
        sys.setswitchinterval(old_interval)
        if tar is not None:
            tar.close()
        staging.close()
    new_bytes = sum(r.stored_size for r in {r.sha256: r for r in refs if r.sha256 in new}.values())
    return ImportResult(
        name=name, version=vid, previous=previous, raw_size=sum(r.raw_size for r in refs),
        stored_size=sum(r.stored_size for r in refs), chunks=len(refs), new_chunks=len(new),
        new_bytes=new_bytes, kernel=kref, entries=len(entries), seconds=time.monotonic() - started,
    )


def _stage_kernel(staging: Staging, entries: list[Entry], kernel: Path | None, durable: bool,
                  releases: frozenset[str] | None = None) -> KernelRef | None:
    dest = staging.dir / "kernel"
    if kernel is not None:
        with open(kernel, "rb") as f:
            digest, size = _copy_hashing(f, dest, durable)
        return KernelRef(digest, size, "/boot/" + Path(kernel).name)
    found = find_kernel(entries)
    if found is None or found.opener is None:
        return None
    with contextlib.closing(found.opener()) as f:
        digest, size = _copy_hashing(f, dest, durable)
    path = "/" + found.path.decode("utf-8", "surrogateescape")
    release = path.rsplit("vmlinuz-", 1)[1] if "vmlinuz-" in path else ""
    modules = _stage_modules(staging, entries, release, durable)
    # A kernel named without its release (/boot/vmlinuz) cannot be matched: the stage one's is assumed.
    if modules is None and releases is not None and release and release not in releases:
        raise CapsuleError(
            f"the capsule's kernel {path} has no /lib/modules/{release} in the image, and the stage one "
            f"has NIC modules only for {', '.join(sorted(releases)) or 'no kernel'}: it would boot without a "
            f"network. Install the kernel's modules in the image (e.g. the full linux-image package), remove "
            f"the kernel to boot the stage one's, or rebuild the stage one with --also-kernel-package for it")
    return KernelRef(digest, size, path, modules=modules, release=modules and path.rsplit("vmlinuz-", 1)[1])


def _stage_modules(staging: Staging, entries: list[Entry], release: str, durable: bool) -> str | None:
    """The NIC/storage modules of the capsule's own kernel, from its /lib/modules/<release>, as a small
    second initramfs (see KernelRef.modules); None when the tree has no modules for that release (the
    stage one's own module sets must then match the kernel)."""
    if not release or "/" in release:
        return None
    prefixes = tuple(f"{base}lib/modules/{release}/".encode() for base in ("", "usr/"))
    readers: dict[str, Callable[[], bytes]] = {}
    for e in entries:
        if e.kind != REG or e.opener is None or not e.path.startswith(prefixes):
            continue
        filename = e.path.rsplit(b"/", 1)[1].decode("utf-8", "surrogateescape")
        if is_module_file(filename):
            readers.setdefault(mod_name(filename), partial(_read_module, e, filename))
    if not readers:
        return None
    try:
        mods = module_initramfs(release, readers, f"the capsule's /lib/modules/{release}")
    except ModuleError as exc:
        raise CapsuleError(f"cannot take the NIC modules of the capsule's kernel {release}: {exc}") from exc
    if mods is None:
        return None
    digest = hashlib.sha256(mods.image).hexdigest()
    with open(staging.dir / "modules", "wb") as out:
        out.write(mods.image)
        if durable:
            os.fsync(out.fileno())
    return digest


def _read_module(e: Entry, filename: str) -> bytes:
    assert e.opener is not None
    with contextlib.closing(e.opener()) as f:
        return plain_module(filename, f.read())


def _stage_chunks(
    staging: Staging, entries: list[Entry], opts: ImportOptions, progress: Progress | None,
) -> tuple[list[ChunkRef], set[str]]:
    workers = opts.workers or os.cpu_count() or 2
    refs: list[ChunkRef] = []
    new: set[str] = set()
    members = opts.chunk.members
    stream = ArchiveStream(iter(entries), solo_min=opts.chunk.solo if members else 0, join_max=opts.chunk.join_max)
    staging_chunks, store_chunks = str(staging.chunks_dir), str(staging.store.chunks_dir)
    direct = direct_io_works(str(staging.dir))
    io = _DiskIO(opts.durable, direct)
    results: Generator[tuple[str, int, int, bool], None, None] | None = None
    try:
        if opts.processes:
            results = run_process_pool(
                _copied_chunks(cutter_of(stream, opts.chunk)), workers=workers, max_chunk=opts.chunk.max_size,
                level=opts.zstd_level, staging_chunks=staging_chunks, store_chunks=store_chunks,
                close_fds=(staging.lock_fd,), direct=direct, on_chunk=progress)
        else:
            results = _run_thread_pool(stream, opts, workers, staging_chunks, store_chunks, io.stage, progress)
        for h, stored_size, raw_size, is_new in results:
            refs.append(ChunkRef(h, stored_size, raw_size))
            if is_new:
                new.add(h)
                if opts.processes:
                    io.sync(staging.chunks_dir / h)
    finally:
        if results is not None:
            results.close()  # on an error: the compressors stop before the I/O threads do
        stream.close()
        io.finish()
    return refs, new


def _run_thread_pool(
    stream: ArchiveStream, opts: ImportOptions, workers: int, staging_chunks: str, store_chunks: str,
    stage: Stage, progress: Progress | None,
) -> Generator[tuple[str, int, int, bool], None, None]:
    """The in-process variant (no extra processes; fine for small trees and tests)."""
    local = threading.local()

    def work(raw: memoryview) -> tuple[str, int, int, bool]:
        cctx = getattr(local, "c", None)
        if cctx is None:
            cctx = local.c = zstandard.ZstdCompressor(level=opts.zstd_level, write_content_size=True,
                                                      write_checksum=False)
        return compress_and_stage(raw, cctx, staging_chunks, store_chunks, stage)

    cutter = cutter_of(stream, opts.chunk)
    inflight: deque[tuple[Future[tuple[str, int, int, bool]], Block]] = deque()
    limit = 2 * workers + 2
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="capsule-zstd") as pool:
        try:
            for view, block in cutter:  # views into the cutter's blocks: no copy per chunk
                inflight.append((pool.submit(work, view), block))
                if progress is not None:
                    progress(len(view))
                while len(inflight) > limit:
                    fut, block = inflight.popleft()
                    yield fut.result()
                    cutter.release(block)
            while inflight:
                fut, block = inflight.popleft()
                yield fut.result()
                cutter.release(block)
        finally:
            for fut, _ in inflight:
                fut.cancel()


def cutter_of(stream: ArchiveStream, params: ChunkParams) -> ChunkCutter:
    """The cutter of an archive stream: with member cuts, at the boundaries the stream reports."""
    return ChunkCutter(stream, params, boundaries=stream.boundaries if params.members else None)


def _copied_chunks(cutter: ChunkCutter) -> Iterator[memoryview]:
    """For the process pool, which copies each chunk into its shared ring before asking for the next."""
    for view, block in cutter:
        yield view
        cutter.release(block)
