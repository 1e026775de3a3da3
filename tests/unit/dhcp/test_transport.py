"""DhcpServer over loopback: real sockets, queue bound, drop counters (no namespaces needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from bootd.config import DhcpConfig, RegistryConfig
from bootd.net.dhcp import DhcpServer
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket
from bootd.service.boot import BootPolicy
from bootd.service.dhcp import DhcpService
from bootd.service.registry import RegistryService
from bootd.store.memory import memory_store
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden, golden_packet


@pytest.fixture
async def store() -> AsyncIterator[SqliteNodeStore]:
    s = memory_store()
    yield s
    await s.close()


@pytest.fixture
def relay() -> socket.socket:
    """Stands in for a relay agent on loopback: replies to relayed requests come to its port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def make(store: SqliteNodeStore, relay_port: int, registry: CollectorRegistry, **kw: int) -> DhcpServer:
    settings = DhcpConfig(pool_start="127.0.0.100", pool_end="127.0.0.200", port=relay_port)
    svc = DhcpService(store, RegistryService(store, RegistryConfig()), BootPolicy("http://127.0.0.1:8080",
                                                                                  "127.0.0.1"), settings,
                      server_address="127.0.0.1")
    return DhcpServer(svc, listen="127.0.0.1", port=0, metrics=registry, **kw)  # type: ignore[arg-type]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def recv(sock: socket.socket, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 2048), timeout)


async def test_relayed_discover_answered_over_udp(store: SqliteNodeStore, relay: socket.socket) -> None:
    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry)
    await server.start()
    try:
        discover = dataclasses.replace(golden_packet("ipxe-uefi-c2s-discover-ipxe-1"), giaddr="127.0.0.1")
        relay.sendto(discover.encode(), ("127.0.0.1", server.bound_ports[0]))
        offer = DhcpPacket.parse(await recv(relay))
        assert o.message_type(offer) is o.MessageType.OFFER and offer.yiaddr == "127.0.0.100"
        assert offer.options[o.IPXE_ENCAP] == b"\xb0\x01\x01"
        port = str(server.bound_ports[0])
        assert value(registry, "bootd_dhcp_received_total", port=port) == 1
        assert value(registry, "bootd_dhcp_replies_total", type="offer") == 1
    finally:
        await server.close()


async def test_malformed_and_ignored_are_counted(store: SqliteNodeStore, relay: socket.socket) -> None:
    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry)
    await server.start()
    try:
        target = ("127.0.0.1", server.bound_ports[0])
        relay.sendto(b"\x01\x01\x06", target)
        relay.sendto(golden("udhcpc-s2c-offer-1"), target)
        for _ in range(100):
            if value(registry, "bootd_dhcp_dropped_total", reason="not-request"):
                break
            await asyncio.sleep(0.02)
        assert value(registry, "bootd_dhcp_dropped_total", reason="short-packet") == 1
        assert value(registry, "bootd_dhcp_dropped_total", reason="not-request") == 1
    finally:
        await server.close()


async def test_flood_beyond_queue_is_dropped_and_counted(store: SqliteNodeStore, relay: socket.socket) -> None:
    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry, queue_size=4, workers=0)
    await server.start()
    try:
        base = golden_packet("udhcpc-c2s-discover-1")
        for i in range(50):  # fifty clients
            data = dataclasses.replace(base, xid=i, chaddr=bytes.fromhex(f"5254000000{i:02x}") + bytes(10)).encode()
            relay.sendto(data, ("127.0.0.1", server.bound_ports[0]))
        for _ in range(5):  # the first client retransmits while its DISCOVER is still queued
            relay.sendto(dataclasses.replace(base, xid=0, chaddr=bytes.fromhex("525400000000") + bytes(10)).encode(),
                         ("127.0.0.1", server.bound_ports[0]))
        port = str(server.bound_ports[0])
        for _ in range(100):
            if value(registry, "bootd_dhcp_received_total", port=port) == 55:
                break
            await asyncio.sleep(0.02)
        assert value(registry, "bootd_dhcp_dropped_total", reason="queue-full") == 46
        assert value(registry, "bootd_dhcp_dropped_total", reason="duplicate") == 5
        assert server.queue.qsize() == 4
        assert value(registry, "bootd_dhcp_queue_depth") == 4
    finally:
        await server.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_proxy_boot_server_port_answers_the_sender(store: SqliteNodeStore, relay: socket.socket) -> None:
    port, proxy_port = free_udp_port(), free_udp_port()
    settings = DhcpConfig(mode="proxy", port=port, proxy_port=proxy_port)
    svc = DhcpService(store, RegistryService(store, RegistryConfig()),
                      BootPolicy("http://127.0.0.1:8080", "127.0.0.1"), settings, server_address="127.0.0.1")
    registry = CollectorRegistry()
    server = DhcpServer(svc, listen="127.0.0.1", port=port, proxy_port=proxy_port, metrics=registry)
    await server.start()
    try:
        assert server.bound_ports == [port, proxy_port]
        req = dataclasses.replace(golden_packet("edk2-pxe-c2s-request-1"), ciaddr="127.0.0.1")
        relay.sendto(req.encode(), ("127.0.0.1", proxy_port))
        ack = DhcpPacket.parse(await recv(relay))
        assert o.message_type(ack) is o.MessageType.ACK and ack.file == b"snponly.efi" and ack.yiaddr == "0.0.0.0"
        assert value(registry, "bootd_dhcp_received_total", port=str(proxy_port)) == 1
    finally:
        await server.close()


async def test_requests_older_than_max_age_are_shed(store: SqliteNodeStore, relay: socket.socket) -> None:
    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry)
    server.max_age = -1.0  # everything counts as having waited too long
    await server.start()
    try:
        discover = dataclasses.replace(golden_packet("udhcpc-c2s-discover-1"), giaddr="127.0.0.1")
        relay.sendto(discover.encode(), ("127.0.0.1", server.bound_ports[0]))
        for _ in range(100):
            if value(registry, "bootd_dhcp_dropped_total", reason="stale"):
                break
            await asyncio.sleep(0.02)
        assert value(registry, "bootd_dhcp_dropped_total", reason="stale") == 1
        assert value(registry, "bootd_dhcp_replies_total", type="offer") == 0
        assert await store.list_nodes() == []  # shed before any decision was made
    finally:
        await server.close()


async def test_time_in_the_kernel_buffer_counts_toward_a_requests_age(store: SqliteNodeStore,
                                                                      relay: socket.socket) -> None:
    """A wave bigger than the workers can take waits in the (large) socket buffer: the age check must see that
    wait (the kernel's receive stamp), or a stale request would be served as if it had just arrived."""
    import time

    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry)
    server.max_age = 0.3
    await server.start()
    try:
        target = ("127.0.0.1", server.bound_ports[0])
        discover = dataclasses.replace(golden_packet("udhcpc-c2s-discover-1"), giaddr="127.0.0.1")
        relay.sendto(discover.encode(), target)
        time.sleep(0.5)  # the loop is blocked: nothing is read; the first waits in the kernel's buffer
        fresh = dataclasses.replace(discover, chaddr=bytes.fromhex("525400aabbcc") + bytes(10))
        relay.sendto(fresh.encode(), target)
        for _ in range(100):
            if value(registry, "bootd_dhcp_replies_total", type="offer"):
                break
            await asyncio.sleep(0.02)
        assert value(registry, "bootd_dhcp_dropped_total", reason="stale") == 1
        assert value(registry, "bootd_dhcp_replies_total", type="offer") == 1
        reply = DhcpPacket.parse(await recv(relay))
        assert reply.chaddr[:6] == bytes.fromhex("525400aabbcc")  # the one that had not waited
    finally:
        await server.close()


async def test_requests_overtake_discovers(store: SqliteNodeStore, relay: socket.socket) -> None:
    registry = CollectorRegistry()
    server = make(store, relay.getsockname()[1], registry, workers=0)
    await server.start()
    try:
        target = ("127.0.0.1", server.bound_ports[0])
        base = golden_packet("udhcpc-c2s-discover-1")
        for i in range(3):  # three clients
            relay.sendto(dataclasses.replace(base, xid=i).encode(), target)
        relay.sendto(golden("udhcpc-c2s-request-1"), target)
        for _ in range(100):
            if server.queue.qsize() == 4:
                break
            await asyncio.sleep(0.02)
        assert [len(q) for q in server.queue.lanes] == [1, 3]
        (data, *_), lane = await server.queue.get()
        assert lane == 0 and o.message_type(DhcpPacket.parse(data)) is o.MessageType.REQUEST
        (data, *_), lane = await server.queue.get()
        assert lane == 1 and o.message_type(DhcpPacket.parse(data)) is o.MessageType.DISCOVER
    finally:
        await server.close()


async def test_idle_workers_wake_for_each_item() -> None:
    from bootd.net.dhcp import _Lanes

    lanes = _Lanes(8)
    got: list[int] = []

    async def worker() -> None:
        (_, _, port, _, _), _ = await lanes.get()
        got.append(port)

    tasks = [asyncio.create_task(worker()) for _ in range(3)]
    await asyncio.sleep(0)
    for i in range(3):
        assert lanes.put_nowait((b"", ("127.0.0.1", 68), i, None, 0.0), 1)  # type: ignore[arg-type]
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert sorted(got) == [0, 1, 2]
    full = _Lanes(1)
    assert full.put_nowait((b"", ("x", 1), 0, None, 0.0), 0)  # type: ignore[arg-type]
    assert not full.put_nowait((b"", ("x", 1), 0, None, 0.0), 0)  # type: ignore[arg-type]
    assert full.put_nowait((b"", ("x", 1), 0, None, 0.0), 1)  # type: ignore[arg-type]


async def test_a_short_batch_lingers_for_more_and_a_full_one_does_not() -> None:
    from bootd.net.dhcp import _Lanes

    lanes = _Lanes(16)
    item = (b"", ("127.0.0.1", 68), 0, None, 0.0)
    assert lanes.put_nowait(item, 1)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, lambda: [lanes.put_nowait(item, lane) for lane in (1, 0)])  # type: ignore[arg-type]
    got = await asyncio.wait_for(lanes.get_many(8, linger=0.2), 2)
    assert [lane for _, lane in got] == [1, 0, 1]  # the first item, then what came while it lingered, lane 0 first
    for _ in range(4):
        assert lanes.put_nowait(item, 1)  # type: ignore[arg-type]
    start = loop.time()
    assert len(await lanes.get_many(4, linger=5.0)) == 4 and loop.time() - start < 1.0  # full: no wait


async def test_port_in_use_fails_loudly(store: SqliteNodeStore, relay: socket.socket) -> None:
    taken = relay.getsockname()[1]
    settings = DhcpConfig(mode="proxy")
    svc = DhcpService(store, RegistryService(store, RegistryConfig()),
                      BootPolicy("http://127.0.0.1:8080", "127.0.0.1"), settings, server_address="127.0.0.1")
    server = DhcpServer(svc, listen="127.0.0.1", port=taken, metrics=CollectorRegistry())
    with pytest.raises(OSError, match="another DHCP server running"):
        await server.start()
    assert server.bound_ports == []
