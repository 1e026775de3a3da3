"""DhcpService over time and across SIGHUP: timers drive expiry and the node re-read, reload applies
[boot] and [dhcp] to the next packet (real in-memory SQLite store and registry)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bootd import config as config_mod
from bootd.config import DhcpConfig
from bootd.model import Lease
from bootd.net.dhcp import DhcpServer
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.service.boot import BootPolicy
from bootd.service.dhcp import LIVE, RESTART, BootAnswer, BootPlanner, DhcpService
from bootd.service.registry import RegistryService
from bootd.store.memory import memory_store
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden_packet

SERVER = "10.77.0.1"


@pytest.fixture
async def store() -> AsyncIterator[SqliteNodeStore]:
    s = memory_store()
    yield s
    await s.close()


def cfg(boot: dict[str, Any] | None = None, **dhcp: Any) -> config_mod.Config:
    return config_mod.from_dict({
        "server": {"address": SERVER},
        "dhcp": {"enabled": True, "pool_start": "10.77.0.100", "pool_end": "10.77.0.120", "lease_time": 600,
                 **dhcp},
        "boot": boot or {},
    })


def discover(i: int) -> DhcpPacket:
    p = golden_packet("udhcpc-c2s-discover-1")  # BIOS PXE (option 93 = 0, vendor class PXEClient)
    return dataclasses.replace(p, chaddr=bytes.fromhex(f"5254002200{i:02x}") + bytes(10), options=dict(p.options))


async def offer(svc: DhcpService, i: int, now: float) -> DhcpPacket:
    out = await svc.handle(discover(i), port=67, now=now)
    assert out.ignored is None and len(out.replies) == 1, (out.ignored, out.detail)
    return DhcpPacket.parse(out.replies[0].data)


def test_every_dhcp_setting_is_live_or_needs_a_restart() -> None:
    fields = {f.name for f in dataclasses.fields(DhcpConfig)}
    assert set(LIVE) | set(RESTART) | {"queue_size"} == fields  # queue_size: the transport applies it
    assert not set(LIVE) & set(RESTART)


async def test_reload_changes_boot_files_and_lease_options(store: SqliteNodeStore) -> None:
    first = cfg()
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    now = time.time()
    before = await offer(svc, 1, now)
    assert before.file == b"undionly.kpxe" and before.options[o.LEASE_TIME] == (600).to_bytes(4, "big")
    assert o.ROUTER not in before.options
    new = cfg({"bios_nbp": "custom.kpxe"}, lease_time=1200, router="10.77.0.254", domain="lab", port=1067,
              offer_hold=5)
    assert svc.reload(new) == ["dhcp.port"]
    after = await offer(svc, 2, now + 1)
    assert after.file == b"custom.kpxe" and after.options[o.BOOTFILE_NAME] == b"custom.kpxe"
    assert after.options[o.LEASE_TIME] == (1200).to_bytes(4, "big")
    assert after.options[o.ROUTER] == ip_to_bytes("10.77.0.254") and after.options[o.DOMAIN_NAME] == b"lab"
    assert svc.pool is not None and svc.pool.offers[svc.pool.offer_of["52:54:00:22:00:02"]][1] == now + 1 + 5
    assert svc.config.port == 67  # needs a restart: the socket stays where it is


async def test_reload_moves_the_pool_and_keeps_leases(store: SqliteNodeStore) -> None:
    first = cfg()
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    now = time.time()
    first_offer = await offer(svc, 1, now)
    req = discover(1)
    req.options.update({o.MESSAGE_TYPE: b"\x03", o.SERVER_ID: ip_to_bytes(SERVER),
                        o.REQUESTED_IP: ip_to_bytes(first_offer.yiaddr)})
    out = await svc.handle(req, port=67, now=now)
    assert o.message_type(DhcpPacket.parse(out.replies[0].data)) is o.MessageType.ACK
    svc.reload(cfg(pool_start="10.77.0.200", pool_end="10.77.0.210"))
    assert (await offer(svc, 2, now)).yiaddr == "10.77.0.200"
    assert (await offer(svc, 1, now)).yiaddr == "10.77.0.100"  # a node keeps its address, as after a restart
    bad = dataclasses.replace(first, dhcp=dataclasses.replace(first.dhcp, pool_end="10.78.0.5"))
    with pytest.raises(ValueError, match="one subnet"):
        svc.reload(bad)
    assert svc.config.pool_start == "10.77.0.200"  # a refused reload changes nothing


async def test_a_planner_passed_in_belongs_to_its_builder(store: SqliteNodeStore) -> None:
    policy = BootPolicy(public_url=f"http://{SERVER}:8080", next_server=SERVER, bios_nbp="mine.kpxe")
    assert isinstance(policy, BootPlanner)
    first = cfg()
    svc = DhcpService(store, RegistryService(store, first.registry), policy, first.dhcp, server_address=SERVER)
    assert svc.reload(cfg({"bios_nbp": "custom.kpxe"}, lease_time=900)) == []
    assert svc.boot is policy and (await offer(svc, 1, time.time())).file == b"mine.kpxe"
    assert svc.config.lease_time == 900


async def test_boot_answer_is_named(store: SqliteNodeStore) -> None:
    first = cfg()
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    from bootd.proto.dhcp.pxe import Client, classify

    c = classify(discover(1))
    assert isinstance(c, Client)
    boot = svc._boot(discover(1), c, None)
    assert isinstance(boot, BootAnswer) and boot.file == b"undionly.kpxe" and boot.siaddr == SERVER
    assert boot.plan is not None and boot.plan.filename == "undionly.kpxe"


async def test_run_expires_offers_without_any_packet(store: SqliteNodeStore) -> None:
    first = cfg(offer_hold=1)
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    task = asyncio.create_task(svc.run())
    try:
        await asyncio.sleep(0.05)  # run() is asleep until the periodic reload, a minute away
        assert svc._armed > time.time() + 30
        await offer(svc, 1, time.time())
        assert svc.pool is not None and len(svc.pool.offers) == 1
        for _ in range(60):  # the offer's deadline woke the loop: expired 1 s later, no packet needed
            if not svc.pool.offers:
                break
            await asyncio.sleep(0.05)
        assert svc.pool.offers == {} and svc.pool.offer_of == {}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_on_timer_rereads_node_addresses_when_due(store: SqliteNodeStore) -> None:
    first = cfg(pool_end="10.77.0.100")
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    now = time.time()
    await svc.load(now)
    await store.add_node("52:54:00:22:00:09", "n0009", group="default", now=now)
    await store.put_lease(Lease("10.77.0.100", "52:54:00:22:00:09", now + 600, None))
    await svc.on_timer(now + 30)  # not due yet: the index still thinks .100 is free
    assert svc.pool is not None and 0x0A4D0064 not in svc.pool.leases
    await svc.on_timer(now + 61)
    assert svc.pool.leases[0x0A4D0064][0] == "52:54:00:22:00:09"
    assert (await svc.handle(discover(1), port=67, now=now + 62)).ignored == "pool-exhausted"


async def test_transport_reload_applies_queue_bound_and_refuses_bad_pools(store: SqliteNodeStore) -> None:
    first = cfg()
    svc = DhcpService.from_config(first, store, RegistryService(store, first.registry))
    server = DhcpServer(svc, listen="127.0.0.1", port=0, queue_size=first.dhcp.queue_size)
    assert server.reload(cfg(queue_size=7, listen="127.0.0.1")) == ["dhcp.listen"]
    assert server.queue.maxsize == 7
    bad = dataclasses.replace(first, dhcp=dataclasses.replace(first.dhcp, pool_end="10.78.0.5", queue_size=9))
    assert server.reload(bad) == []
    assert server.queue.maxsize == 7 and svc.config.pool_end == "10.77.0.120"
