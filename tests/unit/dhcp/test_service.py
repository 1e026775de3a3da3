"""DhcpService against the real store (SQLite and PostgreSQL) and registry, driven by golden client packets."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from bootd.config import DhcpConfig, RegistryConfig
from bootd.model import Firmware, Lease, Machine, Node, State
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.proto.dhcp.reply import BROADCAST, Reply
from bootd.service.boot import BootPolicy
from bootd.service.dhcp import DhcpService, Outcome
from bootd.service.registry import RegistryService
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden_packet

SERVER = "10.77.0.1"
POLICY = BootPolicy(public_url=f"http://{SERVER}:8080", next_server=SERVER)
FULL = DhcpConfig(pool_start="10.77.0.100", pool_end="10.77.0.109", netmask="255.255.255.0", router="10.77.0.254",
                  dns=("10.77.0.2",), domain="cluster")
NOW = 1_700_000_000.0


@pytest.fixture
async def store(node_store: SqliteNodeStore) -> AsyncIterator[SqliteNodeStore]:
    """Each test runs on both backends (``node_store`` in tests/conftest.py)."""
    yield node_store


def service(store: SqliteNodeStore, settings: DhcpConfig = FULL, **registry: object) -> DhcpService:
    """The protocol tests use plain clients (dhclient, udhcpc) as well as PXE ROMs: let both register."""
    cfg = RegistryConfig(**{"register_any_client": True, **registry})  # type: ignore[arg-type]
    return DhcpService(store, RegistryService(store, cfg), POLICY, settings, server_address=SERVER)


def request_from(discover: DhcpPacket, offer: DhcpPacket) -> DhcpPacket:
    """What a client sends after choosing ``offer`` (SELECTING), keeping its other options."""
    req = dataclasses.replace(discover, options=dict(discover.options))
    req.options[o.MESSAGE_TYPE] = bytes((o.MessageType.REQUEST,))
    req.options[o.SERVER_ID] = offer.options[o.SERVER_ID]
    req.options[o.REQUESTED_IP] = ip_to_bytes(offer.yiaddr)
    return req


def only(out: Outcome) -> tuple[Reply, DhcpPacket]:
    assert out.ignored is None, (out.ignored, out.detail)
    assert len(out.replies) == 1
    return out.replies[0], DhcpPacket.parse(out.replies[0].data)


def with_mac(p: DhcpPacket, i: int) -> DhcpPacket:
    return dataclasses.replace(p, chaddr=bytes.fromhex(f"5254001100{i:02x}") + b"\0" * 10, options=dict(p.options))


async def dora(svc: DhcpService, discover: DhcpPacket) -> tuple[DhcpPacket, Reply, DhcpPacket]:
    _, offer = only(await svc.handle(discover, port=67, now=NOW))
    reply, ack = only(await svc.handle(request_from(discover, offer), port=67, now=NOW + 1))
    return offer, reply, ack


async def test_udhcpc_pxe_dora_registers_and_marks_pxe(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    offer, reply, ack = await dora(svc, discover)
    assert o.message_type(offer) is o.MessageType.OFFER and o.message_type(ack) is o.MessageType.ACK
    assert offer.yiaddr == ack.yiaddr == "10.77.0.100"
    assert ack.siaddr == SERVER and ack.file == b"undionly.kpxe"
    assert ack.options[o.BOOTFILE_NAME] == b"undionly.kpxe"
    assert o.server_id(ack) == SERVER and ack.options[o.SUBNET_MASK] == ip_to_bytes("255.255.255.0")
    assert ack.options[o.ROUTER] == ip_to_bytes("10.77.0.254") and ack.options[o.DOMAIN_NAME] == b"cluster"
    assert ack.options[o.LEASE_TIME] == (3600).to_bytes(4, "big")
    assert (reply.address, reply.port) == (BROADCAST, 68)
    node = await store.get_node_by_mac("52:54:00:99:00:3c")
    assert node is not None and node.name == "n0000" and node.state is State.PXE and node.ip == "10.77.0.100"
    lease = await store.get_lease_by_mac("52:54:00:99:00:3c")
    assert lease is not None and lease.ip == "10.77.0.100" and lease.expires == NOW + 1 + 3600


async def test_ipxe_gets_script_url_and_no_proxydhcp(store: SqliteNodeStore) -> None:
    _, _, ack = await dora(service(store), golden_packet("ipxe-bios-c2s-discover-ipxe-1"))
    assert ack.options[o.BOOTFILE_NAME] == b"http://10.77.0.1:8080/boot/52-54-00-99-01-01.ipxe"
    assert ack.options[o.IPXE_ENCAP] == b"\xb0\x01\x01"
    node = await store.get_node_by_mac("52:54:00:99:01:01")
    assert node is not None and node.state is State.PXE


async def test_edk2_gets_snponly_and_pxe_vendor_options(store: SqliteNodeStore) -> None:
    discover = golden_packet("edk2-pxe-c2s-discover-1")
    _, offer = only(await service(store).handle(discover, port=67, now=NOW))
    assert offer.file == b"snponly.efi" and offer.siaddr == SERVER
    assert offer.options[o.VENDOR_CLASS] == b"PXEClient"
    assert o.pxe_vendor_options(offer) == {o.PXE_DISCOVERY_CONTROL: b"\x08"}
    assert offer.broadcast  # EDK2 asked for broadcast; the flag is mirrored


async def test_plain_dhcp_client_does_not_register_by_default(store: SqliteNodeStore) -> None:
    out = await service(store, register_any_client=False).handle(golden_packet("dhclient-c2s-discover-1"), port=67,
                                                                 now=NOW)
    assert out.replies == [] and out.ignored == "refused"
    assert await store.list_nodes() == []


async def test_plain_dhclient_gets_lease_but_stays_discovered(store: SqliteNodeStore) -> None:
    # With registry.register_any_client on (a site that wants every DHCP client as a node).
    _, _, ack = await dora(service(store), golden_packet("dhclient-c2s-discover-1"))
    assert ack.yiaddr == "10.77.0.100" and ack.file == b"undionly.kpxe" and o.VENDOR_CLASS not in ack.options
    node = await store.get_node_by_mac("52:54:00:99:00:12")
    assert node is not None and node.state is State.DISCOVERED


async def test_request_for_another_server_is_ignored_and_frees_offer(store: SqliteNodeStore) -> None:
    svc = service(store, dataclasses.replace(FULL, pool_end="10.77.0.100"))  # one address
    discover = golden_packet("udhcpc-c2s-discover-1")
    _, offer = only(await svc.handle(discover, port=67, now=NOW))
    req = request_from(discover, offer)
    req.options[o.SERVER_ID] = ip_to_bytes("10.77.0.9")
    out = await svc.handle(req, port=67, now=NOW)
    assert out.replies == [] and out.ignored == "other-server"
    # The freed (only) address goes to the next client.
    _, other = only(await svc.handle(with_mac(discover, 1), port=67, now=NOW))
    assert other.yiaddr == offer.yiaddr
    assert await store.get_lease_by_mac("52:54:00:99:00:3c") is None


async def test_concurrent_discovers_get_distinct_addresses(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    outs = await asyncio.gather(*(svc.handle(with_mac(discover, i), port=67, now=NOW) for i in range(10)))
    ips = [only(out)[1].yiaddr for out in outs]
    assert sorted(ips) == [f"10.77.0.{100 + i}" for i in range(10)]
    nodes = await store.list_nodes()
    assert len({n.name for n in nodes}) == 10
    out = await svc.handle(with_mac(discover, 11), port=67, now=NOW)
    assert out.ignored == "pool-exhausted"


async def test_server_address_is_never_offered(store: SqliteNodeStore) -> None:
    settings = dataclasses.replace(FULL, pool_start="10.77.0.1", pool_end="10.77.0.2")
    _, offer = only(await service(store, settings).handle(golden_packet("udhcpc-c2s-discover-1"), port=67, now=NOW))
    assert offer.yiaddr == "10.77.0.2"


async def test_restart_keeps_lease_and_node_keeps_address(store: SqliteNodeStore) -> None:
    discover = golden_packet("udhcpc-c2s-discover-1")
    await dora(service(store), with_mac(discover, 1))
    _, _, ack = await dora(service(store), discover)
    assert ack.yiaddr == "10.77.0.101"
    # A new service over the same store (a restart) offers the same address, also after the lease expired
    # and another client asked first.
    later = NOW + 10 * 3600
    svc = service(store)
    _, first = only(await svc.handle(with_mac(discover, 2), port=67, now=later))
    assert first.yiaddr not in ("10.77.0.101",)
    _, again = only(await svc.handle(discover, port=67, now=later))
    assert again.yiaddr == "10.77.0.101"


async def test_init_reboot_with_wrong_address_is_nak(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    await dora(svc, discover)
    req = dataclasses.replace(discover, options=dict(discover.options))
    req.options[o.MESSAGE_TYPE] = b"\x03"
    req.options[o.REQUESTED_IP] = ip_to_bytes("192.168.1.5")
    reply, pkt = only(await svc.handle(req, port=67, now=NOW + 5))
    assert o.message_type(pkt) is o.MessageType.NAK and (reply.address, reply.port) == (BROADCAST, 68)
    assert b"not on this network" in pkt.options[o.MESSAGE]
    # Another in-pool address while the node owns .100: NAK to steer it back.
    req.options[o.REQUESTED_IP] = ip_to_bytes("10.77.0.105")
    _, pkt = only(await svc.handle(req, port=67, now=NOW + 5))
    assert o.message_type(pkt) is o.MessageType.NAK
    # Its own address: ACK (INIT-REBOOT).
    req.options[o.REQUESTED_IP] = ip_to_bytes("10.77.0.100")
    _, pkt = only(await svc.handle(req, port=67, now=NOW + 5))
    assert o.message_type(pkt) is o.MessageType.ACK and pkt.yiaddr == "10.77.0.100"


async def test_renew_unicasts_to_ciaddr(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("dhclient-c2s-discover-1")
    await dora(svc, discover)
    renew = dataclasses.replace(discover, ciaddr="10.77.0.100", options={53: b"\x03"})
    reply, pkt = only(await svc.handle(renew, port=67, now=NOW + 1800))
    assert o.message_type(pkt) is o.MessageType.ACK and pkt.ciaddr == "10.77.0.100"
    assert (reply.address, reply.port) == ("10.77.0.100", 68)
    lease = await store.get_lease_by_mac("52:54:00:99:00:12")
    assert lease is not None and lease.expires == NOW + 1800 + 3600


async def test_relayed_discover_goes_to_relay(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = dataclasses.replace(golden_packet("udhcpc-c2s-discover-1"), giaddr="10.77.0.253", hops=1)
    reply, offer = only(await svc.handle(discover, port=67, now=NOW))
    assert (reply.address, reply.port) == ("10.77.0.253", 67) and offer.giaddr == "10.77.0.253"
    foreign = dataclasses.replace(discover, giaddr="192.168.5.1")
    out = await svc.handle(foreign, port=67, now=NOW)
    assert out.ignored == "foreign-subnet"
    looped = dataclasses.replace(discover, hops=17)
    assert (await svc.handle(looped, port=67, now=NOW)).ignored == "too-many-hops"


async def test_decline_parks_address(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    _, _, ack = await dora(svc, discover)
    decline = dataclasses.replace(discover, options={53: b"\x04", 54: ip_to_bytes(SERVER),
                                                     50: ip_to_bytes(ack.yiaddr)})
    out = await svc.handle(decline, port=67, now=NOW + 2)
    assert out.replies == [] and out.ignored is None
    assert await store.get_lease_by_ip(ack.yiaddr) is None
    _, offer = only(await svc.handle(discover, port=67, now=NOW + 3))
    assert offer.yiaddr != ack.yiaddr
    out = await svc.handle(with_mac(decline, 7), port=67, now=NOW + 4)
    assert out.ignored == "not-holder"


async def test_release_frees_lease_but_node_keeps_address(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    _, _, ack = await dora(svc, discover)
    release = dataclasses.replace(discover, ciaddr=ack.yiaddr, options={53: b"\x07", 54: ip_to_bytes(SERVER)})
    assert (await svc.handle(release, port=67, now=NOW + 2)).ignored is None
    assert await store.get_lease_by_mac("52:54:00:99:00:3c") is None
    _, other = only(await svc.handle(with_mac(discover, 3), port=67, now=NOW + 3))
    assert other.yiaddr != ack.yiaddr
    _, back = only(await svc.handle(discover, port=67, now=NOW + 4))
    assert back.yiaddr == ack.yiaddr


async def test_inform_has_no_lease_time(store: SqliteNodeStore) -> None:
    inform = dataclasses.replace(golden_packet("dhclient-c2s-discover-1"), ciaddr="10.77.0.50", options={53: b"\x08"})
    reply, ack = only(await service(store).handle(inform, port=67, now=NOW))
    assert o.message_type(ack) is o.MessageType.ACK and ack.yiaddr == "0.0.0.0"
    assert o.LEASE_TIME not in ack.options and ack.options[o.SUBNET_MASK]
    assert (reply.address, reply.port) == ("10.77.0.50", 68)


async def test_registration_off_unknown_gets_nothing(store: SqliteNodeStore) -> None:
    svc = service(store, auto_register=False)
    out = await svc.handle(golden_packet("ipxe-bios-c2s-discover-ipxe-1"), port=67, now=NOW)
    assert out.replies == [] and out.ignored == "refused"
    assert await store.list_nodes() == []


async def test_disabled_node_gets_nothing(store: SqliteNodeStore) -> None:
    await store.add_node("52:54:00:99:01:01", "n0042", group="default", now=NOW, enabled=False)
    out = await service(store).handle(golden_packet("ipxe-bios-c2s-discover-ipxe-1"), port=67, now=NOW)
    assert out.ignored == "refused"


async def test_server_replies_are_ignored(store: SqliteNodeStore) -> None:
    out = await service(store).handle(golden_packet("udhcpc-s2c-offer-1"), port=67, now=NOW)
    assert out.ignored == "not-request"


PROXY = DhcpConfig(mode="proxy")


async def test_proxy_offer_has_no_address(store: SqliteNodeStore) -> None:
    svc = service(store, PROXY)
    reply, offer = only(await svc.handle(golden_packet("edk2-pxe-c2s-discover-1"), port=67, now=NOW))
    assert offer.yiaddr == "0.0.0.0" and offer.siaddr == SERVER and offer.file == b"snponly.efi"
    assert offer.options[o.VENDOR_CLASS] == b"PXEClient" and o.server_id(offer) == SERVER
    assert o.LEASE_TIME not in offer.options and o.SUBNET_MASK not in offer.options
    assert o.CLIENT_GUID in offer.options
    assert (reply.address, reply.port) == (BROADCAST, 68)
    node = await store.get_node_by_mac("52:54:00:99:01:03")
    assert node is not None and node.state is State.PXE
    assert await store.list_leases() == []


async def test_proxy_ignores_plain_clients_and_requests(store: SqliteNodeStore) -> None:
    svc = service(store, PROXY)
    assert (await svc.handle(golden_packet("dhclient-c2s-discover-1"), port=67, now=NOW)).ignored == "not-pxe"
    req = golden_packet("ipxe-bios-c2s-request-ipxe-1")
    assert (await svc.handle(req, port=67, now=NOW)).ignored == "proxy-not-discover"
    assert await store.list_nodes() == []


async def test_proxy_boot_server_port_4011(store: SqliteNodeStore) -> None:
    svc = service(store, PROXY)
    req = dataclasses.replace(golden_packet("ipxe-bios-c2s-request-ipxe-1"), ciaddr="10.77.0.123")
    req.options.pop(o.SERVER_ID, None)
    reply, ack = only(await svc.handle(req, port=4011, now=NOW, source=("10.77.0.123", 4011)))
    assert (reply.address, reply.port) == ("10.77.0.123", 4011)
    assert o.message_type(ack) is o.MessageType.ACK
    assert ack.options[o.BOOTFILE_NAME] == b"http://10.77.0.1:8080/boot/52-54-00-99-01-01.ipxe"
    assert ack.options[o.VENDOR_CLASS] == b"PXEClient"


async def test_full_mode_needs_a_sane_pool(store: SqliteNodeStore) -> None:
    registry = RegistryService(store, RegistryConfig())
    with pytest.raises(ValueError, match="pool_start"):
        DhcpService(store, registry, POLICY, DhcpConfig(), server_address=SERVER)
    with pytest.raises(ValueError, match="one subnet"):
        DhcpService(store, registry, POLICY, dataclasses.replace(FULL, pool_end="10.78.0.5"), server_address=SERVER)


def test_policy_decisions() -> None:
    mac = "52:54:00:00:00:01"
    assert POLICY.plan(Machine(mac, 0, Firmware.BIOS), None, pxe=True).filename == "undionly.kpxe"  # type: ignore[union-attr]
    assert POLICY.plan(Machine(mac, 7, Firmware.UEFI_X64), None, pxe=True).filename == "snponly.efi"  # type: ignore[union-attr]
    assert POLICY.plan(Machine(mac, 11, Firmware.UEFI_ARM64), None, pxe=True).filename == "snponly-arm64.efi"  # type: ignore[union-attr]
    http = POLICY.plan(Machine(mac, 16, Firmware.UEFI_HTTP), None, pxe=True)
    assert http is not None and http.filename == "http://10.77.0.1:8080/nbp/snponly.efi"
    assert POLICY.plan(Machine(mac, 6, Firmware.UEFI_IA32), None, pxe=True) is None
    assert POLICY.plan(Machine(mac, 2, Firmware.UNKNOWN), None, pxe=True) is None
    ipxe = POLICY.plan(Machine(mac, 7, Firmware.UEFI_X64, ipxe=True), None, pxe=True)
    assert ipxe is not None and ipxe.ipxe_no_proxydhcp and ipxe.filename.endswith("/boot/52-54-00-00-00-01.ipxe")
    # A site's loader (boot.file, e.g. a group's pxelinux.0) is what every firmware gets, an iPXE ROM too.
    legacy = Node(mac, "n1", "legacy", vars={"boot.file": "pxelinux.0"})
    for machine in (Machine(mac, 0, Firmware.BIOS), Machine(mac, 0, Firmware.BIOS, ipxe=True)):
        plan = POLICY.plan(machine, legacy, pxe=True)
        assert plan is not None and plan.filename == "pxelinux.0" and not plan.ipxe_no_proxydhcp


async def test_deleted_node_frees_its_address_after_reload(store: SqliteNodeStore) -> None:
    svc = service(store, dataclasses.replace(FULL, pool_end="10.77.0.100"))  # one address
    discover = golden_packet("udhcpc-c2s-discover-1")
    await dora(svc, discover)
    other = with_mac(discover, 9)
    assert (await svc.handle(other, port=67, now=NOW + 10)).ignored == "pool-exhausted"
    node = await store.get_node_by_mac("52:54:00:99:00:3c")
    assert node is not None
    await store.delete_node(node.name)  # what `bootd node delete` does from another process
    await svc.on_timer(NOW + 100)  # the periodic job (DhcpService.run) re-reads node addresses
    _, offer = only(await svc.handle(other, port=67, now=NOW + 100))  # past the reload interval
    assert offer.yiaddr == "10.77.0.100"


async def test_reload_keeps_bindings_made_while_reading(store: SqliteNodeStore) -> None:
    svc = service(store)
    await svc.load()
    pool = svc.pool
    assert pool is not None
    pool.bind(200, "52:54:00:00:00:01", NOW + 10)  # in memory only: a reload trusts the store
    await svc._reload()
    assert 200 not in pool.leases
    original = store.list_leases

    async def racing_list_leases() -> list[Lease]:
        pool.bind(201, "52:54:00:00:00:02", NOW + 10)  # an ACK lands while the reload reads the store
        return await original()

    store.list_leases = racing_list_leases  # type: ignore[method-assign]
    await svc._reload()
    assert pool.leases[201] == ("52:54:00:00:00:02", NOW + 10)
    assert pool.sticky[201] == "52:54:00:00:00:02" and pool.tracking is None


async def test_lease_write_failure_sends_no_ack_and_frees_the_address(store: SqliteNodeStore) -> None:
    from bootd.errors import StoreError
    from bootd.store.broken import BrokenStore

    broken = BrokenStore(store, {"put_leases"})
    svc = DhcpService(broken, RegistryService(broken, RegistryConfig()), POLICY,  # type: ignore[arg-type]
                      dataclasses.replace(FULL, pool_end="10.77.0.100"), server_address=SERVER)
    discover = golden_packet("udhcpc-c2s-discover-1")
    _, offer = only(await svc.handle(discover, port=67, now=NOW))
    with pytest.raises(StoreError):
        await svc.handle(request_from(discover, offer), port=67, now=NOW + 1)
    assert svc.pool is not None and not svc.pool.leases  # nothing ACKed, nothing held
    broken.fail.clear()
    _, ack = only(await svc.handle(request_from(discover, offer), port=67, now=NOW + 2))
    assert o.message_type(ack) is o.MessageType.ACK  # the client's retransmission succeeds


async def test_state_write_failure_still_acks(store: SqliteNodeStore) -> None:
    from bootd.store.broken import BrokenStore

    broken = BrokenStore(store, {"set_state"})
    svc = DhcpService(broken, RegistryService(broken, RegistryConfig()), POLICY, FULL,  # type: ignore[arg-type]
                      server_address=SERVER)
    _, _, ack = await dora(svc, golden_packet("edk2-pxe-c2s-discover-1"))
    assert ack.file == b"snponly.efi"
    lease = await store.get_lease_by_mac("52:54:00:99:01:03")
    assert lease is not None and lease.ip == ack.yiaddr
