"""TFTP transport: one listener, one connected UDP socket per transfer (the TID).

All protocol decisions live in :class:`bootd.proto.tftp.ReadSession`; this
module only moves datagrams, drives timers from ``session.get_timer()`` and
decides which file a name means.

Choices, and why:

* Sockets are driven with ``loop.add_reader`` and plain ``send``/``recv``
  rather than asyncio transports: a lock-step transfer is one tiny ACK per
  block, and the protocol/transport layers cost more than the work itself.
* Each transfer socket is ``connect()``-ed to the client: the kernel drops
  datagrams from other TIDs for us, and an ICMP port-unreachable (client gave
  up) surfaces as ConnectionRefusedError so the transfer ends at once instead
  of retrying into the void.
* Over ``max_sessions`` a request is refused at once with an ERROR from the
  listener socket (no new socket, no file opened): a client told "busy" retries,
  a client left waiting stalls the whole boot wave (dnsmasq's cliff).  One
  source address holds at most ``max_sessions_per_source`` of them.  Spoofed
  UDP defeats a per-source cap, so what bounds a flood of requests that are
  never ACKed is the total plus the lifetimes: a client's ``timeout`` option
  above ``max_client_timeout`` is refused (the server's timeout applies) and no
  transfer outlives ``max_session_time``.
* Open files are shared by all transfers of the same file through HTTP's
  open-file cache (bootd/net/files.py; a replaced file gets a fresh
  descriptor) because a boot wave means hundreds of transfers of the same NBP,
  and each fd counts against RLIMIT_NOFILE next to the transfer sockets.
* Timers: one ``call_at`` handle per transfer, re-armed only when the deadline
  moves earlier; a timer that fires before the (later) deadline just re-arms.
  Deadlines move later on every ACK, so this avoids a heap push per block.
* Windowed transfers (RFC 7440) hand the kernel a whole window in one send with
  UDP GSO (UDP_SEGMENT, Linux >= 4.18): one syscall instead of one per block.
  If the route cannot do it (no checksum offload: EIO) the server falls back to
  one send per datagram for good. Windows are capped at 64 KiB by default
  (``max_window_bytes``): a burst bigger than the client's socket buffer loses
  its tail, which only a timeout recovers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from bootd.config import Config, TftpConfig
from bootd.errors import BootdError, RemoteProtocolError
from bootd.metrics import TftpMetrics
from bootd.net.files import OpenFile, OpenFileCache, OutsideRoot, resolve_beneath
from bootd.proto.tftp.packet import (
    ErrorCode,
    ErrorPacket,
    Opcode,
    Request,
    encode_error,
    parse_packet,
)
from bootd.proto.tftp.session import ReadSession, SessionLimits, SessionState
from bootd.ratelog import LogLimiter

__all__ = ["TftpServer"]

log = logging.getLogger("bootd.tftp")

_RECV_SIZE = 65536
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # Linux >= 4.18; Python 3.11 lacks the constant
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65000  # one GSO send must fit an IP datagram (65535 minus headers)
# asyncio's loop.time() is time.monotonic(); calling it directly saves a method call per datagram
# and keeps session times comparable with loop.call_at deadlines.
_monotonic = time.monotonic
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class _Refusal(Exception):
    """A request we answer with an ERROR packet instead of a transfer."""

    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class _Transfer:
    """The I/O half of one transfer: a connected socket, a timer, a send backlog."""

    __slots__ = (
        "_backlog",
        "_closed",
        "_fd",
        "_gso",
        "_loop",
        "_server",
        "_sock",
        "_timer",
        "_timer_at",
        "file",
        "key",
        "peer",
        "session",
    )

    def __init__(
        self,
        server: TftpServer,
        session: ReadSession,
        sock: socket.socket,
        file: OpenFile,
        peer: tuple[Any, ...],
        key: tuple[Any, ...],
        gso: int = 0,
    ) -> None:
        self._server = server
        self._loop = server._loop_or_raise()
        self.session = session
        self._sock = sock
        self._fd = sock.fileno()
        self.file = file
        self.peer = peer
        self.key = key
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._backlog: collections.deque[bytes] = collections.deque()
        self._closed = False
        self._gso = gso

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._on_readable)
        self._flush(_monotonic())

    def _on_readable(self) -> None:
        # One datagram per wakeup: in lock-step there is exactly one ACK waiting, and a
        # second recv() would only cost a syscall plus a BlockingIOError. If more are
        # queued, the (level-triggered) selector calls again right away.
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            self.end("client_gone", "client port unreachable (client gave up)")
            return
        except OSError as exc:
            self.end("socket_error", f"receive failed: {exc.strerror or exc}")
            return
        now = _monotonic()
        self.session.receive_datagram(data, now)
        self._flush(now)

    def _flush(self, now: float) -> None:
        session = self.session
        out = session.datagrams_to_send(now)
        if out:
            self._send(out)
        if session.finished:
            if not self._closed:
                self.end()
            return
        deadline = session.get_timer()
        if deadline is not None and deadline < self._timer_at and not self._closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._closed:
            return
        now = _monotonic()
        deadline = self.session.get_timer()
        if deadline is None:
            return
        if deadline - now > 0.001:  # the deadline moved on since we armed: re-arm, nothing is due
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self.session.handle_timer(max(now, deadline))
        self._flush(now)

    def _send(self, datagrams: list[bytes]) -> None:
        if self._backlog:
            self._backlog.extend(datagrams)
            return
        if self._gso and len(datagrams) > 1 and self._send_gso(datagrams):
            return
        send = self._sock.send
        i = 0
        try:
            for d in datagrams:
                send(d)
                i += 1
        except BlockingIOError:
            # Socket buffer full (large windows): keep the rest and wait for room.
            self._backlog.extend(datagrams[i:])
            self._loop.add_writer(self._fd, self._on_writable)
        except ConnectionRefusedError:
            self.end("client_gone", "client port unreachable (client gave up)")
        except OSError as exc:
            self.end("socket_error", f"send failed: {exc.strerror or exc}")

    def _send_gso(self, datagrams: list[bytes]) -> bool:
        """Send a window with UDP GSO: one syscall, the kernel cuts it into datagrams.

        Every datagram but the last of a send must be exactly the segment size, which
        a window of full blocks is. Returns False (nothing sent) when the window does
        not have that shape or GSO failed, so the caller sends one by one.
        """
        seg = self._gso
        last = len(datagrams) - 1
        for d in datagrams[:last]:
            if len(d) != seg:
                return False
        if len(datagrams[last]) > seg:
            return False
        per_send = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // seg)
        # Per-send ancillary data, not the socket option: OACK and ERROR packets can be
        # longer than a tiny block (blksize 8) and must never be cut into segments.
        cmsg = [(socket.SOL_UDP, _UDP_SEGMENT, struct.pack("=H", seg))]
        sendmsg = self._sock.sendmsg
        send = self._sock.send
        for start in range(0, len(datagrams), per_send):
            group = datagrams[start : start + per_send]
            try:
                if len(group) > 1:
                    sendmsg([b"".join(group)], cmsg)
                else:
                    send(group[0])
            except BlockingIOError:
                self._backlog.extend(datagrams[start:])
                self._loop.add_writer(self._fd, self._on_writable)
                return True
            except ConnectionRefusedError:
                self.end("client_gone", "client port unreachable (client gave up)")
                return True
            except OSError as exc:
                if start:
                    raise  # pragma: no cover - GSO worked for the first group of this very window
                # No checksum offload on the route (EIO) or an old kernel: fall back for good.
                log.info("event=tftp_gso_off error=%r detail='sending datagrams one by one'", exc.strerror or exc)
                self._server._gso_usable = False
                self._gso = 0
                return False
        return True

    def _on_writable(self) -> None:
        backlog = self._backlog
        send = self._sock.send
        while backlog:
            try:
                send(backlog[0])
            except BlockingIOError:
                return
            except OSError as exc:
                backlog.clear()
                self._loop.remove_writer(self._fd)
                self.end("socket_error", f"send failed: {exc.strerror or exc}")
                return
            backlog.popleft()
        self._loop.remove_writer(self._fd)

    def end(self, reason: str = "", message: str = "") -> None:
        """Close the endpoint; ``reason`` set means the transport (not the protocol) ended it."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        self._loop.remove_reader(self._fd)
        if self._backlog:
            self._loop.remove_writer(self._fd)
            # Best effort: the backlog may end with the ERROR that tells the client why.
            with contextlib.suppress(OSError):
                while self._backlog:
                    self._sock.send(self._backlog.popleft())
            self._backlog.clear()
        self._sock.close()
        self._server._transfer_done(self, reason, message)


class TftpServer:
    """Read-only TFTP server over a list of root directories searched in order.

    ``roots`` is typically ``[config.tftp.root, config.tftp.nbp_dir]``: the first
    root that contains the name serves it. Pass ``port=0`` in tests and read
    :attr:`port` after :meth:`start`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        roots: Sequence[str | os.PathLike[str]],
        *,
        max_sessions: int = TftpConfig.max_sessions,
        timeout: float = TftpConfig.timeout,
        retries: int = TftpConfig.retries,
        max_blksize: int = TftpConfig.max_blksize,
        max_windowsize: int = TftpConfig.max_windowsize,
        max_window_bytes: int = 65536,
        max_client_timeout: float = TftpConfig.max_client_timeout,
        max_session_time: float = TftpConfig.max_session_time,
        max_sessions_per_source: int = TftpConfig.max_sessions_per_source,
        listen_interface: str | None = None,
        metrics: CollectorRegistry | None = None,
        use_gso: bool = True,
    ) -> None:
        """Defaults are [tftp]'s (bootd.config.TftpConfig); ``from_config`` passes a whole section."""
        if not roots:
            raise BootdError("TFTP: at least one root directory is needed")
        self._host = host
        self._port = port
        self._roots = [os.path.realpath(os.fspath(r)) for r in roots]
        self._root_names = [os.fspath(r) for r in roots]
        self.max_sessions = max_sessions
        self._limits = SessionLimits(
            timeout=timeout,
            retries=retries,
            max_blksize=max_blksize,
            max_windowsize=max_windowsize,
            max_window_bytes=max_window_bytes,
            max_client_timeout=max_client_timeout,
            max_lifetime=max_session_time,
        )
        self.max_sessions_per_source = max_sessions_per_source
        self._per_source: collections.Counter[str] = collections.Counter()
        self._interface = listen_interface
        # Without a collector registry (tests, bench/tftp) the counters still count, on one of their own.
        self.metrics = TftpMetrics(metrics if metrics is not None else CollectorRegistry())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._family = socket.AF_INET
        self._bind_host = host
        self._transfers: dict[tuple[Any, ...], _Transfer] = {}
        self._files = OpenFileCache(keep_unused=False, follow_symlinks=False)
        self._gso_usable = use_gso
        self._busy_log = LogLimiter()
        self._failed_log = LogLimiter()

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._sock is None:
            raise BootdError("TFTP server is not started")
        return int(self._sock.getsockname()[1])

    @property
    def active_transfers(self) -> int:
        return len(self._transfers)

    @property
    def open_files(self) -> int:
        return len(self._files)

    @property
    def stats(self) -> collections.Counter[str]:
        """The counters under short names ("completed", "failed:timeout", ...), read from the metrics."""
        return self.metrics.tally()

    def _loop_or_raise(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise BootdError("TFTP server is not started")
        return self._loop

    @classmethod
    def from_config(cls, config: Config, metrics: CollectorRegistry | None = None) -> TftpServer:
        """The server of the [tftp] section: its root, then the NBP directory."""
        t = config.tftp
        return cls(t.listen, t.port, [t.root, t.nbp_dir], max_sessions=t.max_sessions, timeout=t.timeout,
                   retries=t.retries, max_blksize=t.max_blksize, max_windowsize=t.max_windowsize,
                   max_client_timeout=t.max_client_timeout, max_session_time=t.max_session_time,
                   max_sessions_per_source=t.max_sessions_per_source, listen_interface=config.server.interface,
                   metrics=metrics)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        where = f"{self._host}:{self._port}"
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise BootdError(f"TFTP: cannot resolve listen address {self._host!r}: {exc.strerror}") from exc
        family, _, _, _, sockaddr = infos[0]
        self._family = socket.AddressFamily(family)
        self._bind_host = str(sockaddr[0])
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if self._interface:
                self._bind_device(sock)
            try:
                # Absorb a boot wave of RRQs; the kernel caps this at rmem_max silently.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            sock.bind(sockaddr)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            hint = ""
            if exc.errno == errno.EACCES:
                hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
            elif exc.errno == errno.EADDRINUSE:
                hint = " (another TFTP server, e.g. tftpd-hpa or dnsmasq, is probably running)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                hint = " (no local interface has that address)"
            raise BootdError(f"TFTP: cannot listen on {where}: {exc.strerror}{hint}") from exc
        self._sock = sock
        for name, real in zip(self._root_names, self._roots, strict=True):
            if not os.path.isdir(real):
                log.warning("event=tftp_root_missing root=%s detail='not a directory, nothing is served from it'", name)
        self._loop.add_reader(sock.fileno(), self._on_request_readable)
        log.info("event=tftp_listening address=%s:%d roots=%s", self._host, self.port, ",".join(self._root_names))

    def _bind_device(self, sock: socket.socket) -> None:
        assert self._interface is not None
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self._interface.encode())
        except OSError as exc:
            hint = " (needs CAP_NET_RAW)" if exc.errno == errno.EPERM else ""
            raise BootdError(f"TFTP: cannot bind to interface {self._interface!r}: {exc.strerror}{hint}") from exc

    async def close(self) -> None:
        """Stop listening and end every transfer, telling each client why."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for t in list(self._transfers.values()):
            try:
                t._sock.send(encode_error(ErrorCode.NOT_DEFINED, "server shutting down"))
            except OSError:
                pass
            t.end("shutdown", "server shutting down")
        self._files.close()

    # ------------------------------------------------------------------ requests
    def _on_request_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):
            try:
                data, addr = sock.recvfrom(_RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                # ICMP errors from refusals we sent land here; they concern nobody.
                log.debug("event=tftp_listener_error error=%r", exc)
                continue
            try:
                self._on_request(data, addr)
            except Exception:  # a bug for one request must not take the listener down
                log.exception("event=tftp_bug peer=%s", addr[0])

    def _reply(self, addr: tuple[Any, ...], code: int, message: str, reason: str) -> None:
        assert self._sock is not None
        self._count_error(reason)
        try:
            self._sock.sendto(encode_error(code, message), addr)
        except OSError as exc:
            log.debug("event=tftp_reply_failed peer=%s error=%r", addr[0], exc)

    def _on_request(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            pkt = parse_packet(data)
        except RemoteProtocolError as exc:
            # debug only: a flood of garbage must not flood the journal (it is counted by reason)
            log.debug("event=tftp_malformed peer=%s:%d detail=%r", addr[0], addr[1], str(exc))
            self._reply(addr, ErrorCode.ILLEGAL_OPERATION, f"malformed request: {exc}", exc.reason)
            return
        if not isinstance(pkt, Request):
            if isinstance(pkt, ErrorPacket):
                return  # never answer an ERROR (no loops between two servers)
            self._reply(
                addr,
                ErrorCode.UNKNOWN_TID,
                "unknown transfer ID: this port only accepts read requests",
                "unknown_tid",
            )
            return
        if pkt.opcode == Opcode.WRQ:
            log.info("event=tftp_refused peer=%s file=%r reason=write_request", addr[0], pkt.filename)
            self._reply(addr, ErrorCode.ACCESS_VIOLATION, "write requests are not accepted", "write_request")
            return
        key = (addr, data)
        existing = self._transfers.get(key)
        if existing is not None:
            if existing.session.acks_received == 0:
                # The client repeated its request before our first answer reached it; the
                # running transfer's timer retransmits, a second transfer would only compete.
                self.metrics.duplicates.inc()
                return
            # Same port, same request, after it had started: the client began again from scratch.
            existing.end("restarted", "client sent the same request again and started over")
        if len(self._transfers) >= self.max_sessions:
            self._refuse_busy(addr, f"server busy: {len(self._transfers)} transfers in progress, try again", "busy")
            return
        if self._per_source[addr[0]] >= self.max_sessions_per_source:
            self._refuse_busy(addr, f"server busy: {self.max_sessions_per_source} transfers from {addr[0]} in "
                                    "progress already, try again", "per_source")
            return
        try:
            real, st = self._resolve(pkt.filename)
            shared = self._open(real, st)
        except _Refusal as r:
            # pxelinux probes a dozen config names per boot: "not found" is routine, keep it at debug
            log.log(
                logging.DEBUG if r.reason == "not_found" else logging.INFO,
                "event=tftp_refused peer=%s file=%r reason=%s detail=%r",
                addr[0],
                pkt.filename,
                r.reason,
                r.message,
            )
            self._reply(addr, r.code, r.message, r.reason)
            return
        try:
            session = ReadSession(pkt, shared, now=_monotonic(), limits=self._limits)
        except RemoteProtocolError as exc:
            self._files.release(shared)
            self._reply(addr, ErrorCode.ILLEGAL_OPERATION, str(exc), exc.reason)
            return
        try:
            sock = self._transfer_socket(addr, session)
        except OSError as exc:
            self._files.release(shared)
            self._refuse_busy(
                addr, f"server busy: cannot open a transfer socket ({exc.strerror}), try again", "no_socket"
            )
            return
        gso = self._gso_segment(session)
        transfer = _Transfer(self, session, sock, shared, addr, key, gso)
        self._transfers[key] = transfer
        self._per_source[addr[0]] += 1
        self.metrics.started.inc()
        self.metrics.active.inc()
        log.debug(
            "event=tftp_start peer=%s:%d file=%r mode=%s blksize=%d windowsize=%d options=%s",
            addr[0],
            addr[1],
            pkt.filename,
            pkt.mode,
            session.blksize,
            session.windowsize,
            ",".join(f"{k}={v}" for k, v in pkt.options.items()) or "-",
        )
        transfer.start()

    def _refuse_busy(self, addr: tuple[Any, ...], message: str, reason: str) -> None:
        self.metrics.refused.labels(reason).inc()
        # A boot wave above the limit refuses thousands of requests: one line per second is enough.
        held = self._busy_log.allow()
        if held is not None:
            log.warning(
                "event=tftp_busy peer=%s reason=%s detail=%r suppressed=%d",
                addr[0],
                reason,
                message,
                held,
            )
        self._reply(addr, ErrorCode.NOT_DEFINED, message, reason)

    def _transfer_socket(self, addr: tuple[Any, ...], session: ReadSession) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            if self._interface:
                sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self._interface.encode())
            burst = session.windowsize * (session.blksize + 4)
            if burst > 128 * 1024:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(2 * burst, 8 << 20))
                except OSError:
                    pass
            sock.bind((self._bind_host, 0))
            sock.connect(addr)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _gso_segment(self, session: ReadSession) -> int:
        """Windowed transfers send whole windows with UDP GSO; returns the segment size or 0."""
        if not self._gso_usable or session.windowsize < 2:
            return 0
        return session.blksize + 4

    # ------------------------------------------------------------------ files
    def _resolve(self, name: str) -> tuple[str, os.stat_result]:
        """Map a requested name to a regular file inside one of the roots, or refuse why not."""
        rel = name.lstrip("/")  # PXE ROMs and pxelinux send absolute-looking names
        if not rel:
            raise _Refusal(ErrorCode.FILE_NOT_FOUND, f"file not found: {name!r} names no file", "not_found")
        if ".." in rel.split("/"):
            raise _Refusal(ErrorCode.ACCESS_VIOLATION, f"access violation: '..' is not allowed in {name!r}", "dotdot")
        for root in self._roots:
            candidate = os.path.join(root, rel)
            if not os.path.lexists(candidate):
                continue
            try:
                _, real = resolve_beneath(root, rel)
            except OutsideRoot:
                raise _Refusal(
                    ErrorCode.ACCESS_VIOLATION,
                    f"access violation: {name!r} is a symlink that leads outside the TFTP root",
                    "outside_root",
                ) from None
            try:
                st = os.stat(real)
            except FileNotFoundError:
                raise _Refusal(
                    ErrorCode.FILE_NOT_FOUND, f"file not found: {name!r} is a dangling symlink", "not_found"
                ) from None
            except OSError as exc:
                raise _Refusal(
                    ErrorCode.ACCESS_VIOLATION, f"access violation: {name!r}: {exc.strerror}", "stat_failed"
                ) from None
            if not stat.S_ISREG(st.st_mode):
                what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise _Refusal(ErrorCode.ACCESS_VIOLATION, f"access violation: {name!r} is {what}", "not_regular")
            return real, st
        raise _Refusal(ErrorCode.FILE_NOT_FOUND, f"file not found: {name!r}", "not_found")

    def _open(self, real: str, st: os.stat_result) -> OpenFile:
        """The shared open file of ``real`` (a reference the transfer releases), or refuse why not."""
        try:
            shared = self._files.acquire(real, lambda: real, revalidate=True)
        except PermissionError:
            raise _Refusal(ErrorCode.ACCESS_VIOLATION, "access violation: permission denied", "permission") from None
        except IsADirectoryError:
            raise _Refusal(ErrorCode.NOT_DEFINED, "file was replaced while opening it, try again", "raced") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Refusal(ErrorCode.NOT_DEFINED, "file was replaced while opening it, try again",
                               "raced") from None
            reason = "no_fd" if exc.errno in (errno.EMFILE, errno.ENFILE) else "open_failed"
            raise _Refusal(ErrorCode.NOT_DEFINED, f"cannot open file: {exc.strerror}", reason) from None
        if shared.ident[:2] != (st.st_dev, st.st_ino):
            self._files.release(shared)
            raise _Refusal(ErrorCode.NOT_DEFINED, "file was replaced while opening it, try again", "raced")
        return shared

    # ------------------------------------------------------------------ bookkeeping
    def _count_error(self, reason: str) -> None:
        self.metrics.errors.labels(reason).inc()

    def _transfer_done(self, t: _Transfer, reason: str, message: str) -> None:
        if self._transfers.get(t.key) is t:
            del self._transfers[t.key]
            source = t.peer[0]
            left = self._per_source[source] - 1
            if left > 0:
                self._per_source[source] = left
            else:
                del self._per_source[source]
        self._files.release(t.file)
        s = t.session
        now = _monotonic()
        elapsed = max((s.finished_at or now) - s.started_at, 1e-9)
        m = self.metrics
        m.active.dec()
        m.bytes.inc(s.bytes_sent)
        m.retransmits.inc(s.retransmits)
        who = f"{t.peer[0]}:{t.peer[1]}"
        if not reason and s.state is SessionState.COMPLETE:
            m.completed.labels("complete").inc()
            log.info(
                "event=tftp_sent peer=%s file=%r bytes=%d seconds=%.3f mb_per_s=%.1f blksize=%d windowsize=%d "
                "retransmits=%d",
                who,
                s.filename,
                s.bytes_sent,
                elapsed,
                s.bytes_sent / elapsed / 1e6,
                s.blksize,
                s.windowsize,
                s.retransmits,
            )
        elif not reason and s.state is SessionState.SIZE_PROBE:
            m.completed.labels("size_probe").inc()
            log.info("event=tftp_size_probe peer=%s file=%r detail=%r", who, s.filename, s.message)
        else:
            reason = reason or s.reason or "unknown"
            message = message or s.message
            m.failed.labels(reason).inc()
            # Spoofed requests all fail alike (timeout, lifetime): one line per reason a second.
            held = self._failed_log.allow(reason)
            if held is not None:
                log.warning(
                    "event=tftp_failed peer=%s file=%r reason=%s bytes=%d detail=%r suppressed=%d",
                    who,
                    s.filename,
                    reason,
                    s.bytes_sent,
                    message,
                    held,
                )
