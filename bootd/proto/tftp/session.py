"""One read transfer as a sans-I/O state machine (the aioquic shape).

The transport feeds datagrams and the current (monotonic) time in, asks for
datagrams to send and for the next timer, and calls ``handle_timer`` when the
timer fires. Nothing here knows about sockets or event loops, so loss,
duplication, reordering and timeouts are all plain unit tests.

Retransmission policy, and why:

* Only the timer retransmits. A duplicate ACK of the block before the window
  is ignored: answering it is exactly what causes the sorcerer's apprentice
  syndrome (RFC 1123 4.2.3.1), where every delayed ACK doubles the traffic.
* An ACK for a block inside the window that was sent (RFC 7440 "partial ACK",
  the client saw a gap) is new information: the window restarts after it.
* Block numbers on the wire are 16 bit; internally blocks are counted without
  wrapping (block 65536 goes out as 0, as tftp-hpa, atftp, curl and iPXE
  expect), and an ACK is mapped back to the only candidate at or after the
  last acknowledged block, so files above 32 MiB at 512 bytes just work.
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass
from typing import Protocol

from bootd.errors import LocalProtocolError, RemoteProtocolError
from bootd.proto.tftp.packet import (
    MAX_BLKSIZE,
    MODES,
    Ack,
    Data,
    ErrorCode,
    ErrorPacket,
    OAck,
    Opcode,
    Request,
    encode_error,
    encode_oack,
    negotiate,
    parse_packet,
)

__all__ = ["FileSource", "MemorySource", "ReadSession", "SessionLimits", "SessionState"]

_pack_hdr = struct.Struct("!HH").pack


class FileSource(Protocol):
    """What a session reads from: the transport shares one open file between transfers."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, n: int) -> bytes:
        """Return up to ``n`` bytes at ``offset`` (fewer only at end of file)."""
        ...


class MemorySource:
    """A FileSource over bytes, for tests and small generated files."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, n: int) -> bytes:
        return self._data[offset : offset + n]


class SessionState(enum.Enum):
    NEGOTIATING = "negotiating"  # OACK sent, waiting for ACK 0
    SENDING = "sending"
    COMPLETE = "complete"
    SIZE_PROBE = "size_probe"  # client asked for tsize and stopped after the OACK: normal (EDK2)
    FAILED = "failed"


_NEGOTIATING = SessionState.NEGOTIATING  # module constants: enum attribute access is slow on the hot path


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Server-side knobs; the client's options are clamped to these."""

    timeout: float = 1.0
    retries: int = 5
    max_blksize: int = MAX_BLKSIZE
    max_windowsize: int = 64
    max_window_bytes: int = 65536  # cap on windowsize * blksize, 0: none (see negotiate())
    max_client_timeout: float = 255.0  # a client's timeout option above this is refused (see negotiate())
    max_lifetime: float = 0.0  # a transfer still running after this many seconds fails; 0: no limit


class _SourceChanged(Exception):
    pass


class _OctetBlocks:
    """Blocks cut from read-ahead chunks: one source read serves many small blocks.

    Retransmits that fall before the current chunk simply read again (page cache),
    so nothing but one chunk is held per transfer.
    """

    READ_AHEAD = 65536

    def __init__(self, source: FileSource, blksize: int) -> None:
        self._source = source
        self._blksize = blksize
        self._size = source.size
        self._chunk = memoryview(b"")
        self._chunk_off = 0
        self._chunk_len = max(blksize, self.READ_AHEAD // blksize * blksize)
        self.last: int | None = self._size // blksize + 1

    def get(self, idx: int) -> bytes | memoryview:
        off = (idx - 1) * self._blksize
        want = min(self._blksize, self._size - off)
        rel = off - self._chunk_off
        if rel < 0 or rel + want > len(self._chunk):
            n = min(self._chunk_len, self._size - off)
            self._chunk = memoryview(self._source.read(off, n))
            self._chunk_off = off
            if len(self._chunk) != n:
                raise _SourceChanged
            rel = 0
        return self._chunk[rel : rel + want]

    def release_below(self, idx: int) -> None:
        pass


class _NetasciiBlocks:
    """Converts LF to CR LF and CR to CR NUL (RFC 764) as a stream cut into blocks.

    The converted size is not known in advance, so converted blocks are kept
    from the oldest unacknowledged one onward for retransmission.
    """

    _CHUNK = 65536

    def __init__(self, source: FileSource, blksize: int) -> None:
        self._source = source
        self._blksize = blksize
        self._offset = 0
        self._buf = b""
        self._cache: dict[int, bytes] = {}
        self._generated = 0
        self.last: int | None = None

    def _fill(self) -> bool:
        data = self._source.read(self._offset, self._CHUNK)
        if not data:
            return False
        self._offset += len(data)
        self._buf += data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
        return True

    def get(self, idx: int) -> bytes | memoryview:
        while self._generated < idx:
            while len(self._buf) < self._blksize and self._fill():
                pass
            block, self._buf = self._buf[: self._blksize], self._buf[self._blksize :]
            self._generated += 1
            self._cache[self._generated] = block
            if len(block) < self._blksize:
                self.last = self._generated
        return self._cache[idx]

    def release_below(self, idx: int) -> None:
        for k in [k for k in self._cache if k < idx]:
            del self._cache[k]


class ReadSession:
    """Serve one file to one client (one TID pair) and say when it is over.

    Construction negotiates options and queues the first datagrams (an OACK or
    the first window); raises RemoteProtocolError(reason="bad_mode") for modes
    other than octet and netascii so the transport can answer ERROR 4.
    """

    def __init__(
        self,
        request: Request,
        source: FileSource,
        *,
        now: float,
        limits: SessionLimits | None = None,
    ) -> None:
        if request.opcode != Opcode.RRQ:
            raise LocalProtocolError("ReadSession only serves read requests", reason="not_rrq")
        if request.mode not in MODES:
            raise RemoteProtocolError(
                f"transfer mode {request.mode!r} is not supported (use octet or netascii)", reason="bad_mode"
            )
        limits = limits or SessionLimits()
        self.request = request
        self.filename = request.filename
        self.mode = request.mode
        netascii = request.mode == "netascii"
        size = source.size
        nego = negotiate(
            request.options,
            size=None if netascii else size,
            default_timeout=limits.timeout,
            max_blksize=limits.max_blksize,
            max_windowsize=limits.max_windowsize,
            max_window_bytes=limits.max_window_bytes,
            max_timeout=limits.max_client_timeout,
        )
        self.blksize = nego.blksize
        self.windowsize = nego.windowsize
        self.timeout = nego.timeout
        self.oack = nego.oack
        self.file_size = size
        self._retries = limits.retries
        self._netascii = netascii
        self._blocks: _OctetBlocks | _NetasciiBlocks = (
            _NetasciiBlocks(source, self.blksize) if netascii else _OctetBlocks(source, self.blksize)
        )

        self.state = SessionState.NEGOTIATING if nego.oack else SessionState.SENDING
        #: True once the transfer is over (complete, size probe or failed); a plain attribute
        #: rather than a property because the transport reads it for every datagram.
        self.finished = False
        self.reason = ""  # slug when FAILED (or "size_probe")
        self.message = ""  # human explanation of how it ended, for the log
        self.started_at = now
        self.finished_at: float | None = None

        # counters
        self.bytes_sent = 0  # payload bytes, first transmissions only
        self.blocks_sent = 0
        self.retransmits = 0  # datagrams sent again (DATA or OACK)
        self.timeouts = 0
        self.duplicate_acks = 0
        self.stale_acks = 0
        self.acks_received = 0

        self._base = 1  # oldest unacknowledged block (absolute, never wraps)
        self._highest_sent = 0
        self._tries = 0
        self._pending: list[bytes] = []
        self._want_window = self.state is SessionState.SENDING
        self._deadline: float | None = now + self.timeout
        # Whatever the client does (ACK once every timeout - 1 s, forever), the session ends by then.
        self._expires = now + limits.max_lifetime if limits.max_lifetime > 0 else math.inf
        self._lifetime = limits.max_lifetime
        if nego.oack:
            self._oack_packet = encode_oack(nego.oack)
            self._pending.append(self._oack_packet)

    # ------------------------------------------------------------------ status
    @property
    def ok(self) -> bool:
        """True when the transfer ended the way the client wanted (complete or size probe)."""
        return self.state is SessionState.COMPLETE or self.state is SessionState.SIZE_PROBE

    # ------------------------------------------------------------------ input
    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.finished or (now >= self._expires and self._expired(now)):
            return
        if len(data) >= 4 and data[1] == 4 and data[0] == 0:  # ACK: the hot path, skip the codec
            self._on_ack((data[2] << 8) | data[3], now)
            return
        try:
            pkt = parse_packet(data)
        except RemoteProtocolError as exc:
            self._fail(f"malformed packet: {exc}", "malformed", ErrorCode.ILLEGAL_OPERATION, now)
            return
        if isinstance(pkt, ErrorPacket):
            self._on_error(pkt, now)
        elif isinstance(pkt, Ack):  # pragma: no cover - handled by the fast path
            self._on_ack(pkt.block, now)
        else:
            kind = {Data: "DATA", OAck: "OACK"}.get(type(pkt), "a request")
            self._fail(
                f"illegal operation: got {kind} on a read transfer, expected ACK",
                "illegal_op",
                ErrorCode.ILLEGAL_OPERATION,
                now,
            )

    def _on_ack(self, block: int, now: float) -> None:
        self.acks_received += 1
        if self.state is _NEGOTIATING:
            if block == 0:
                self.state = SessionState.SENDING
                self._tries = 0
                self._want_window = True
            else:
                self.stale_acks += 1
            return
        prev = self._base - 1
        idx = prev + ((block - prev) & 0xFFFF)
        if idx > self._highest_sent:
            # Not something we sent in this window: a stale ACK from before a wrap, or noise.
            self.stale_acks += 1
            return
        if idx == prev:
            # Duplicate: never answered (sorcerer's apprentice); the timer covers real loss.
            self.duplicate_acks += 1
            return
        self._base = idx + 1
        self._tries = 0
        if self._netascii:
            self._blocks.release_below(self._base)
        last = self._blocks.last
        if last is not None and idx >= last:
            self.state = SessionState.COMPLETE
            self.finished = True
            self.message = f"sent {self.bytes_sent} bytes"
            self.finished_at = now
            self._deadline = None
            self._want_window = False
        else:
            self._want_window = True

    def _on_error(self, pkt: ErrorPacket, now: float) -> None:
        negotiating = self.state is SessionState.NEGOTIATING
        self._want_window = False
        self._deadline = None
        self.finished_at = now
        self.finished = True
        if negotiating and pkt.code == ErrorCode.OPTION_REFUSED and "tsize" in self.oack:
            self.state = SessionState.SIZE_PROBE
            self.reason = "size_probe"
            self.message = f"client read the size ({self.file_size} bytes) and ended: {pkt.message!r}"
            return
        self.state = SessionState.FAILED
        if negotiating and pkt.code == ErrorCode.OPTION_REFUSED:
            self.reason = "options_refused"
        else:
            self.reason = "client_error"
        self.message = f"client sent ERROR {pkt.code}: {pkt.message!r}"

    # ------------------------------------------------------------------ timer
    def get_timer(self) -> float | None:
        deadline = self._deadline
        if deadline is None or deadline < self._expires:
            return deadline
        return self._expires

    def _expired(self, now: float) -> bool:
        if now < self._expires:
            return False
        self._fail(f"transfer took longer than the server allows ({self._lifetime:g} s)", "lifetime",
                   ErrorCode.NOT_DEFINED, now)
        return True

    def handle_timer(self, now: float) -> None:
        if self.finished or self._expired(now):
            return
        if self._deadline is None or now < self._deadline:
            return
        if self._tries >= self._retries:
            waiting = "ACK of the OACK" if self.state is SessionState.NEGOTIATING else f"ACK of block {self._base}"
            self._fail(
                f"timed out: no {waiting} after {self._retries} retransmissions",
                "timeout",
                ErrorCode.NOT_DEFINED,
                now,
            )
            return
        self._tries += 1
        self.timeouts += 1
        if self.state is SessionState.NEGOTIATING:
            self._pending.append(self._oack_packet)
            self.retransmits += 1
        else:
            self._want_window = True
        self._deadline = now + self.timeout

    # ------------------------------------------------------------------ output
    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = self._pending
        self._pending = []
        if self._want_window:
            self._want_window = False
            try:
                self._emit_window(out)
            except _SourceChanged:
                self._fail("file changed on the server during the transfer", "file_changed", ErrorCode.NOT_DEFINED, now)
                out.extend(self._pending)
                self._pending = []
        if out and not self.finished:
            self._deadline = now + self.timeout
        return out

    def _emit_window(self, out: list[bytes]) -> None:
        blocks = self._blocks
        idx = self._base
        end = self._base + self.windowsize
        highest = self._highest_sent
        while idx < end:
            last = blocks.last
            if last is not None and idx > last:
                break
            payload = blocks.get(idx)
            out.append(_pack_hdr(3, idx & 0xFFFF) + payload)
            if idx > highest:
                highest = idx
                self.bytes_sent += len(payload)
                self.blocks_sent += 1
            else:
                self.retransmits += 1
            idx += 1
        self._highest_sent = highest

    def _fail(self, message: str, reason: str, code: int, now: float) -> None:
        """End the transfer and tell the client why (every refusal says why)."""
        self.state = SessionState.FAILED
        self.finished = True
        self.reason = reason
        self.message = message
        self.finished_at = now
        self._deadline = None
        self._want_window = False
        self._pending.append(encode_error(code, message))
