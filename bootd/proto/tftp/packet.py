"""TFTP wire format (RFC 1350) with options (RFC 2347/2348/2349/7440).

Decoding is strict about structure (an RRQ without its terminating NULs is
garbage, not a request) but lenient about what firmware really sends:
option names are case-insensitive, trailing padding NULs are ignored, and
options we do not know or whose values are out of range are simply left out
of the OACK, which RFC 2347 allows and which keeps old PXE ROMs working.

Everything raises :class:`bootd.errors.RemoteProtocolError` with a ``reason``
slug so the transport can count what it drops.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from bootd.errors import RemoteProtocolError

__all__ = [
    "MAX_BLKSIZE",
    "MAX_WINDOWSIZE",
    "MIN_BLKSIZE",
    "Ack",
    "Data",
    "ErrorCode",
    "ErrorPacket",
    "Negotiated",
    "OAck",
    "Opcode",
    "Packet",
    "Request",
    "encode_ack",
    "encode_data",
    "encode_error",
    "encode_oack",
    "encode_request",
    "negotiate",
    "parse_packet",
]

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464  # RFC 2348: largest payload that fits a 64 KiB UDP datagram over IPv4
MAX_WINDOWSIZE = 65535  # RFC 7440
MIN_TIMEOUT = 1  # RFC 2349 (seconds)
MAX_TIMEOUT = 255


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8  # RFC 2347: option negotiation failed / request denied


MODES = ("octet", "netascii")


@dataclass(frozen=True, slots=True)
class Request:
    """RRQ or WRQ. ``options`` keeps the client's order; names are lower-cased."""

    opcode: Opcode
    filename: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class ErrorPacket:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OAck:
    options: dict[str, str]


Packet = Request | Data | Ack | ErrorPacket | OAck

_HDR = struct.Struct("!HH")


def _decode_str(raw: bytes) -> str:
    # Firmware sends ASCII; surrogateescape keeps odd bytes round-trippable to the
    # filesystem (os.fsencode) instead of failing the whole request.
    return raw.decode("utf-8", "surrogateescape")


def _parse_request(opcode: Opcode, data: bytes) -> Request:
    body = data[2:]
    if not body.endswith(b"\0"):
        raise RemoteProtocolError(f"{opcode.name} is not NUL-terminated", reason="malformed")
    fields = body[:-1].split(b"\0")
    # Some PXE ROMs pad requests with extra NULs: drop empty trailing fields.
    while len(fields) > 2 and fields[-1] == b"":
        fields.pop()
    if len(fields) < 2:
        raise RemoteProtocolError(f"{opcode.name} has no transfer mode", reason="malformed")
    filename, mode = _decode_str(fields[0]), _decode_str(fields[1]).lower()
    if not filename:
        raise RemoteProtocolError(f"{opcode.name} has an empty file name", reason="malformed")
    options: dict[str, str] = {}
    opts = fields[2:]
    # An odd leftover (name without value) is ignored rather than fatal: RFC 2347
    # lets servers ignore options, and refusing the whole boot over it helps nobody.
    for i in range(0, len(opts) - 1, 2):
        name = _decode_str(opts[i]).lower()
        if name and name not in options:
            options[name] = _decode_str(opts[i + 1])
    return Request(opcode, filename, mode, options)


def parse_packet(data: bytes) -> Packet:
    """Decode one datagram; raises RemoteProtocolError for anything that is not TFTP."""
    if len(data) < 4:
        raise RemoteProtocolError(f"datagram of {len(data)} bytes is too short for TFTP", reason="short")
    op = (data[0] << 8) | data[1]
    if op == Opcode.ACK:
        # Some stacks pad ACKs to a minimum frame size: only the first 4 bytes count.
        return Ack((data[2] << 8) | data[3])
    if op == Opcode.DATA:
        return Data((data[2] << 8) | data[3], bytes(data[4:]))
    if op in (Opcode.RRQ, Opcode.WRQ):
        return _parse_request(Opcode(op), data)
    if op == Opcode.ERROR:
        code = (data[2] << 8) | data[3]
        msg = data[4:]
        nul = msg.find(b"\0")
        if nul >= 0:
            msg = msg[:nul]
        return ErrorPacket(code, msg.decode("utf-8", "replace"))
    if op == Opcode.OACK:
        body = data[2:]
        fields = body.rstrip(b"\0").split(b"\0") if body.strip(b"\0") else []
        opts = {_decode_str(fields[i]).lower(): _decode_str(fields[i + 1]) for i in range(0, len(fields) - 1, 2)}
        return OAck(opts)
    raise RemoteProtocolError(f"unknown TFTP opcode {op}", reason="bad_opcode")


def encode_data(block: int, payload: bytes) -> bytes:
    return _HDR.pack(Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return _HDR.pack(Opcode.ACK, block & 0xFFFF)


def encode_error(code: int, message: str) -> bytes:
    return _HDR.pack(Opcode.ERROR, code) + message.encode("utf-8", "replace") + b"\0"


def _encode_opts(options: dict[str, str]) -> bytes:
    return b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in options.items())


def encode_oack(options: dict[str, str]) -> bytes:
    return struct.pack("!H", Opcode.OACK) + _encode_opts(options)


def encode_request(
    filename: str, mode: str = "octet", options: dict[str, str] | None = None, *, write: bool = False
) -> bytes:
    """Build an RRQ/WRQ; used by tests and the benchmark client."""
    op = Opcode.WRQ if write else Opcode.RRQ
    return (
        struct.pack("!H", op)
        + filename.encode("utf-8", "surrogateescape")
        + b"\0"
        + mode.encode()
        + b"\0"
        + _encode_opts(options or {})
    )


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Transfer parameters after option negotiation; ``oack`` is empty when no OACK is due."""

    blksize: int
    windowsize: int
    timeout: float
    oack: dict[str, str]


def _int_option(value: str) -> int | None:
    value = value.strip()
    if not (value.isascii() and value.isdigit()):  # str.isdigit() also takes "²", which int() refuses
        return None
    return int(value)


def negotiate(
    options: dict[str, str],
    *,
    size: int | None,
    default_timeout: float,
    max_blksize: int = MAX_BLKSIZE,
    max_windowsize: int = 64,
    max_window_bytes: int = 0,
    max_timeout: float = MAX_TIMEOUT,
) -> Negotiated:
    """Choose transfer parameters from the client's options (RFC 2347-2349, 7440).

    Values above our limits are clamped (the RFCs let the server answer with a
    smaller value); values outside the RFC ranges, and unknown options, are
    ignored, i.e. left out of the OACK, so the client falls back to defaults.
    ``size`` is None when the transfer size is not known in advance (netascii),
    in which case tsize is not acknowledged, as tftpd-hpa does.

    ``max_window_bytes`` (0: no limit) caps windowsize * blksize: a window is sent
    as one burst, and a burst larger than the client's socket buffer loses its
    tail, which only a timeout recovers (RFC 7440 lets the server answer smaller).

    A ``timeout`` above ``max_timeout`` is refused (left out of the OACK, so the server's own
    timeout applies): RFC 2349 says the acknowledged value must be the client's, so it cannot
    be lowered, and a client asking for 255 s would otherwise hold its session for 255 s per
    retry, a cheap way to fill every session slot.
    """
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, default_timeout
    oack: dict[str, str] = {}
    max_blksize = max(MIN_BLKSIZE, min(max_blksize, MAX_BLKSIZE))
    max_windowsize = max(1, min(max_windowsize, MAX_WINDOWSIZE))
    wanted_window = 0
    for name, raw in options.items():
        value = _int_option(raw)
        if value is None:
            continue
        if name == "blksize":
            if value >= MIN_BLKSIZE:
                blksize = min(value, max_blksize)
                oack[name] = str(blksize)
        elif name == "tsize":
            if size is not None:
                oack[name] = str(size)
        elif name == "timeout":
            if MIN_TIMEOUT <= value <= min(MAX_TIMEOUT, max_timeout):
                timeout = float(value)
                oack[name] = str(value)
        elif name == "windowsize" and value >= 1:
            wanted_window = value
            oack[name] = ""  # filled in below, once blksize is known (keeps the client's order)
    if wanted_window:
        windowsize = min(wanted_window, max_windowsize)
        if max_window_bytes > 0:
            windowsize = max(1, min(windowsize, max_window_bytes // blksize))
        oack["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, oack)
