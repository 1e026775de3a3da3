"""Option codes and typed getters.

Getters return ``None`` when the option is absent and raise
``RemoteProtocolError(reason="bad-option-<code>")`` when it is present but
cannot be what the RFC says it is, so a caller never sees IndexError or
UnicodeDecodeError from client bytes.
"""

from __future__ import annotations

import enum
import re
import struct
from typing import Final

from bootd.errors import RemoteProtocolError
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_str

SUBNET_MASK: Final = 1
ROUTER: Final = 3
DNS_SERVERS: Final = 6
HOSTNAME: Final = 12
DOMAIN_NAME: Final = 15
VENDOR_SPECIFIC: Final = 43  # PXE: encapsulated sub-options when option 60 is PXEClient
REQUESTED_IP: Final = 50
LEASE_TIME: Final = 51
OVERLOAD: Final = 52
MESSAGE_TYPE: Final = 53
SERVER_ID: Final = 54
PARAMETER_LIST: Final = 55
MESSAGE: Final = 56
MAX_MESSAGE_SIZE: Final = 57
RENEWAL_TIME: Final = 58
REBINDING_TIME: Final = 59
VENDOR_CLASS: Final = 60
CLIENT_ID: Final = 61
TFTP_SERVER_NAME: Final = 66
BOOTFILE_NAME: Final = 67
USER_CLASS: Final = 77
CLIENT_ARCH: Final = 93  # RFC 4578
CLIENT_NDI: Final = 94  # RFC 4578
CLIENT_GUID: Final = 97  # RFC 4578 (UUID/GUID-based client identifier)
RELAY_AGENT_INFO: Final = 82
IPXE_ENCAP: Final = 175  # iPXE's private encapsulated options

# PXE (option 43) sub-options, PXE spec 2.1 table 2-1.
PXE_DISCOVERY_CONTROL: Final = 6
PXE_BOOT_SERVERS: Final = 8
PXE_BOOT_MENU: Final = 9
PXE_MENU_PROMPT: Final = 10
PXE_BOOT_ITEM: Final = 71
# Discovery control bit 3: "a boot file name is in the offer: download it, no discovery, no menu".
PXE_DISCOVERY_USE_BOOTFILE: Final = 0x08

# iPXE (option 175) sub-options, from iPXE's include/ipxe/dhcp.h.
IPXE_NO_PXEDHCP: Final = 176  # 1 = do not wait for ProxyDHCP offers
IPXE_BUS_ID: Final = 177
IPXE_VERSION: Final = 235


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


def _bad(code: int, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"option {code}: {why}", reason=f"bad-option-{code}")


def _text(packet: DhcpPacket, code: int) -> str | None:
    raw = packet.options.get(code)
    if raw is None:
        return None
    # NUL-terminated strings are a common firmware habit (RFC 2132 says not to, ROMs do anyway).
    raw = raw.rstrip(b"\x00")
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _bad(code, f"not ASCII text: {raw[:32]!r}") from None


def _ip(packet: DhcpPacket, code: int) -> str | None:
    raw = packet.options.get(code)
    if raw is None:
        return None
    if len(raw) != 4:
        raise _bad(code, f"an IPv4 address is 4 bytes, got {len(raw)}")
    return ip_to_str(raw)


_MESSAGE_TYPES: Final = {int(t): t for t in MessageType}


def message_type(packet: DhcpPacket) -> MessageType | None:
    raw = packet.options.get(MESSAGE_TYPE)
    if raw is None:
        return None
    if len(raw) != 1:
        raise _bad(MESSAGE_TYPE, f"length {len(raw)}, expected 1")
    known = _MESSAGE_TYPES.get(raw[0])  # a dict, not MessageType(...): that call is an Enum lookup on every packet
    if known is None:
        raise _bad(MESSAGE_TYPE, f"unknown message type {raw[0]}")
    return known


def server_id(packet: DhcpPacket) -> str | None:
    return _ip(packet, SERVER_ID)


def requested_ip(packet: DhcpPacket) -> str | None:
    return _ip(packet, REQUESTED_IP)


def parameter_list(packet: DhcpPacket) -> bytes:
    return packet.options.get(PARAMETER_LIST, b"")


def max_message_size(packet: DhcpPacket) -> int | None:
    raw = packet.options.get(MAX_MESSAGE_SIZE)
    if raw is None:
        return None
    if len(raw) != 2:
        raise _bad(MAX_MESSAGE_SIZE, f"length {len(raw)}, expected 2")
    value: int = struct.unpack("!H", raw)[0]
    # RFC 2132 9.10: minimum legal value is 576; smaller values are ignored rather than obeyed.
    return value if value >= 576 else None


def vendor_class(packet: DhcpPacket) -> str | None:
    return _text(packet, VENDOR_CLASS)


def client_id(packet: DhcpPacket) -> bytes | None:
    raw = packet.options.get(CLIENT_ID)
    if raw is not None and len(raw) < 2:
        raise _bad(CLIENT_ID, "shorter than the 2-byte minimum")
    return raw


_NOT_HOSTNAME: Final = re.compile(r"[^A-Za-z0-9._-]")  # what a hostname keeps (a regex: a loop per character cost 2 us)


def hostname(packet: DhcpPacket) -> str | None:
    raw = packet.options.get(HOSTNAME)
    if raw is None:
        return None
    # A hostname we cannot decode is not worth refusing the client over: keep what is printable.
    text = raw.rstrip(b"\x00").decode("ascii", "replace")
    return _NOT_HOSTNAME.sub("", text) or None


def tftp_server_name(packet: DhcpPacket) -> str | None:
    return _text(packet, TFTP_SERVER_NAME)


def bootfile_name(packet: DhcpPacket) -> str | None:
    return _text(packet, BOOTFILE_NAME)


def user_classes(packet: DhcpPacket) -> list[bytes]:
    """Option 77 as a list.

    RFC 3004 frames each class with a length byte, but iPXE (and many others)
    send the bare string "iPXE". A value that does not frame exactly is taken
    as one bare class, as dnsmasq does.
    """
    raw = packet.options.get(USER_CLASS)
    if not raw:
        return []
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        n = raw[i]
        if n == 0 or i + 1 + n > len(raw):
            return [raw]
        out.append(raw[i + 1 : i + 1 + n])
        i += 1 + n
    return out


def client_arches(packet: DhcpPacket) -> list[int]:
    """Option 93: one or more 16-bit architecture types, preferred first."""
    raw = packet.options.get(CLIENT_ARCH)
    if raw is None:
        return []
    if not raw or len(raw) % 2:
        raise _bad(CLIENT_ARCH, f"length {len(raw)} is not a positive multiple of 2")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def client_ndi(packet: DhcpPacket) -> tuple[int, int, int] | None:
    """Option 94: (interface type, UNDI major, UNDI minor); type 1 is UNDI."""
    raw = packet.options.get(CLIENT_NDI)
    if raw is None:
        return None
    if len(raw) != 3:
        raise _bad(CLIENT_NDI, f"length {len(raw)}, expected 3")
    return raw[0], raw[1], raw[2]


def client_guid(packet: DhcpPacket) -> str | None:
    """Option 97 as a lower-case UUID string of the 16 bytes in wire order.

    Type 0 is the only one defined. Some ROMs send all zeros or all ones when
    the SMBIOS UUID is unset: that is no identity, so it becomes None.
    """
    raw = packet.options.get(CLIENT_GUID)
    if raw is None:
        return None
    if len(raw) != 17 or raw[0] != 0:
        raise _bad(CLIENT_GUID, f"expected type 0 and 16 bytes, got {len(raw)} bytes starting {raw[:1].hex()}")
    body = raw[1:]
    if body in (b"\x00" * 16, b"\xff" * 16):
        return None
    h = body.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def parse_suboptions(raw: bytes, code: int) -> dict[int, bytes]:
    """Encapsulated TLVs (option 43, 175): Pad and End honoured, repeats concatenated."""
    out: dict[int, bytes] = {}
    i = 0
    n = len(raw)
    while i < n:
        sub = raw[i]
        if sub == 0:
            i += 1
            continue
        if sub == 255:
            break
        if i + 1 >= n or i + 2 + raw[i + 1] > n:
            raise _bad(code, f"sub-option {sub} runs past the end")
        ln = raw[i + 1]
        out[sub] = out.get(sub, b"") + raw[i + 2 : i + 2 + ln]
        i += 2 + ln
    return out


def encode_suboptions(values: dict[int, bytes], *, end: bool = True) -> bytes:
    parts = [bytes((code, len(v))) + v for code, v in values.items()]
    if end:
        parts.append(b"\xff")
    return b"".join(parts)


def pxe_vendor_options(packet: DhcpPacket) -> dict[int, bytes]:
    """Option 43 sub-options; only meaningful when option 60 says PXEClient."""
    raw = packet.options.get(VENDOR_SPECIFIC)
    return parse_suboptions(raw, VENDOR_SPECIFIC) if raw else {}


def ipxe_options(packet: DhcpPacket) -> dict[int, bytes] | None:
    """Option 175 sub-options, or None when the client is not iPXE (or hides it)."""
    raw = packet.options.get(IPXE_ENCAP)
    if raw is None:
        return None
    return parse_suboptions(raw, IPXE_ENCAP)
