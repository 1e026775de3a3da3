"""BOOTP/DHCP packet codec built on ``struct``.

Why ``struct`` and an explicit option loop rather than construct or scapy:
parsing must be fast (a flood of DISCOVERs must not starve the event loop:
~7 us a packet here against ~190 us for construct) and strict (scapy accepts
broken packets). Every way a packet can be broken maps to a ``reason`` slug.

Options are kept as ``{code: value}`` in wire order. Repeated instances of one
code are concatenated (RFC 3396 long options), and option overload (52) pulls
further options out of the ``file`` and ``sname`` fields, in the order RFC 3396
section 5 prescribes: ``options``, then ``file``, then ``sname``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from bootd.errors import RemoteProtocolError

BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2
MAGIC_COOKIE: Final = b"\x63\x82\x53\x63"
HEADER: Final = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_SIZE: Final = HEADER.size  # 236
MIN_REPLY_SIZE: Final = 300  # BOOTP clients (and some PXE ROMs) drop shorter replies
FLAG_BROADCAST: Final = 0x8000

OPT_PAD: Final = 0
OPT_END: Final = 255
OPT_OVERLOAD: Final = 52

ZERO_IP: Final = "0.0.0.0"
_ZERO4: Final = b"\x00\x00\x00\x00"


# Address conversions, cached in plain dicts (cleared when full): a relay's giaddr and the server's own address come
# back in every packet, and every reply encodes the same few addresses. A dict lookup in compiled code costs a third
# of an lru_cache call (callgrind, bench/dhcp/profile_service.py: twenty calls an exchange).
_DOTTED: Final[dict[bytes, str]] = {}
_PACKED: Final[dict[str, bytes]] = {}
_CACHED: Final = 4096


def ip_to_str(raw: bytes) -> str:
    """Dotted quad from 4 raw bytes (no socket import here: proto stays sans-I/O)."""
    if raw == _ZERO4:
        return ZERO_IP
    text = _DOTTED.get(raw)
    if text is None:
        text = f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
        if len(_DOTTED) >= _CACHED:
            _DOTTED.clear()
        _DOTTED[raw] = text
    return text


def ip_to_bytes(text: str) -> bytes:
    """4 raw bytes from a dotted quad; our own (config, pool) values, so errors are local."""
    raw = _PACKED.get(text)
    if raw is None:
        raw = _pack_ip(text)
        if len(_PACKED) >= _CACHED:
            _PACKED.clear()
        _PACKED[text] = raw
    return raw


def _pack_ip(text: str) -> bytes:
    parts = text.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {text!r}")
    values = [int(p) for p in parts]
    if any(v < 0 or v > 255 for v in values):
        raise ValueError(f"not an IPv4 address: {text!r}")
    return bytes(values)


def parse_options(data: bytes, options: dict[int, bytes], where: str, *, need_end: bool = False,
                  start: int = 0) -> None:
    """Parse one option area (``data`` from ``start``) into ``options``, concatenating repeats (RFC 3396).

    Missing End is tolerated in the main area (some ROMs stop at the packet end),
    but an option whose length runs past the area is broken, not merely short.
    On every packet: the pad and end codes are literals (0, 255) and the area is not copied out first.
    """
    i = start
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:  # OPT_PAD
            i += 1
            continue
        if code == 255:  # OPT_END
            return
        if i + 1 >= n:
            raise RemoteProtocolError(f"option {code} in {where} has no length byte", reason="truncated-option")
        end = i + 2 + data[i + 1]
        if end > n:
            raise RemoteProtocolError(
                f"option {code} in {where} claims {data[i + 1]} bytes, only {n - i - 2} left", reason="truncated-option"
            )
        if code in options:
            options[code] += data[i + 2 : end]
        else:
            options[code] = data[i + 2 : end]
        i = end
    if need_end:
        raise RemoteProtocolError(f"no End option in {where}", reason="missing-end")


# init=False: a hand-written __init__ compiles (tools/compile.py, mypyc); a dataclass's generated one stays interpreted.
@dataclass(slots=True, init=False)
class DhcpPacket:
    """One BOOTP/DHCP message; IPs are dotted strings, ``chaddr`` the raw 16 bytes."""

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: str
    yiaddr: str
    siaddr: str
    giaddr: str
    chaddr: bytes
    sname: bytes
    file: bytes
    options: dict[int, bytes]
    has_cookie: bool

    def __init__(self, op: int = BOOTREQUEST, htype: int = 1, hlen: int = 6, hops: int = 0, xid: int = 0,
                 secs: int = 0, flags: int = 0, ciaddr: str = ZERO_IP, yiaddr: str = ZERO_IP, siaddr: str = ZERO_IP,
                 giaddr: str = ZERO_IP, chaddr: bytes = b"\x00" * 16, sname: bytes = b"", file: bytes = b"",
                 options: dict[int, bytes] | None = None, has_cookie: bool = True) -> None:
        self.op = op
        self.htype = htype
        self.hlen = hlen
        self.hops = hops
        self.xid = xid
        self.secs = secs
        self.flags = flags
        self.ciaddr = ciaddr
        self.yiaddr = yiaddr
        self.siaddr = siaddr
        self.giaddr = giaddr
        self.chaddr = chaddr
        self.sname = sname
        self.file = file
        self.options = {} if options is None else options
        self.has_cookie = has_cookie

    @property
    def hwaddr(self) -> bytes:
        return self.chaddr[: self.hlen]

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    @classmethod
    def parse(cls, data: bytes) -> DhcpPacket:
        """Decode a datagram; raises RemoteProtocolError (never anything else) on malformed input."""
        if len(data) < HEADER_SIZE:
            raise RemoteProtocolError(f"{len(data)} bytes is shorter than a BOOTP header", reason="short-packet")
        (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
         bootfile) = HEADER.unpack_from(data)
        if op not in (BOOTREQUEST, BOOTREPLY):
            raise RemoteProtocolError(f"op {op} is neither BOOTREQUEST nor BOOTREPLY", reason="bad-op")
        if hlen > 16:
            raise RemoteProtocolError(f"hlen {hlen} exceeds the 16-byte chaddr", reason="bad-hlen")
        options: dict[int, bytes] = {}
        has_cookie = data[HEADER_SIZE : HEADER_SIZE + 4] == MAGIC_COOKIE
        if has_cookie:
            parse_options(data, options, "options", start=HEADER_SIZE + 4)
            overload = options.pop(OPT_OVERLOAD, None)
            if overload is not None:
                if len(overload) != 1 or overload[0] not in (1, 2, 3):
                    raise RemoteProtocolError(f"option overload value {overload.hex()} invalid",
                                              reason="bad-option-52")
                # RFC 2131 4.1: overloaded fields must end with End.
                if overload[0] & 1:
                    parse_options(bootfile, options, "file", need_end=True)
                    bootfile = b""
                if overload[0] & 2:
                    parse_options(sname, options, "sname", need_end=True)
                    sname = b""
                if OPT_OVERLOAD in options:
                    # RFC 2131 4.1: option 52 belongs in the options field only; found by atheris inside
                    # an overloaded file field, where keeping it would re-encode as a broken packet.
                    raise RemoteProtocolError("option overload (52) inside an overloaded field",
                                              reason="bad-option-52")
        elif data[HEADER_SIZE : HEADER_SIZE + 4].strip(b"\x00"):
            # Plain BOOTP leaves the vendor area zeroed; other non-zero bytes are a cookie we do not know.
            raise RemoteProtocolError(
                f"magic cookie {data[HEADER_SIZE:HEADER_SIZE + 4].hex()} is not 63825363", reason="bad-cookie"
            )
        return cls(op, htype, hlen, hops, xid, secs, flags, ip_to_str(ciaddr), ip_to_str(yiaddr),
                   ip_to_str(siaddr), ip_to_str(giaddr), chaddr, sname.rstrip(b"\x00"), bootfile.rstrip(b"\x00"),
                   options, has_cookie)

    def encode(self, *, min_size: int = MIN_REPLY_SIZE) -> bytes:
        """Serialise; options over 255 bytes are split into repeated instances (RFC 3396).

        Message type (53) goes first because some PXE ROMs only look there.
        """
        if len(self.sname) > 64 or len(self.file) > 128:
            raise ValueError("sname/file too long for the BOOTP header; use options 66/67")
        head = HEADER.pack(
            self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
            ip_to_bytes(self.ciaddr), ip_to_bytes(self.yiaddr), ip_to_bytes(self.siaddr),
            ip_to_bytes(self.giaddr), self.chaddr.ljust(16, b"\x00")[:16], self.sname, self.file,
        )
        parts = [head, MAGIC_COOKIE]
        opts = self.options
        first = opts.get(53)
        if first is not None:
            # A long option 53 came concatenated from several instances (RFC 3396): split it again.
            parts.append(encode_option(53, first))
        for code, value in opts.items():
            if code == 53:
                continue
            parts.append(encode_option(code, value))
        parts.append(b"\xff")
        out = b"".join(parts)
        if len(out) < min_size:
            out += b"\x00" * (min_size - len(out))
        return out


def encode_option(code: int, value: bytes) -> bytes:
    """One option TLV, split into 255-byte instances when long (RFC 3396); empty values keep one TLV."""
    if len(value) <= 255:
        return bytes((code, len(value))) + value
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return b"".join(bytes((code, len(c))) + c for c in chunks)
