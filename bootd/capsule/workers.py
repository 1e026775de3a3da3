"""Compression workers in separate processes, fed through a shared-memory ring.

Why offer processes: zstandard and hashlib release the GIL, but each chunk still
needs the GIL several times between those calls while the main thread runs the
tree walk in Python; when the OS preempts the thread holding the GIL the
compressors queue behind it. Worker processes share no lock: the main process
copies each chunk once into a shared-memory slot and sends only (offset, length)
through the pool's pipe. The price is IPC and a fork per worker; on the 2-core
test machine (busy with other jobs) both variants measured about the same, so
threads stay the default and this is an option (``ImportOptions.processes``).

Workers write new chunks into the import's staging directory and return
(sha256, stored size, raw size, new?). They never touch the store itself, so a
killed worker or parent leaves only staging files, which gc removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import shared_memory
from typing import Any

import zstandard

_STATE: dict[str, Any] = {}


def _die_with_parent(parent: int) -> None:
    """Linux: get SIGKILL when the parent dies, so a kill -9 of an import leaves no workers."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init(parent: int, close_fds: tuple[int, ...], shm_name: str, staging_chunks: str, store_chunks: str,
          level: int) -> None:
    _die_with_parent(parent)
    for fd in close_fds:  # e.g. the staging flock: only the importing process may hold it
        with contextlib.suppress(OSError):
            os.close(fd)
    # Forked children share the parent's resource tracker, which already knows the segment
    # and unlinks it if the parent dies without cleaning up (kill -9).
    shm = shared_memory.SharedMemory(name=shm_name)
    _STATE.update(shm=shm, staging=staging_chunks, store=store_chunks,
                  cctx=zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False))


def compress_and_stage(
    data: Any, cctx: Any, staging_chunks: str, store_chunks: str,
) -> tuple[str, int, int, bool]:
    """Compress one chunk, name it by the sha256 of the result, and stage it unless the store has it.

    Reused store chunks are hard-linked into staging so a concurrent gc cannot remove them
    before this import publishes.
    """
    stored = cctx.compress(data)
    h = hashlib.sha256(stored).hexdigest()
    staged = os.path.join(staging_chunks, h)
    try:
        os.link(os.path.join(store_chunks, h[:2], h), staged)
        return h, len(stored), len(data), False
    except FileExistsError:
        return h, len(stored), len(data), False
    except FileNotFoundError:
        pass
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        return h, len(stored), len(data), False  # the same chunk twice in one import
    try:
        view = memoryview(stored)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return h, len(stored), len(data), True


def _work(offset: int, length: int) -> tuple[str, int, int, bool]:
    shm = _STATE["shm"]
    view = shm.buf[offset:offset + length]
    try:
        return compress_and_stage(view, _STATE["cctx"], _STATE["staging"], _STATE["store"])
    finally:
        view.release()


def run_process_pool(
    chunks: Iterable[memoryview],
    *,
    workers: int,
    max_chunk: int,
    level: int,
    staging_chunks: str,
    store_chunks: str,
    close_fds: tuple[int, ...] = (),
    on_chunk: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, int, int, bool]]:
    """Yield one result per chunk, in stream order."""
    slots = 2 * workers + 2
    shm = shared_memory.SharedMemory(create=True, size=slots * max_chunk)
    # fork, not spawn/forkserver: those re-import the caller's __main__ module in every
    # worker, which runs `bootd`'s own entry point again. Forked workers close the fds
    # that must stay private to this process and die with it (PR_SET_PDEATHSIG).
    ctx = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init,
                               initargs=(os.getpid(), close_fds, shm.name, staging_chunks, store_chunks,
                                         level))
    ring = shm.buf
    assert ring is not None
    free = deque(range(slots))
    inflight: deque[tuple[int, Future[tuple[str, int, int, bool]]]] = deque()
    try:
        for view in chunks:
            if not free:
                slot, fut = inflight.popleft()
                yield fut.result()
                free.append(slot)
            slot = free.popleft()
            off = slot * max_chunk
            n = len(view)
            ring[off:off + n] = view
            inflight.append((slot, pool.submit(_work, off, n)))
            if on_chunk is not None:
                on_chunk(n)
        while inflight:
            _, fut = inflight.popleft()
            yield fut.result()
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            shm.unlink()  # first: the name must go even if a view is still exported
            with contextlib.suppress(BufferError):
                ring.release()
                shm.close()
