"""How a file response leaves, for the aiohttp route and the chunk fast path alike.

One send path: the header block (bootd.net.files.response_head, a few string
joins instead of aiohttp's CIMultiDict serialisation), then one sendfile(2)
straight away, and ``loop.sendfile`` only for the part the socket could not
take at once.  aiohttp's own prepare() + ``loop.sendfile`` always pauses
reading, waits on a future for the write buffer to drain and re-arms the
selector, even when the socket can take the whole chunk at once, which it
usually can (bench/http: this halves the Python CPU per request).  The header
block goes out with MSG_MORE so it leaves in the same segment as the body (what
nginx's ``tcp_nopush`` does with two more system calls).

One abort path: the headers promised the whole body, so a body cut short must
end the connection; a client that hangs up mid-transfer is routine (a node
rebooted), not a server error.

Also the plain-text refusal every route answers with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from bootd.metrics import HttpMetrics
from bootd.net.files import OpenFile, OpenFileCache

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

    ``sock`` is a plain socket on the transport's descriptor (asyncio's TransportSocket has no
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


async def send_rest(transport: asyncio.Transport, file: IO[bytes], offset: int, count: int) -> None:
    """What :func:`send_start` could not send at once; reading pauses until it is out."""
    await asyncio.get_running_loop().sendfile(transport, file, offset, count)


class Sender:
    """The send and abort paths with the counters they move, shared by the route and the chunk fast path.

    Prometheus label children are looked up once per (route, method, status) and kept: ``labels()``
    takes a lock and builds a tuple on every call, which shows on the hot path.
    """

    def __init__(self, metrics: HttpMetrics, files: OpenFileCache) -> None:
        self.metrics = metrics
        self.files = files
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._bytes: dict[str, Any] = {}

    def open(self, key: str, path: Callable[[], Path | str], *, revalidate: bool = False,
             sha256: str | None = None, root: str | None = None) -> OpenFile:
        """The open-file cache's acquire, counted as a hit or a miss (a failed open is a miss)."""
        hits = self.files.hits
        try:
            return self.files.acquire(key, path, revalidate=revalidate, sha256=sha256, root=root)
        finally:
            (self.metrics.cache_hit if self.files.hits != hits else self.metrics.cache_miss).inc()

    async def send(self, transport: asyncio.Transport | None, sock: socket.socket | None, head: bytes,
                   entry: OpenFile, offset: int, count: int) -> None:
        """The whole response: :func:`send_start`, then :func:`send_rest`; raises OSError/RuntimeError if cut."""
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away before the response was sent")
        sent = send_start(transport, sock, head, entry.file, offset, count)
        if sent < count:
            await send_rest(transport, entry.file, offset + sent, count - sent)

    def abort(self, transport: asyncio.BaseTransport | None, key: str, exc: BaseException) -> None:
        """Headers promised the whole body: a short one must end the connection."""
        log.debug("event=send-aborted object=%s reason=%r", key, str(exc))
        self.metrics.aborted.inc()
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
