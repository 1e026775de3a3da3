"""Reply building and the RFC 2131 section 4.1 destination rules."""

from __future__ import annotations

import pytest

from bootd.model import BootPlan
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import BOOTREPLY, FLAG_BROADCAST, DhcpPacket
from bootd.proto.dhcp.pxe import Client, classify
from bootd.proto.dhcp.reply import (
    BROADCAST,
    boot_options,
    build_reply,
    destination,
    encode_options,
    lease_options,
    nak,
    reply_bytes,
)

from .conftest import golden_packet

ACK, NAK, OFFER = o.MessageType.ACK, o.MessageType.NAK, o.MessageType.OFFER


@pytest.mark.parametrize(
    ("giaddr", "ciaddr", "flags", "msg", "expected"),
    [
        ("10.1.0.1", "0.0.0.0", 0, OFFER, ("10.1.0.1", 67)),  # relayed: to the relay's server port
        ("10.1.0.1", "10.1.0.9", 0, ACK, ("10.1.0.1", 67)),
        ("10.1.0.1", "0.0.0.0", 0, NAK, ("10.1.0.1", 67)),
        ("0.0.0.0", "10.0.0.9", 0, ACK, ("10.0.0.9", 68)),  # renewing client: unicast to ciaddr
        ("0.0.0.0", "10.0.0.9", 0, NAK, (BROADCAST, 68)),  # NAK is always broadcast without a relay
        ("0.0.0.0", "0.0.0.0", FLAG_BROADCAST, OFFER, (BROADCAST, 68)),
        ("0.0.0.0", "0.0.0.0", 0, OFFER, (BROADCAST, 68)),  # no ARP injection: broadcast instead
    ],
)
def test_destination(giaddr: str, ciaddr: str, flags: int, msg: o.MessageType, expected: tuple[str, int]) -> None:
    req = DhcpPacket(giaddr=giaddr, ciaddr=ciaddr, flags=flags)
    assert destination(req, msg) == expected


def test_destination_custom_ports() -> None:
    assert destination(DhcpPacket(giaddr="10.1.0.1"), OFFER, server_port=1067) == ("10.1.0.1", 1067)
    assert destination(DhcpPacket(), OFFER, client_port=1068) == (BROADCAST, 1068)


def test_build_reply_mirrors_request() -> None:
    req = golden_packet("edk2-pxe-c2s-request-1")
    req.options[o.RELAY_AGENT_INFO] = b"\x01\x03abc"
    rep = build_reply(req, ACK, server_id="10.0.0.1", yiaddr="10.0.0.50", siaddr="10.0.0.1")
    assert rep.op == BOOTREPLY and rep.xid == req.xid and rep.chaddr == req.chaddr and rep.flags == req.flags
    wire = DhcpPacket.parse(rep.encode())
    assert o.message_type(wire) is ACK and o.server_id(wire) == "10.0.0.1"
    assert wire.options[o.RELAY_AGENT_INFO] == b"\x01\x03abc"  # RFC 3046: echoed
    assert list(wire.options)[-1] == o.RELAY_AGENT_INFO


@pytest.mark.parametrize("name", ["edk2-pxe-c2s-request-1", "dhclient-c2s-discover-1", "ipxe-bios-c2s-discover-ipxe-1"])
@pytest.mark.parametrize("msg", [OFFER, ACK])
@pytest.mark.parametrize("relayed", [False, True])
def test_reply_bytes_are_build_replys_bytes(name: str, msg: o.MessageType, relayed: bool) -> None:
    # The OFFER/ACK fast path (a pre-encoded options block) must put out exactly what build_reply(...).encode() does:
    # ciaddr only in an ACK, option 82 echoed last, long options split, short replies padded to 300 bytes.
    req = golden_packet(name)
    if relayed:
        req.giaddr = "10.1.0.1"
        req.options[o.RELAY_AGENT_INFO] = b"\x01\x03abc"
    req.ciaddr = "10.0.0.9" if msg is ACK else req.ciaddr
    plan = BootPlan("http://boot.example/" + "x" * 300 if name.startswith("ipxe") else "undionly.kpxe", "10.0.0.1")
    opts, file = boot_options(client(name), plan, req)
    merged = {**lease_options(lease_time=600, netmask="255.255.255.0", router="10.0.0.1", dns=("10.0.0.1",),
                              domain="cluster"), **opts}
    want = build_reply(req, msg, server_id="10.0.0.1", yiaddr="10.0.0.50", siaddr="10.0.0.1", options=merged,
                       file=file).encode()
    got = reply_bytes(req, msg, server_id=bytes([10, 0, 0, 1]), yiaddr=bytes([10, 0, 0, 50]), siaddr="10.0.0.1",
                      options=encode_options(merged), file=file)
    assert got == want
    short = reply_bytes(DhcpPacket(xid=7), msg, server_id=bytes(4), yiaddr=bytes(4), siaddr="0.0.0.0", options=b"")
    assert short == build_reply(DhcpPacket(xid=7), msg, server_id="0.0.0.0").encode() and len(short) == 300
    with pytest.raises(ValueError, match="not NAK"):
        reply_bytes(req, NAK, server_id=bytes(4), yiaddr=bytes(4), siaddr="0.0.0.0", options=b"")


def test_nak_through_relay_sets_broadcast_and_clears_addresses() -> None:
    req = DhcpPacket(giaddr="10.1.0.1", ciaddr="10.1.0.7", chaddr=b"\x52" * 6, options={53: b"\x03"})
    rep = nak(req, server_id="10.0.0.1", message="address not available")
    pkt = DhcpPacket.parse(rep.data)
    assert (rep.address, rep.port) == ("10.1.0.1", 67)
    assert pkt.broadcast and pkt.yiaddr == "0.0.0.0" and pkt.ciaddr == "0.0.0.0"
    assert pkt.options[o.MESSAGE] == b"address not available"


def test_lease_options() -> None:
    opts = lease_options(lease_time=3600, netmask="255.255.255.0", router="10.0.0.254", dns=("10.0.0.2", "10.0.0.3"),
                         domain="cluster")
    assert opts[o.LEASE_TIME] == (3600).to_bytes(4, "big")
    assert opts[o.RENEWAL_TIME] == (1800).to_bytes(4, "big")
    assert opts[o.REBINDING_TIME] == (3150).to_bytes(4, "big")
    assert opts[o.DNS_SERVERS] == bytes([10, 0, 0, 2, 10, 0, 0, 3])
    assert opts[o.DOMAIN_NAME] == b"cluster" and opts[o.ROUTER] == bytes([10, 0, 0, 254])


def client(name: str) -> Client:
    c = classify(golden_packet(name))
    assert isinstance(c, Client)
    return c


def test_boot_options_edk2_pxe() -> None:
    req = golden_packet("edk2-pxe-c2s-discover-1")
    opts, file = boot_options(client("edk2-pxe-c2s-discover-1"), BootPlan("snponly.efi", "10.0.0.1"), req)
    assert file == b"snponly.efi" and opts[o.BOOTFILE_NAME] == b"snponly.efi"
    assert opts[o.VENDOR_CLASS] == b"PXEClient"
    assert o.parse_suboptions(opts[o.VENDOR_SPECIFIC], 43) == {6: b"\x08"}
    assert opts[o.CLIENT_GUID] == req.options[o.CLIENT_GUID]
    assert o.IPXE_ENCAP not in opts


def test_boot_options_ipxe_gets_no_proxydhcp() -> None:
    req = golden_packet("ipxe-bios-c2s-discover-ipxe-1")
    plan = BootPlan("http://10.0.0.1:8080/boot/52-54-00-99-01-01.ipxe", "10.0.0.1", ipxe_no_proxydhcp=True)
    opts, file = boot_options(client("ipxe-bios-c2s-discover-ipxe-1"), plan, req)
    assert opts[o.IPXE_ENCAP] == b"\xb0\x01\x01"  # notes 7.2, byte for byte
    assert file == plan.filename.encode()
    assert o.VENDOR_SPECIFIC not in opts


def test_boot_options_long_url_only_in_option_67() -> None:
    req = golden_packet("ipxe-bios-c2s-discover-ipxe-1")
    url = "http://boot.example/" + "x" * 200
    opts, file = boot_options(client("ipxe-bios-c2s-discover-ipxe-1"), BootPlan(url), req)
    assert file == b"" and opts[o.BOOTFILE_NAME] == url.encode()
    rep = build_reply(req, OFFER, server_id="10.0.0.1", options=opts, file=file)
    assert DhcpPacket.parse(rep.encode()).options[o.BOOTFILE_NAME] == url.encode()  # split over 2 TLVs


def test_boot_options_plain_dhcp_client() -> None:
    req = golden_packet("dhclient-c2s-discover-1")
    opts, file = boot_options(client("dhclient-c2s-discover-1"), BootPlan("undionly.kpxe", "10.0.0.1"), req)
    assert file == b"undionly.kpxe" and o.VENDOR_CLASS not in opts and o.CLIENT_GUID not in opts
