"""Which state a client's DHCPREQUEST comes from (RFC 2131 section 4.3.2), from the packet alone.

The state decides which address the client means and how a server answers: a SELECTING client
names the server it chose (the others must drop their offer and stay silent); INIT-REBOOT asks to
keep a remembered address (NAK when it is wrong for this network, so the client restarts at once);
RENEWING and REBINDING clients are configured and name their address in ``ciaddr`` (a server must
stay silent about an address that is not on its network: it may belong to another server).

RENEWING is unicast to the server and REBINDING broadcast; the destination address is not in the
packet, so a REQUEST counts as REBINDING only when we know it was broadcast: the caller says so,
or a relay forwarded it (``giaddr`` set; relays only forward broadcasts). Both are answered alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import ZERO_IP, DhcpPacket
from bootd.proto.dhcp.pxe import Ignore

__all__ = ["ClientState", "Request", "request_state"]


class ClientState(enum.Enum):
    SELECTING = "selecting"
    INIT_REBOOT = "init-reboot"
    RENEWING = "renewing"
    REBINDING = "rebinding"


# Not frozen: one per REQUEST, and frozen costs an object.__setattr__ per field. init=False: a hand-written __init__
# compiles (tools/compile.py, mypyc); a dataclass's generated one stays interpreted.
@dataclass(slots=True, init=False)
class Request:
    """A classified DHCPREQUEST: the client's state, the address it asks for, the server it names."""

    state: ClientState
    address: str
    server_id: str | None

    def __init__(self, state: ClientState, address: str, server_id: str | None = None) -> None:
        self.state = state
        self.address = address
        self.server_id = server_id

    @property
    def configured(self) -> bool:
        """RENEWING or REBINDING: the client already uses ``address`` (it is in ``ciaddr``)."""
        return self.state in (ClientState.RENEWING, ClientState.REBINDING)


def request_state(packet: DhcpPacket, *, broadcast: bool = False) -> Request | Ignore:
    """Classify a DHCPREQUEST by the RFC 2131 4.3.2 rules; Ignore (with why) when it names no address.

    Malformed options 50/54 raise RemoteProtocolError like every option accessor.
    """
    sid = o.server_id(packet)
    wanted = o.requested_ip(packet)
    if sid is not None:
        if wanted is None:
            return Ignore("no-requested-ip", f"{packet.chaddr[:6].hex(':')} SELECTING without option 50")
        return Request(ClientState.SELECTING, wanted, sid)
    if packet.ciaddr != ZERO_IP:
        rebinding = broadcast or packet.giaddr != ZERO_IP
        return Request(ClientState.REBINDING if rebinding else ClientState.RENEWING, packet.ciaddr)
    if wanted is not None:
        return Request(ClientState.INIT_REBOOT, wanted)
    return Ignore("no-requested-ip", f"{packet.chaddr[:6].hex(':')} REQUEST names no address")
