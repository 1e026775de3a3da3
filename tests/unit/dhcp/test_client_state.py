"""RFC 2131 4.3.2: the client state of a DHCPREQUEST, one test per state, on real clients' packets."""

from __future__ import annotations

import dataclasses

from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.client_state import ClientState, Request, request_state
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.proto.dhcp.pxe import Ignore

from .conftest import golden_packet


def request(**options: bytes) -> DhcpPacket:
    """udhcpc's captured REQUEST with options 50/54 replaced (None-valued keys dropped)."""
    base = golden_packet("udhcpc-c2s-request-1")
    opts = {k: v for k, v in base.options.items() if k not in (o.REQUESTED_IP, o.SERVER_ID)}
    opts.update({int(k[1:]): v for k, v in options.items()})
    return dataclasses.replace(base, options=opts)


def test_selecting_names_the_chosen_server() -> None:
    for name in ("udhcpc-c2s-request-1", "dhclient-c2s-request-1", "edk2-pxe-c2s-request-1"):
        p = golden_packet(name)
        got = request_state(p)
        assert got == Request(ClientState.SELECTING, o.requested_ip(p), o.server_id(p)), name  # type: ignore[arg-type]
        assert isinstance(got, Request) and not got.configured


def test_selecting_without_requested_address_is_ignored() -> None:
    got = request_state(request(o54=ip_to_bytes("10.0.0.1")))
    assert isinstance(got, Ignore) and got.reason == "no-requested-ip" and "SELECTING" in got.detail


def test_init_reboot_asks_for_a_remembered_address() -> None:
    got = request_state(request(o50=ip_to_bytes("10.0.0.7")))
    assert got == Request(ClientState.INIT_REBOOT, "10.0.0.7")


def test_renewing_names_its_address_in_ciaddr() -> None:
    got = request_state(dataclasses.replace(request(), ciaddr="10.0.0.7"))
    assert got == Request(ClientState.RENEWING, "10.0.0.7")
    assert isinstance(got, Request) and got.configured


def test_rebinding_is_a_broadcast_renewal() -> None:
    renew = dataclasses.replace(request(), ciaddr="10.0.0.7")
    assert request_state(renew, broadcast=True) == Request(ClientState.REBINDING, "10.0.0.7")
    relayed = dataclasses.replace(renew, giaddr="10.0.9.1")  # relays forward only broadcasts
    got = request_state(relayed)
    assert got == Request(ClientState.REBINDING, "10.0.0.7") and isinstance(got, Request) and got.configured


def test_ciaddr_wins_over_a_stray_option_50() -> None:
    got = request_state(dataclasses.replace(request(o50=ip_to_bytes("10.0.0.9")), ciaddr="10.0.0.7"))
    assert got == Request(ClientState.RENEWING, "10.0.0.7")


def test_request_naming_no_address_is_ignored() -> None:
    got = request_state(request())
    assert isinstance(got, Ignore) and got.reason == "no-requested-ip"
