"""What one HTTP client may hold: connections, time to send its headers, bytes of an unfinished request.

The provisioning LAN is shared, and any host on it can open connections and
never finish a request, or never read an answer.  Each connection is
counted in at accept (in total and per source address, see
``bootd.service.admission.ConnectionLimits``), must complete each request's
headers within ``http.header_timeout`` and in at most ``http.max_header_bytes``,
and is closed after ``http.idle_timeout`` of keep-alive idleness (aiohttp's own
timer, set from the config).  A bulk send that stalls is cut by send.py.

Every refusal or forced close answers a one-line reason when it can (503, 408,
431), is counted in /metrics by reason, and is logged at most once a second
per reason (a flood must not flood the journal too).  Header deadlines are
checked by one sweep task, not a timer per request, so the fast path pays
nothing but a dict insert when a request arrives in pieces.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Protocol

from bootd.config import Config
from bootd.metrics import HttpBoundsMetrics
from bootd.ratelog import LogLimiter
from bootd.service.admission import ConnectionLimits, TrustedNetworks

log = logging.getLogger("bootd.http")

#: Descriptors kept back from the connection cap for everything else (open files, the database, logs).
_RESERVED_FDS = 256
#: The listen backlog: asyncio accepts up to this many connections per wakeup, and a refused one is
#: closed an event-loop iteration or two later, so up to twice this many descriptors may be in use
#: beyond the cap for a moment.
BACKLOG = 1024


class Bounded(Protocol):
    """The connection side :class:`ConnectionBounds` acts on (the chunk request handler)."""

    source: str

    def close_with(self, status: int, message: str) -> None: ...


def _reply(status: int, reason: str, message: str, extra: str = "") -> bytes:
    body = (message + "\n").encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body


_STATUS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def reply(status: int, message: str, extra: str = "") -> bytes:
    """A complete plain-text answer that ends the connection (written straight to the transport)."""
    return _reply(status, _STATUS[status], message, extra)


def descriptor_budget(config: Config) -> int:
    """Raise the soft descriptor limit toward what the connection cap needs; return the cap it allows.

    Each connection is one descriptor; running out of them makes accept() fail in a loop, so the
    cap stays below the limit with room for one accept burst, files, TFTP sessions and the database.
    """
    reserve = 2 * BACKLOG + _RESERVED_FDS + (config.tftp.max_sessions if config.tftp.enabled else 0)
    want = config.http.max_connections + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return config.http.max_connections
    allowed = max(16, min(config.http.max_connections, soft - reserve))
    if allowed < config.http.max_connections:
        log.warning("event=connection-cap-lowered max_connections=%d allowed=%d nofile=%d (raise LimitNOFILE)",
                    config.http.max_connections, allowed, soft)
    return allowed


class ConnectionBounds:
    """The per-connection bounds of one HTTP listener, shared by all its connections."""

    def __init__(self, config: Config, metrics: HttpBoundsMetrics | None = None, *,
                 max_connections: int | None = None) -> None:
        h = config.http
        self.trusted = TrustedNetworks(h.trusted)
        self.limits = ConnectionLimits(max_connections or h.max_connections, h.max_connections_per_source,
                                       self.trusted)
        self.header_timeout = h.header_timeout
        self.max_header_bytes = h.max_header_bytes
        self.metrics = metrics
        self._log = LogLimiter(1.0)
        self._pending: dict[Bounded, float] = {}  # connections inside a request's headers -> deadline
        self._sweeper: asyncio.Task[None] | None = None

    # -- accounting -------------------------------------------------------------------------
    def admit(self, source: str) -> str | None:
        """None, or why a new connection from ``source`` is refused (counted and logged here)."""
        reason = self.limits.admit(source)
        if reason is not None:
            if self.metrics is not None:
                self.metrics.refused.labels(reason=reason).inc()
            self._note("event=http-connection-refused reason=%s source=%s", reason, source)
        return reason

    def release(self, conn: Bounded) -> None:
        self._pending.pop(conn, None)
        self.limits.release(conn.source)

    def _note(self, fmt: str, reason: str, source: str, level: int = logging.WARNING) -> None:
        held = self._log.allow(reason)
        if held is not None:
            log.log(level, fmt + " held_back=%d", reason, source, held)

    def closed(self, reason: str, source: str) -> None:
        """A bound closed a connection: count it, log it (rate-limited)."""
        if self.metrics is not None:
            self.metrics.closed.labels(reason=reason).inc()
        self._note("event=http-connection-closed reason=%s source=%s", reason, source,
                   logging.INFO if reason == "idle-timeout" else logging.WARNING)

    def malformed(self, reason: str, source: str) -> None:
        """A request aiohttp could not parse (400): counted by reason, logged at debug."""
        if self.metrics is not None:
            self.metrics.malformed.labels(reason=reason).inc()
        self._note("event=http-malformed reason=%s source=%s", reason, source, logging.DEBUG)

    # -- header deadline --------------------------------------------------------------------
    def headers_started(self, conn: Bounded, now: float) -> None:
        if conn not in self._pending:
            self._pending[conn] = now + self.header_timeout

    def headers_done(self, conn: Bounded) -> None:
        self._pending.pop(conn, None)

    def too_large(self, conn: Bounded) -> None:
        self._pending.pop(conn, None)
        self.closed("header-too-large", conn.source)
        conn.close_with(431, f"request headers longer than {self.max_header_bytes} bytes; connection closed")

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        tick = min(1.0, self.header_timeout / 4)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            late = [conn for conn, deadline in self._pending.items() if deadline <= now]
            for conn in late:
                self._pending.pop(conn, None)
                self.closed("header-timeout", conn.source)
                conn.close_with(408, f"request headers not complete within {self.header_timeout:g} s; "
                                     "connection closed")
