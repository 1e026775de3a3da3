"""Building OFFER/ACK/NAK replies and deciding where they go (RFC 2131 section 4.1).

Kept apart from the service so the destination rules, which are easy to get
subtly wrong and hard to observe on a live network, are unit-tested alone.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from bootd.model import BootPlan
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import (
    BOOTREPLY,
    FLAG_BROADCAST,
    HEADER,
    HEADER_SIZE,
    MAGIC_COOKIE,
    MIN_REPLY_SIZE,
    ZERO_IP,
    DhcpPacket,
    encode_option,
    ip_to_bytes,
)
from bootd.proto.dhcp.pxe import Client

BROADCAST: Final = "255.255.255.255"


# Not frozen: built per packet, and frozen costs an object.__setattr__ per field. init=False: a hand-written __init__
# compiles (tools/compile.py, mypyc); a dataclass's generated one stays interpreted.
@dataclass(slots=True, init=False)
class Reply:
    """Encoded reply plus its UDP destination; the transport only sends it."""

    data: bytes
    address: str
    port: int
    msg_type: o.MessageType

    def __init__(self, data: bytes, address: str, port: int, msg_type: o.MessageType) -> None:
        self.data = data
        self.address = address
        self.port = port
        self.msg_type = msg_type


def destination(request: DhcpPacket, msg_type: o.MessageType, *, server_port: int = 67,
                client_port: int = 68) -> tuple[str, int]:
    """Where a reply to ``request`` goes, per RFC 2131 section 4.1.

    The last rule ("unicast to yiaddr and chaddr" for clients that cannot
    receive broadcasts) needs an ARP entry injected before sending, which a
    plain UDP socket cannot do; we broadcast instead. Every client tested
    (iPXE, EDK2, udhcpc, dhclient) accepts a broadcast reply.
    """
    if request.giaddr != ZERO_IP:
        return request.giaddr, server_port
    if msg_type == o.MessageType.NAK:
        return BROADCAST, client_port
    if request.ciaddr != ZERO_IP:
        return request.ciaddr, client_port
    return BROADCAST, client_port


def build_reply(
    request: DhcpPacket,
    msg_type: o.MessageType,
    *,
    server_id: str,
    yiaddr: str = ZERO_IP,
    siaddr: str = ZERO_IP,
    options: dict[int, bytes] | None = None,
    file: bytes = b"",
) -> DhcpPacket:
    """A reply skeleton mirroring what RFC 2131 table 3 says to copy from the request."""
    opts: dict[int, bytes] = {o.MESSAGE_TYPE: bytes((msg_type,)), o.SERVER_ID: ip_to_bytes(server_id)}
    if options:
        opts.update(options)
    flags = request.flags
    ciaddr = ZERO_IP
    if msg_type == o.MessageType.ACK:
        ciaddr = request.ciaddr
    elif msg_type == o.MessageType.NAK:
        yiaddr = siaddr = ZERO_IP
        file = b""
        if request.giaddr != ZERO_IP:
            # 4.1: a NAK through a relay must ask the relay to broadcast it.
            flags |= FLAG_BROADCAST
    relay_info = request.options.get(o.RELAY_AGENT_INFO)
    if relay_info is not None:
        opts[o.RELAY_AGENT_INFO] = relay_info  # RFC 3046 2.2: echo it last, unchanged
    return DhcpPacket(
        op=BOOTREPLY, htype=request.htype, hlen=request.hlen, hops=0, xid=request.xid, secs=0, flags=flags,
        ciaddr=ciaddr, yiaddr=yiaddr, siaddr=siaddr, giaddr=request.giaddr, chaddr=request.chaddr,
        file=file, options=opts,
    )


# The options reply_bytes writes itself: a pre-encoded block must not carry them.
_OFFER_TYPE: Final = b"\x35\x01\x02\x36\x04"  # option 53 (OFFER), then option 54's code and length
_ACK_TYPE: Final = b"\x35\x01\x05\x36\x04"
_PADDING: Final = bytes(MIN_REPLY_SIZE)
OWN_OPTIONS: Final = frozenset((o.MESSAGE_TYPE, o.SERVER_ID, o.RELAY_AGENT_INFO))


def encode_options(options: dict[int, bytes]) -> bytes:
    """The options' TLVs in order (long ones split, RFC 3396): a block for reply_bytes, encoded once and reused."""
    return b"".join([encode_option(code, value) for code, value in options.items()])


def reply_bytes(request: DhcpPacket, msg_type: o.MessageType, *, server_id: bytes, yiaddr: bytes, siaddr: str,
                options: bytes, file: bytes = b"") -> bytes:
    """``build_reply(...).encode()`` of an OFFER or ACK, from raw addresses and a pre-encoded options block
    (``encode_options``, none of OWN_OPTIONS in it): the same bytes, without building a packet object and
    encoding the same subnet options again for every reply (the largest part of the reply path in the profile)."""
    if msg_type not in (o.MessageType.OFFER, o.MessageType.ACK):
        raise ValueError(f"reply_bytes builds OFFERs and ACKs, not {msg_type.name}")
    if len(file) > 128:
        raise ValueError("sname/file too long for the BOOTP header; use options 66/67")
    ciaddr = request.ciaddr if msg_type == o.MessageType.ACK else ZERO_IP
    head = HEADER.pack(BOOTREPLY, request.htype, request.hlen, 0, request.xid, 0, request.flags, ip_to_bytes(ciaddr),
                       yiaddr, ip_to_bytes(siaddr), ip_to_bytes(request.giaddr), request.chaddr.ljust(16, b"\x00")[:16],
                       b"", file)
    relay_info = request.options.get(o.RELAY_AGENT_INFO)
    relay = encode_option(o.RELAY_AGENT_INFO, relay_info) if relay_info is not None else b""
    kind = _OFFER_TYPE if msg_type == o.MessageType.OFFER else _ACK_TYPE
    # The padding is known before the join (the cookie, the type and option 54's head, the end: 10 bytes).
    short = MIN_REPLY_SIZE - HEADER_SIZE - 10 - len(server_id) - len(options) - len(relay)
    pad = _PADDING[:short] if short > 0 else b""
    return b"".join((head, MAGIC_COOKIE, kind, server_id, options, relay, b"\xff", pad))


def lease_options(*, lease_time: int, netmask: str, router: str | None, dns: tuple[str, ...],
                  domain: str | None) -> dict[int, bytes]:
    """Network configuration for full mode; T1/T2 at the RFC 2131 defaults (50% and 87.5%)."""
    opts: dict[int, bytes] = {
        o.LEASE_TIME: struct.pack("!I", lease_time),
        o.RENEWAL_TIME: struct.pack("!I", lease_time // 2),
        o.REBINDING_TIME: struct.pack("!I", lease_time * 7 // 8),
        o.SUBNET_MASK: ip_to_bytes(netmask),
    }
    if router:
        opts[o.ROUTER] = ip_to_bytes(router)
    if dns:
        opts[o.DNS_SERVERS] = b"".join(ip_to_bytes(d) for d in dns)
    if domain:
        opts[o.DOMAIN_NAME] = domain.encode("ascii")
    return opts


def boot_options(client: Client, plan: BootPlan, request: DhcpPacket) -> tuple[dict[int, bytes], bytes]:
    """Options and BOOTP ``file`` field carrying the boot plan.

    The name goes in both the ``file`` field (udhcpc and old ROMs read only
    that) and option 67 (what PXE and iPXE read, and the only place for names
    over 127 bytes). PXE clients also get option 60 "PXEClient" and option 43
    with discovery control 8 ("use the boot file in this offer"), without which
    some ROMs treat the offer as address-only and keep waiting for a ProxyDHCP;
    option 97 is echoed because the PXE spec requires it and strict ROMs check.
    """
    opts: dict[int, bytes] = {}
    name = plan.filename.encode("ascii")
    file = name if len(name) < 128 else b""
    opts[o.BOOTFILE_NAME] = name
    if client.http:
        opts[o.VENDOR_CLASS] = b"HTTPClient"
    elif client.pxe and client.vendor_class and client.vendor_class.startswith("PXEClient"):
        opts[o.VENDOR_CLASS] = b"PXEClient"
        if not client.machine.ipxe:
            opts[o.VENDOR_SPECIFIC] = o.encode_suboptions(
                {o.PXE_DISCOVERY_CONTROL: bytes((o.PXE_DISCOVERY_USE_BOOTFILE,))}
            )
    guid = request.options.get(o.CLIENT_GUID)
    if guid is not None and client.pxe:
        opts[o.CLIENT_GUID] = guid
    if plan.ipxe_no_proxydhcp:
        # On the wire 175 = b0 01 01 (notes section 7.2): iPXE then skips its 3 s ProxyDHCP wait.
        opts[o.IPXE_ENCAP] = o.encode_suboptions({o.IPXE_NO_PXEDHCP: b"\x01"}, end=False)
    if plan.next_server and o.TFTP_SERVER_NAME in o.parameter_list(request):
        opts[o.TFTP_SERVER_NAME] = plan.next_server.encode("ascii")
    return opts, file


def nak(request: DhcpPacket, *, server_id: str, message: str, server_port: int = 67,
        client_port: int = 68) -> Reply:
    """A NAK with option 56 saying why (clients log it, which helps the administrator)."""
    pkt = build_reply(request, o.MessageType.NAK, server_id=server_id,
                      options={o.MESSAGE: message.encode("ascii", "replace")[:255]})
    addr, port = destination(request, o.MessageType.NAK, server_port=server_port, client_port=client_port)
    return Reply(pkt.encode(), addr, port, o.MessageType.NAK)
