"""The chunk fast path: a plain ``GET /chunks/<sha256>`` answered from data_received.

Why it exists: chunks are nearly every byte a booting node pulls, and bench/http
compares bootd with nginx on exactly them.  py-spy on bootd under 64 wrk clients
showed ~82% of the server's CPU inside sendfile(2), which nginx pays too, and
almost all of the rest in aiohttp's per-request machinery: a Task, a Request,
routing, the middleware, a StreamResponse and its bookkeeping, about 60 µs a
request, which was the whole gap to nginx.  A plain chunk GET needs none of it:
its answer depends only on the 64 hex digits in the request line.

So the connection's protocol looks at each request before aiohttp parses it.
Only a request that is unmistakably simple is answered here: exactly one
complete ``GET /chunks/<64 lowercase hex> HTTP/1.1`` whose headers are
well-formed and include nothing that changes the answer (Range, If-*,
Connection, a body, Expect, Upgrade), on an idle connection whose write buffer
is empty, for a chunk that is in the store and intact, with a bulk slot free
and nobody queued for one.  Everything else - HTTP/1.0, pipelined requests,
HEAD, errors, a busy admission queue, any connection that ever carried a body -
goes to aiohttp unchanged, which answers it as it always did (404, 416, 503 and
so on).  The answer here is the same bytes aiohttp's route would send.
"""

from __future__ import annotations

import asyncio
import re
import socket
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from bootd.net.files import OpenFile, chunk_head
from bootd.net.http.bounds import ConnectionBounds, reply
from bootd.net.http.send import ROUTE_CHUNK, Sender, SendWatch, send_start
from bootd.service.admission import AdmissionControl
from bootd.service.boot import CapsuleReader

# Exactly one complete whole-chunk GET: the request line, then well-formed header lines (a token, a
# colon, a value without CR, LF or NUL; no folding) none of which changes the answer (Range, If-*,
# Connection, a body, Expect, Upgrade), then the blank line.  Anything else (a malformed line gets its
# 400 there) is aiohttp's.  One match instead of a Python loop over the lines: it runs per request.
_SIMPLE_GET = re.compile(
    rb"GET /chunks/([0-9a-f]{64}) HTTP/1\.1\r\n"
    rb"(?:(?!(?i:range:|if-|connection:|content-length:|transfer-encoding:|expect:|upgrade:))"
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\0]*\r\n)*"
    rb"\r\n"
)
_HEAD_END = b"\r\n\r\n"
_MAX_REQUEST = 4096

#: The private aiohttp attributes this module (and send.SentResponse) read or write, by class.
#: aiohttp is pinned to the tested range in pyproject.toml; tests/unit/http/test_aiohttp_private.py
#: fails, naming the attribute and aiohttp's version, when an upgrade drops or renames one (a
#: write to a renamed slot would otherwise pass silently and do nothing).
AIOHTTP_PRIVATES: dict[str, tuple[str, ...]] = {
    "web_protocol.RequestHandler": (
        "_waiter", "_messages", "_current_request", "_payload_parser", "_upgraded", "_force_close", "_close",
        "_next_keepalive_close_time", "_loop", "_keepalive_timeout", "_process_keepalive",
    ),
    "web_server.Server": ("_kwargs",),
    "web_runner.BaseRunner": ("_reg_site",),
    "web_runner.TCPSite": (
        "_runner", "_host", "_port", "_backlog", "_reuse_address", "_reuse_port", "_server", "_bound_port",
    ),
    "web_response.StreamResponse": ("_keep_alive",),
}


class ChunkFastPath:
    """Serves simple chunk GETs for :class:`ChunkRequestHandler` with the server's own parts.

    The open-file cache, counters and send/abort paths are the route's (``sender``), the
    chunk files the capsule store's, the bulk slots the route's admission control.
    """

    def __init__(self, sender: Sender, capsules: CapsuleReader, admission: AdmissionControl) -> None:
        self._sender = sender
        self._capsules = capsules
        self._admission = admission
        self._tasks: set[asyncio.Task[None]] = set()
        self.answered = 0  # responses completed here (tests check the path is really taken)

    @staticmethod
    def parse(data: bytes) -> str | None:
        """The chunk's hex name if ``data`` is exactly one simple chunk GET, else None."""
        if len(data) > _MAX_REQUEST:
            return None
        m = _SIMPLE_GET.fullmatch(data)
        return None if m is None else m.group(1).decode("ascii")

    def try_serve(self, proto: ChunkRequestHandler, data: bytes) -> bool:
        """Answer ``data`` here and return True, or return False and touch nothing."""
        name = self.parse(data)
        if name is None:
            return False
        transport = proto.transport
        if transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        source = proto.source
        if not self._admission.try_acquire(source):
            return False  # queue or refuse: aiohttp's route does that, fairly
        entry = self._sender.take(name)
        if entry is None:
            # Not open yet (or changed on disk): the route opens and hashes it off the event loop.
            self._admission.release(source)
            return False
        size = entry.size
        if not size:
            self._sender.files.release(entry)
            self._admission.release(source)
            return False
        try:
            sent = send_start(transport, proto.raw_socket, chunk_head(entry), entry.file, 0, size)
        except OSError as exc:
            self._finish(proto, transport, entry, exc)
            return True
        if sent >= size:
            self._finish(proto, transport, entry, None)
            return True
        # The socket could not take it all at once: the event loop sends the rest, and reading
        # waits (a pipelined request that arrives meanwhile is kept in order by the handler).
        proto.fast_busy = True
        task = asyncio.get_running_loop().create_task(self._send_rest(proto, transport, entry, sent))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send_rest(self, proto: ChunkRequestHandler, transport: asyncio.Transport, entry: OpenFile,
                         sent: int) -> None:
        error: BaseException | None = None
        try:
            await self._sender.send_rest(transport, proto.raw_socket, entry.file, sent, entry.size - sent)
        except (OSError, RuntimeError, asyncio.CancelledError) as exc:
            error = exc
        self._finish(proto, transport, entry, error)
        proto.fast_done()

    def _finish(self, proto: ChunkRequestHandler, transport: asyncio.Transport, entry: OpenFile,
                error: BaseException | None) -> None:
        sender = self._sender
        sender.files.release(entry)
        self._admission.release(proto.source)
        if error is not None:
            sender.abort(transport, entry.key, error)
            return
        self.answered += 1
        sender.count(ROUTE_CHUNK, "GET", 200)
        sender.sent(ROUTE_CHUNK, entry.size)
        proto.fast_answered()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class ChunkRequestHandler(RequestHandler):
    """aiohttp's connection protocol with :class:`ChunkFastPath` in front of its parser, and the bounds.

    The fast path is used only while aiohttp is idle on the connection (waiting for the
    next request, nothing parsed or queued) and only while every byte aiohttp has been
    given ended on a request boundary; once a request with a body, or a partial one,
    reaches aiohttp, the connection stays with aiohttp for good, so the two never
    interleave inside one request.  ``fast=None`` (bench/http ``--plain``) keeps the
    bounds and leaves every request to aiohttp.

    The bounds (bounds.py): the connection is counted in or refused at once, each
    request's headers must arrive in time and within a byte budget, and a malformed
    request is counted by reason and logged at debug instead of as an ERROR traceback.
    """

    def __init__(self, manager: Any, *, fast: ChunkFastPath | None, bounds: ConnectionBounds,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._fast = fast
        self._fast_ok = fast is not None
        self.fast_busy = False
        self._fast_pending = b""
        self._bounds = bounds
        self._refused = False
        self._header_bytes = 0
        self._head_tail = b""  # the last bytes of an unfinished header block (its end may be split)
        self._expect_head = True  # False from a request's end of headers until its response is finished
        self._quiet_errors = False
        self.source = ""
        self.raw_socket: socket.socket | None = None
        self.send_watch: SendWatch | None = None  # set by send.send_rest while it waits on the socket

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if peer else ""
        reason = self._bounds.admit(self.source)
        if reason is not None:
            self._refused = True
            assert isinstance(transport, asyncio.Transport)
            transport.write(reply(503, f"too many connections ({reason}); retry later", "Retry-After: 5\r\n"))
            transport.close()
            return
        super().connection_made(transport)
        # asyncio hands out a TransportSocket without send(); the socket object inside it is the
        # transport's own (one descriptor per connection), used only while the transport's write
        # buffer is empty, so the two never interleave bytes.
        sock = getattr(transport.get_extra_info("socket"), "_sock", None)
        self.raw_socket = sock if isinstance(sock, socket.socket) else None
        self._bounds.headers_started(self, self._loop.time())

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        if self.send_watch is not None:
            self.send_watch.lost()  # before the socket closes: its writer callback must go first
        self.raw_socket = None
        self._bounds.release(self)
        super().connection_lost(exc)

    def close_with(self, status: int, message: str) -> None:
        """End the connection now, telling the client why if the socket takes it."""
        transport = self.transport
        if transport is not None and not transport.is_closing() and not transport.get_write_buffer_size():
            transport.write(reply(status, message))
        self.force_close()
        if transport is not None:
            transport.close()

    def _process_keepalive(self) -> None:
        was_closing = self._force_close
        super()._process_keepalive()
        if self._force_close and not was_closing:
            self._bounds.closed("idle-timeout", self.source)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 400:
            self._bounds.malformed(type(exc).__name__ if exc is not None else "unknown", self.source)
            self._quiet_errors = True
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._quiet_errors = False

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if self._quiet_errors:
            self.logger.debug(*args, **kw)
        else:
            super().log_exception(*args, **kw)

    def data_received(self, data: bytes) -> None:
        if self.fast_busy:
            self._fast_pending += data
            if len(self._fast_pending) > self._bounds.max_header_bytes:
                self._bounds.too_large(self)
            return
        idle = self._current_request is None and not self._messages and self._payload_parser is None
        if (
            idle
            and self._fast_ok
            and self._waiter is not None
            and not self._upgraded
            and not self._force_close
            and not self._close
            and self._fast is not None
            and self._fast.try_serve(self, data)
        ):
            if self._header_bytes:
                self._header_bytes = 0
            self._bounds.headers_done(self)
            return
        if self._fast_ok and not (data.endswith(_HEAD_END) and not any(
                bad in data.lower() for bad in (b"content-length:", b"transfer-encoding:", b"upgrade:"))):
            self._fast_ok = False
        head_done = False
        idle = idle and self._expect_head  # a body still arriving after its headers is not a new request
        if idle:
            # Only the bytes up to the end of the header block count against max_header_bytes: a body
            # that arrives with its headers is the body's business (client_max_size bounds it).
            seen = self._head_tail + data
            end = seen.find(_HEAD_END)
            head_done = end >= 0
            self._header_bytes += (end + len(_HEAD_END) - len(self._head_tail)) if head_done else len(data)
            self._head_tail = b"" if head_done else seen[-(len(_HEAD_END) - 1):]
            self._bounds.headers_started(self, self._loop.time())
        super().data_received(data)
        if idle:
            if head_done or self._messages or self._current_request is not None:
                self._header_bytes = 0
                self._head_tail = b""
                self._expect_head = False
                self._bounds.headers_done(self)
            elif self._header_bytes > self._bounds.max_header_bytes:
                self._bounds.too_large(self)

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """A response through aiohttp is done: the next bytes begin a new request (its headers count)."""
        self._expect_head = True
        return await super().finish_response(request, resp, start_time)

    def fast_answered(self) -> None:
        """A response went out here: keep aiohttp's idle timer counting from now, as after its own."""
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout

    def fast_done(self) -> None:
        """The rest of a big chunk went out: resume with whatever arrived meanwhile."""
        self.fast_busy = False
        pending, self._fast_pending = self._fast_pending, b""
        if pending and self.transport is not None and not self.transport.is_closing():
            self.data_received(pending)


class ChunkSite(web.TCPSite):
    """aiohttp's TCPSite whose connections get :class:`ChunkRequestHandler` as their protocol."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int | None, *,
                 fast: ChunkFastPath | None, bounds: ConnectionBounds, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._fast = fast
        self._bounds = bounds

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does; TCPSite.start would pass aiohttp's factory
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        kwargs = server._kwargs
        fast = self._fast
        bounds = self._bounds

        def factory() -> ChunkRequestHandler:
            return ChunkRequestHandler(server, loop=loop, fast=fast, bounds=bounds, **kwargs)

        self._server = await loop.create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
        bounds.start()

    async def stop(self) -> None:
        await super().stop()
        await self._bounds.stop()
        if self._fast is not None:
            await self._fast.close()
