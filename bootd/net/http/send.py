"""How a file response leaves, for the aiohttp route and the chunk fast path alike.

One send path: the header block (bootd.net.files.response_head, a few string
joins instead of aiohttp's CIMultiDict serialisation), then one sendfile(2)
straight away, and :func:`send_rest` (a sendfile loop with a no-progress
deadline, ``http.send_timeout``) only for the part the socket could not take
at once.  aiohttp's own prepare() + ``loop.sendfile`` always pauses
reading, waits on a future for the write buffer to drain and re-arms the
selector, even when the socket can take the whole chunk at once, which it
usually can (bench/http: this halves the Python CPU per request).  The header
block goes out with MSG_MORE so it leaves in the same segment as the body (what
nginx's ``tcp_nopush`` does with two more system calls); it is sent on the
transport's own socket object, not a dup() of it, so a connection costs one
descriptor.

One abort path: the headers promised the whole body, so a body cut short must
end the connection; a client that hangs up mid-transfer is routine (a node
rebooted), not a server error.

Also the plain-text refusal every route answers with.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from bootd.metrics import HttpBoundsMetrics, HttpMetrics
from bootd.net.files import OpenFile, OpenFileCache
from bootd.ratelog import LogLimiter

log = logging.getLogger("bootd.http")

ROUTE_CHUNK = "/chunks/{hash}"


def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Every refusal says why: the body is one line of plain text."""
    return web.Response(status=status, text=message + "\n", headers=headers)


class SentResponse(web.StreamResponse):
    """A response whose bytes the handler already wrote to the transport itself.

    aiohttp calls prepare() and write_eof() on whatever a handler returns; both
    are no-ops here, and ``keep_alive`` tells it whether the connection goes on.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status=status)

    def set_keep_alive(self, keep_alive: bool) -> None:
        self._keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def sendfile_now(transport: asyncio.Transport, fd: int, file: IO[bytes], offset: int, count: int) -> int:
    """One sendfile(2) to socket ``fd`` right away; returns bytes sent (0 if the socket is full).

    Only when the transport has nothing buffered (the headers went out at once), or the body
    would overtake them.  The event loop's ``sendfile`` sends whatever is left.
    """
    if transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(fd, file.fileno(), offset, count)
    except (BlockingIOError, InterruptedError):
        return 0


def send_start(transport: asyncio.Transport, sock: socket.socket | None, head: bytes, file: IO[bytes],
               offset: int, count: int) -> int:
    """The header block, then as much of the body as the socket takes now; returns the body bytes sent.

    ``sock`` is the transport's own socket object (asyncio's TransportSocket wrapper has no
    send()); without one the headers go through the transport and the body is all left to
    :func:`send_rest`.  While the transport still holds bytes of an earlier answer, the headers
    queue behind them (a direct send would overtake them).  Raises OSError when the connection
    is gone.
    """
    if sock is None:
        transport.write(head)
        return 0
    if transport.get_write_buffer_size():
        transport.write(head)
        return 0
    try:
        # MSG_MORE holds the headers back until the body follows; never when no body does.
        done = sock.send(head, socket.MSG_MORE if count else 0)
    except (BlockingIOError, InterruptedError):
        done = 0  # the client has not read its previous answers yet: the loop waits for it
    if done < len(head):
        transport.write(head[done:])
    return sendfile_now(transport, sock.fileno(), file, offset, count) if count else 0


class SendStalled(TimeoutError):
    """The client took no bytes for ``send_timeout`` seconds: the send is cut and its slot freed."""


class SendWatch:
    """One in-flight sendfile loop, driven from the writer callback like asyncio's own, with a deadline.

    sendfile(2) runs in the writability callback itself (no task hop per EAGAIN), and ``last``
    records the last write that moved bytes: nginx's ``send_timeout`` runs from there, checked
    by :class:`SendWatches` (one timer for every send, not one per send).  The callback is
    registered on the socket's descriptor for the whole send; it must go while that descriptor
    is still this socket's (a closed descriptor's number is soon another connection's), so
    ``connection_lost`` calls :meth:`lost` before the socket closes.
    """

    __slots__ = ("armed", "count", "fd", "fut", "last", "loop", "offset", "src", "watches")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, src: int, offset: int, count: int,
                 watches: SendWatches) -> None:
        self.loop = loop
        self.fd = fd
        self.src = src
        self.offset = offset
        self.count = count
        self.watches = watches
        self.fut: asyncio.Future[None] = loop.create_future()
        self.last = loop.time()
        self.armed = True
        loop._add_writer(fd, self.on_writable)  # type: ignore[attr-defined]
        watches.add(self)

    def on_writable(self) -> None:
        try:
            n = os.sendfile(self.fd, self.src, self.offset, self.count)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.finish(exc)
            return
        if n == 0:
            self.finish(RuntimeError(f"the file ended {self.count} bytes early (truncated on disk?)"))
            return
        self.offset += n
        self.count -= n
        if self.count <= 0:
            self.finish(None)
        else:
            self.last = self.loop.time()

    def finish(self, error: BaseException | None) -> None:
        if self.armed:
            self.armed = False
            self.loop._remove_writer(self.fd)  # type: ignore[attr-defined]
            self.watches.discard(self)
        if not self.fut.done():
            if error is None:
                self.fut.set_result(None)
            else:
                self.fut.set_exception(error)

    def lost(self) -> None:
        self.finish(ConnectionResetError("the connection closed during the send"))


class SendWatches:
    """The send deadline of every in-flight :class:`SendWatch`, checked by one timer.

    A timer per send (``call_at`` on start, ``cancel`` at the end) was most of the Python cost
    of a send that could not finish at once; a set insert and removal is not.  The timer runs
    only while some send is waiting, every quarter of ``timeout`` (at most a second), so a send
    with no progress is cut between ``timeout`` and ``timeout`` plus one tick after its last byte.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._active: set[SendWatch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._active)

    def add(self, watch: SendWatch) -> None:
        self._active.add(watch)
        if self._timer is None:
            self._timer = watch.loop.call_later(min(1.0, self.timeout / 4), self._sweep, watch.loop)

    def discard(self, watch: SendWatch) -> None:
        self._active.discard(watch)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        due = loop.time() - self.timeout
        for watch in [w for w in self._active if w.last <= due]:
            watch.finish(SendStalled(f"the client read nothing for {self.timeout:g} s"))
        if self._active:
            self._timer = loop.call_later(min(1.0, self.timeout / 4), self._sweep, loop)


async def send_rest(transport: asyncio.Transport, sock: socket.socket | None, file: IO[bytes], offset: int,
                    count: int, watches: SendWatches) -> None:
    """What :func:`send_start` could not send at once, aborted when no byte leaves for ``watches.timeout`` s.

    nginx's ``send_timeout``: the timer runs between two successful writes, so a slow but
    live client is served and one that never reads loses its slot.  asyncio's
    ``loop.sendfile`` has no such timer and cannot be watched from outside, so this is its
    loop with one (:class:`SendWatch`): reading pauses, the transport's buffer (headers that
    did not fit) drains first, then sendfile(2) runs from the writability callback.
    """
    timeout = watches.timeout
    loop = asyncio.get_running_loop()
    protocol = transport.get_protocol()
    if sock is None or not hasattr(loop, "_add_writer") or not hasattr(protocol, "send_watch"):
        # Not a selector loop (or no socket): asyncio's sendfile, the whole send bounded instead.
        await asyncio.wait_for(loop.sendfile(transport, file, offset, count), timeout + count / 65536)
        return
    resume = transport.is_reading()
    transport.pause_reading()
    try:
        if transport.get_write_buffer_size():
            await _drained(transport, timeout)
        if transport.is_closing():
            raise ConnectionResetError("the connection closed during the send")
        watch = SendWatch(loop, sock.fileno(), file.fileno(), offset, count, watches)
        watch.on_writable()  # the client may have read since send_start: try at once, as asyncio does
        protocol.send_watch = watch
        try:
            await watch.fut
        finally:
            watch.finish(None)  # cancelled: the callback must not outlive the send
            protocol.send_watch = None
    finally:
        if resume and not transport.is_closing():
            transport.resume_reading()


async def _drained(transport: asyncio.Transport, timeout: float) -> None:
    """Wait until the transport has written everything it holds, with the same no-progress deadline."""
    make = getattr(transport, "_make_empty_waiter", None)
    reset = getattr(transport, "_reset_empty_waiter", None)
    if make is not None and reset is not None:
        try:
            await asyncio.wait_for(make(), timeout)
        except TimeoutError:
            raise SendStalled(f"the client read nothing for {timeout:g} s") from None
        finally:
            reset()
        return
    left, last = transport.get_write_buffer_size(), time.monotonic()
    while left:
        await asyncio.sleep(0.01)
        now_left = transport.get_write_buffer_size()
        if now_left < left:
            left, last = now_left, time.monotonic()
        elif time.monotonic() - last > timeout:
            raise SendStalled(f"the client read nothing for {timeout:g} s")


class Sender:
    """The send and abort paths with the counters they move, shared by the route and the chunk fast path.

    Prometheus label children are looked up once per (route, method, status) and kept: ``labels()``
    takes a lock and builds a tuple on every call, which shows on the hot path.
    """

    def __init__(self, metrics: HttpMetrics, files: OpenFileCache, *, send_timeout: float = 30.0,
                 bounds: HttpBoundsMetrics | None = None, inline: bool = True) -> None:
        self.metrics = metrics
        self.files = files
        self.watches = SendWatches(send_timeout)
        self.bounds = bounds
        self.inline = inline  # False (bench --plain): headers through the transport, no sendfile at once
        self._stall_log = LogLimiter(1.0)
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._bytes: dict[str, Any] = {}
        self._preparing: dict[str, asyncio.Task[OpenFile]] = {}  # key -> its open-and-hash on a worker thread

    def take(self, key: str, *, revalidate: bool = False) -> OpenFile | None:
        """The cache's open entry for ``key``, counted as a hit; None (not open, or changed) counts nothing."""
        entry = self.files.take(key, revalidate=revalidate)
        if entry is not None:
            self.metrics.cache_hit.inc()
        return entry

    def open(self, key: str, path: Callable[[], Path | str], *, revalidate: bool = False,
             sha256: str | None = None, root: str | None = None) -> OpenFile:
        """The open-file cache's acquire, counted as a hit or a miss (a failed open is a miss)."""
        entry = self.take(key, revalidate=revalidate)
        if entry is None:
            self.metrics.cache_miss.inc()
            entry = self.files.acquire(key, path, revalidate=revalidate, sha256=sha256, root=root)
        return entry

    async def open_verified(self, key: str, path: Callable[[], Path | str], *, revalidate: bool = False,
                            sha256: str | None = None, root: str | None = None, join: bool = True) -> OpenFile:
        """``open``, but a content-addressed file not open (or changed on disk) is read and hashed off the loop.

        An entry past the cache's ``valid`` is hashed again the same way (``OpenFileCache.take``).
        Requests for a file that is being hashed wait for that one hash (a boot wave asks for the
        same chunks at once): each would otherwise read and hash it again, and all but one result
        be thrown away.  ``join=False`` starts a fresh open instead, for a caller that has just made
        the file present (a replica's fetch on a miss): an open already under way may have started
        before the file existed and would hand it that FileNotFoundError (a 404 for a chunk just fetched).
        """
        if sha256 is None:
            return self.open(key, path, revalidate=revalidate, root=root)
        entry = self.take(key, revalidate=revalidate)
        if entry is not None:
            return entry
        self.metrics.cache_miss.inc()
        task = self._preparing.get(key) if join else None
        if task is None:  # later requests join this one (a stale one's callback leaves it in place)
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.files.prepare, key, str(path()), sha256, root))
            self._preparing[key] = task
            task.add_done_callback(functools.partial(self._prepared, key))  # runs before any waiter resumes
        await asyncio.shield(task)  # a waiter that gives up does not cancel the others' hash
        return self.files.acquire(key, path, revalidate=revalidate, sha256=sha256, root=root)

    def _prepared(self, key: str, task: asyncio.Task[OpenFile]) -> None:
        if self._preparing.get(key) is task:
            del self._preparing[key]
        if not task.cancelled() and task.exception() is None:
            self.files.adopt(task.result())

    async def send(self, transport: asyncio.Transport | None, sock: socket.socket | None, head: bytes,
                   entry: OpenFile, offset: int, count: int) -> None:
        """The whole response: :func:`send_start`, then :func:`send_rest`; raises OSError/RuntimeError if cut."""
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away before the response was sent")
        sent = send_start(transport, sock if self.inline else None, head, entry.file, offset, count)
        if sent < count:
            await self.send_rest(transport, sock, entry.file, offset + sent, count - sent)

    async def send_rest(self, transport: asyncio.Transport, sock: socket.socket | None, file: IO[bytes],
                        offset: int, count: int) -> None:
        await send_rest(transport, sock, file, offset, count, self.watches)

    def abort(self, transport: asyncio.BaseTransport | None, key: str, exc: BaseException) -> None:
        """Headers promised the whole body: a short one must end the connection."""
        self.metrics.aborted.inc()
        if isinstance(exc, SendStalled):
            if self.bounds is not None:
                self.bounds.closed.labels(reason="send-timeout").inc()
            held = self._stall_log.allow()
            if held is not None:
                log.warning("event=http-connection-closed reason=send-timeout object=%s error=%r held_back=%d",
                            key, str(exc), held)
        else:
            log.debug("event=send-aborted object=%s reason=%r", key, str(exc))
        if transport is not None:
            transport.close()

    def count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.metrics.requests.labels(route=route, method=method, status=str(status))
        child.inc()

    def sent(self, route: str, n: int) -> None:
        child = self._bytes.get(route)
        if child is None:
            child = self._bytes[route] = self.metrics.bytes.labels(route=route)
        child.inc(n)
