"""Several subnets (Kea's subnet4 list): the subnet is chosen by giaddr, ciaddr, or the local segment, and
each answers with its own pool, router, DNS, lease time, next-server and public URL (real SQLite store)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from bootd import config as config_mod
from bootd.model import State
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.service.dhcp import DhcpService
from bootd.service.registry import RegistryService
from bootd.store.memory import memory_store
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden_packet
from .test_service import NOW, only, request_from

SERVER = "10.77.0.1"
RACK = {"subnet": "10.78.1.0/24", "pool_start": "10.78.1.50", "pool_end": "10.78.1.51", "router": "10.78.1.1",
        "dns": ["10.78.1.2"], "lease_time": 900, "next_server": "10.77.0.5",
        "public_url": "http://10.77.0.5:8080"}


@pytest.fixture
async def store() -> AsyncIterator[SqliteNodeStore]:
    s = memory_store()
    yield s
    await s.close()


def cfg(*subnets: dict[str, object], local: bool = True, **dhcp: object) -> config_mod.Config:
    pool = {"pool_start": "10.77.0.100", "pool_end": "10.77.0.150", "router": "10.77.0.1"} if local else {}
    return config_mod.from_dict({
        "server": {"address": SERVER},
        "registry": {"register_any_client": True},
        "dhcp": {"enabled": True, "dns": ["10.77.0.1"], "lease_time": 600, **pool,
                 "subnets": list(subnets), **dhcp},
    })


def svc_of(store: SqliteNodeStore, config: config_mod.Config) -> DhcpService:
    return DhcpService.from_config(config, store, RegistryService(store, config.registry))


def relayed(i: int, giaddr: str, name: str = "udhcpc-c2s-discover-1") -> DhcpPacket:
    p = golden_packet(name)
    return dataclasses.replace(p, chaddr=bytes.fromhex(f"5254003300{i:02x}") + bytes(10), giaddr=giaddr, hops=1,
                               options=dict(p.options))


async def test_relayed_discover_gets_its_subnets_pool_and_options(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    reply, offer = only(await svc.handle(relayed(1, "10.78.1.1"), port=67, now=NOW))
    assert offer.yiaddr == "10.78.1.50" and (reply.address, reply.port) == ("10.78.1.1", 67)
    assert offer.options[o.ROUTER] == ip_to_bytes("10.78.1.1")
    assert offer.options[o.DNS_SERVERS] == ip_to_bytes("10.78.1.2")
    assert offer.options[o.SUBNET_MASK] == ip_to_bytes("255.255.255.0")
    assert offer.options[o.LEASE_TIME] == (900).to_bytes(4, "big")
    assert offer.siaddr == "10.77.0.5" and offer.file == b"undionly.kpxe"
    _, ack = only(await svc.handle(request_from(relayed(1, "10.78.1.1"), offer), port=67, now=NOW + 1))
    assert o.message_type(ack) is o.MessageType.ACK and ack.yiaddr == "10.78.1.50"
    lease = await store.get_lease_by_mac("52:54:00:33:00:01")
    assert lease is not None and lease.ip == "10.78.1.50" and lease.expires == NOW + 1 + 900
    node = await store.get_node_by_mac("52:54:00:33:00:01")
    assert node is not None and node.ip == "10.78.1.50" and node.state is State.PXE
    # The local segment keeps its own pool and options.
    _, local = only(await svc.handle(relayed(2, "0.0.0.0"), port=67, now=NOW))
    assert local.yiaddr == "10.77.0.100" and local.options[o.ROUTER] == ip_to_bytes("10.77.0.1")
    assert local.options[o.DNS_SERVERS] == ip_to_bytes("10.77.0.1") and local.siaddr == SERVER


async def test_ipxe_gets_the_subnets_public_url(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    _, offer = only(await svc.handle(relayed(3, "10.78.1.77", "ipxe-bios-c2s-discover-ipxe-1"), port=67, now=NOW))
    assert offer.options[o.BOOTFILE_NAME] == b"http://10.77.0.5:8080/boot/52-54-00-33-00-03.ipxe"
    _, local = only(await svc.handle(relayed(4, "0.0.0.0", "ipxe-bios-c2s-discover-ipxe-1"), port=67, now=NOW))
    assert local.options[o.BOOTFILE_NAME] == b"http://10.77.0.1:8080/boot/52-54-00-33-00-04.ipxe"


async def test_giaddr_in_no_subnet_is_refused_and_said_why(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    out = await svc.handle(relayed(5, "10.99.0.1"), port=67, now=NOW)
    assert out.replies == [] and out.ignored == "foreign-subnet" and "10.99.0.1" in out.detail
    assert await store.get_node_by_mac("52:54:00:33:00:05") is None  # refused before the registry


async def test_each_subnet_has_its_own_pool_exhaustion(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    for i in (6, 7):
        only(await svc.handle(relayed(i, "10.78.1.1"), port=67, now=NOW))
    out = await svc.handle(relayed(8, "10.78.1.1"), port=67, now=NOW)
    assert out.ignored == "pool-exhausted" and "10.78.1.0/24" in out.detail
    _, local = only(await svc.handle(relayed(9, "0.0.0.0"), port=67, now=NOW))
    assert local.yiaddr == "10.77.0.100"


async def test_renewing_unicast_from_a_relayed_subnet_is_matched_by_ciaddr(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    _, offer = only(await svc.handle(relayed(10, "10.78.1.1"), port=67, now=NOW))
    only(await svc.handle(request_from(relayed(10, "10.78.1.1"), offer), port=67, now=NOW + 1))
    renew = relayed(10, "0.0.0.0")
    renew = dataclasses.replace(renew, ciaddr="10.78.1.50", hops=0, options=dict(renew.options))
    renew.options[o.MESSAGE_TYPE] = bytes((o.MessageType.REQUEST,))
    reply, ack = only(await svc.handle(renew, port=67, now=NOW + 400))
    assert o.message_type(ack) is o.MessageType.ACK and ack.yiaddr == "10.78.1.50"
    assert ack.options[o.LEASE_TIME] == (900).to_bytes(4, "big") and reply.address == "10.78.1.50"


async def test_only_relayed_subnets_refuse_unrelayed_clients(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK, local=False))
    out = await svc.handle(relayed(11, "0.0.0.0"), port=67, now=NOW)
    assert out.ignored == "no-local-subnet" and out.replies == []
    _, offer = only(await svc.handle(relayed(12, "10.78.1.9"), port=67, now=NOW))
    assert offer.yiaddr == "10.78.1.50"


async def test_a_subnet_bound_to_the_interface_serves_local_clients(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg({**RACK, "interface": "br1"}, interface="br1"))
    _, offer = only(await svc.handle(relayed(13, "0.0.0.0"), port=67, now=NOW))
    assert offer.yiaddr == "10.78.1.50"


async def test_restart_reindexes_every_subnets_leases(store: SqliteNodeStore) -> None:
    first = svc_of(store, cfg(RACK))
    for i in (14, 15):
        _, offer = only(await first.handle(relayed(i, "10.78.1.1"), port=67, now=NOW))
        only(await first.handle(request_from(relayed(i, "10.78.1.1"), offer), port=67, now=NOW + 1))
    again = svc_of(store, cfg(RACK))
    out = await again.handle(relayed(16, "10.78.1.1"), port=67, now=NOW + 2)
    assert out.ignored == "pool-exhausted"  # both addresses leased before the restart: none offered twice


async def test_reload_changes_a_subnets_options_live_and_adding_one_needs_a_restart(store: SqliteNodeStore) -> None:
    svc = svc_of(store, cfg(RACK))
    assert svc.reload(cfg({**RACK, "router": "10.78.1.254", "lease_time": 1200})) == []
    _, offer = only(await svc.handle(relayed(17, "10.78.1.1"), port=67, now=NOW))
    assert offer.options[o.ROUTER] == ip_to_bytes("10.78.1.254")
    assert offer.options[o.LEASE_TIME] == (1200).to_bytes(4, "big")
    more = {**RACK, "subnet": "10.78.2.0/24", "pool_start": "10.78.2.5", "pool_end": "10.78.2.9", "router": None}
    del more["router"]
    assert svc.reload(cfg(RACK, more)) == ["dhcp.subnets"]
    assert (await svc.handle(relayed(18, "10.78.2.1"), port=67, now=NOW)).ignored == "foreign-subnet"


@pytest.mark.parametrize(("subnet", "key", "fragment"), [
    ({"subnet": "10.77.0.0/16", "pool_start": "10.77.9.5", "pool_end": "10.77.9.6"}, "dhcp.subnets[0].subnet",
     "overlaps"),
    ({"subnet": "10.78.1.0/24", "pool_start": "10.78.2.5", "pool_end": "10.78.1.6"}, "dhcp.subnets[0].pool_start",
     "not in the subnet"),
    ({"subnet": "10.78.1.0/24", "pool_start": "10.78.1.9", "pool_end": "10.78.1.6"}, "dhcp.subnets[0].pool_end",
     "below"),
    ({"subnet": "10.78.1.0", "pool_start": "10.78.1.5", "pool_end": "10.78.1.6"}, "dhcp.subnets[0].subnet",
     "prefix length"),
    ({"pool_start": "10.78.1.5", "pool_end": "10.78.1.6"}, "dhcp.subnets[0].subnet", "required"),
    ({**RACK, "router": "10.79.0.1"}, "dhcp.subnets[0].router", "not in the subnet"),
    ({**RACK, "public_url": "ftp://x"}, "dhcp.subnets[0].public_url", "http://"),
    ({**RACK, "pool": "x"}, "dhcp.subnets[0].pool", "valid keys in [dhcp.subnets[0]] are: dns, domain"),
])
def test_subnet_config_errors_name_the_file_key_and_valid_values(subnet: dict[str, object], key: str,
                                                                   fragment: str) -> None:
    with pytest.raises(config_mod.ConfigError) as err:
        config_mod.from_dict({"dhcp": {"enabled": True, "pool_start": "10.77.0.100", "pool_end": "10.77.0.150",
                                       "subnets": [subnet]}}, "/etc/bootd/bootd.toml")
    text = str(err.value)
    assert text.startswith(f"/etc/bootd/bootd.toml: {key}:") and fragment in text, text


def test_one_pool_config_is_one_subnet() -> None:
    c = config_mod.from_dict({"dhcp": {"enabled": True, "pool_start": "10.77.0.100", "pool_end": "10.77.0.150",
                                       "netmask": "255.255.0.0", "router": "10.77.0.1", "lease_time": 120}})
    (only_subnet,) = c.dhcp.all_subnets()
    assert only_subnet.subnet == "10.77.0.0/16" and only_subnet.netmask == "255.255.0.0"
    assert (only_subnet.pool_start, only_subnet.pool_end, only_subnet.lease_time) == ("10.77.0.100", "10.77.0.150", 120)
