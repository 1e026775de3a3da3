"""One fuzz target for the DHCP codec and client classification, shared by hypothesis and atheris.

Contract under test: any datagram either parses or raises RemoteProtocolError;
whatever parses re-encodes and parses back to the same options; and
classification raises only RemoteProtocolError, or says "ignore, because ..." instead.
"""

from __future__ import annotations

from bootd.errors import RemoteProtocolError
from bootd.proto.dhcp.packet import DhcpPacket
from bootd.proto.dhcp.pxe import Client, Ignore
from bootd.proto.dhcp.pxe import classify as classify_packet


def _parse(data: bytes) -> DhcpPacket | None:
    try:
        return DhcpPacket.parse(data)
    except RemoteProtocolError:
        return None


def codec(data: bytes) -> None:
    packet = _parse(data)
    if packet is None:
        return
    if len(packet.sname) > 64 or len(packet.file) > 128:
        return
    again = DhcpPacket.parse(packet.encode())
    assert again.options == packet.options, "options changed across encode/parse"
    assert (again.xid, again.hwaddr, again.giaddr) == (packet.xid, packet.hwaddr, packet.giaddr)


def classify(data: bytes) -> None:
    packet = _parse(data)
    if packet is None:
        return
    try:
        result = classify_packet(packet)
    except RemoteProtocolError:
        return  # malformed option contents: counted and dropped by the caller
    assert isinstance(result, Client | Ignore)
    if isinstance(result, Ignore):
        assert result.reason, "an ignored packet must say why"
