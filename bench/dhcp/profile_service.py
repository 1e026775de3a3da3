#!/usr/bin/env python3
"""Profile the DHCP decision path without sockets: N simulated clients doing DORA against the real
SQLite store (file-backed, WAL), so the cost per exchange of parsing, registry and leases is visible.

Usage: python bench/dhcp/profile_service.py [--clients 2000] [--profile] [--rate 1000] [--store pg] [--batch 128]
       [--random-macs]

``--store pg``: the same against a private PostgreSQL server (tests/pgserver.py: initdb into a temporary
directory, a Unix socket), as a shared registry runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

from bootd.config import DhcpConfig, RegistryConfig
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.service.boot import BootPolicy
from bootd.service.dhcp import DhcpService, Outcome, Request
from bootd.service.registry import RegistryService
from bootd.store.base import NodeStore
from bootd.store.factory import open_url
from bootd.store.sqlite import SqliteNodeStore

# The simulated clients are dhclient captures (no PXE vendor class): they must register as nodes like
# netboot clients do, and every one of them at once (no first-contact rate limit), as in bench/dhcp/run.py.
BENCH_REGISTRY = RegistryConfig(register_any_client=True, register_rate=1e6, register_burst=1_000_000,
                                max_nodes=1_000_000)
DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "dhcp"


async def run(clients: int, concurrency: int, rate: int = 0, pg_url: str = "", pg_password: str = "",
              batch: int = 0, random_macs: bool = False) -> float:
    with tempfile.TemporaryDirectory(prefix="bd-dhcp-prof-") as tmp:
        store: NodeStore
        if pg_url:
            store = await open_url(pg_url, password=pg_password)
        else:
            store = SqliteNodeStore(Path(tmp) / "bootd.sqlite")
        svc = DhcpService(store, RegistryService(store, BENCH_REGISTRY),
                          BootPolicy("http://10.80.0.1:8080", "10.80.0.1"),
                          DhcpConfig(pool_start="10.80.1.0", pool_end="10.80.200.255", netmask="255.255.0.0"),
                          server_address="10.80.0.1")
        await svc.load()
        base = DhcpPacket.parse((DATA / "dhclient-c2s-discover-1.bin").read_bytes())
        wires = []
        # bench/dhcp's clients (perfdhcp's, dora.c's) count up, so every MAC index write lands on the last pages; a real
        # rack's come in no MAC order, each write on a random page (3 Dec, --clients 30000 --batch 128: about 24,000
        # exchanges/s against 31,000 in order).
        macs = random.Random(1).sample(range(1 << 40), clients) if random_macs else range(clients)
        for i in macs:
            p = dataclasses.replace(base, chaddr=bytes.fromhex(f"0a{i:010x}") + bytes(10), options=dict(base.options))
            wires.append(p.encode())
        now = time.time()

        async def one(wire: bytes) -> None:
            d = DhcpPacket.parse(wire)
            out = await svc.handle(d, port=67, now=now)
            offer = DhcpPacket.parse(out.replies[0].data)
            d.options[53] = b"\x03"
            d.options[54] = ip_to_bytes("10.80.0.1")
            d.options[50] = ip_to_bytes(offer.yiaddr)
            out = await svc.handle(DhcpPacket.parse(d.encode()), port=67, now=now)
            assert o.message_type(DhcpPacket.parse(out.replies[0].data)) is o.MessageType.ACK

        if batch:
            # As the transport hands them over under load: a read batch of DISCOVERs, then their REQUESTs, each batch
            # decided in one handle_many call. The clients' packets are built before the clock starts.
            requests = []
            for wire in wires:
                d = DhcpPacket.parse(wire)
                d.options[53] = b"\x03"
                d.options[54] = ip_to_bytes("10.80.0.1")
                requests.append(d)
            t0 = time.perf_counter()
            for start in range(0, len(wires), batch):
                got = await svc.handle_many([Request(DhcpPacket.parse(w), 67) for w in wires[start:start + batch]], now)
                for d, offer in zip(requests[start:start + batch], got, strict=True):
                    assert isinstance(offer, Outcome)
                    d.options[50] = ip_to_bytes(DhcpPacket.parse(offer.replies[0].data).yiaddr)
                acks = await svc.handle_many([Request(DhcpPacket.parse(d.encode()), 67)
                                              for d in requests[start:start + batch]], now)
                assert all(isinstance(a, Outcome) and a.replies and a.replies[0].msg_type is o.MessageType.ACK
                           for a in acks)
            elapsed = time.perf_counter() - t0
            await store.close()
            return elapsed

        if rate:
            # Paced like perfdhcp -r: a new client every 1/rate s; each exchange's delay (DISCOVER->OFFER plus
            # REQUEST->ACK, as perfdhcp sums them) is what the capacity criterion (avg < 10 ms) looks at.
            delays: list[float] = []

            async def timed(wire: bytes) -> None:
                t = time.perf_counter()
                await one(wire)
                delays.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            tasks = []
            for i, wire in enumerate(wires):
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(timed(wire)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - t0
            delays.sort()
            print(f"paced {rate}/s: avg delay {sum(delays) / len(delays) * 1e3:.2f} ms, "
                  f"p99 {delays[len(delays) * 99 // 100] * 1e3:.2f} ms")
            await store.close()
            return elapsed

        sem = asyncio.Semaphore(concurrency)

        async def limited(wire: bytes) -> None:
            async with sem:
                await one(wire)

        t0 = time.perf_counter()
        await asyncio.gather(*(limited(w) for w in wires))
        elapsed = time.perf_counter() - t0
        await store.close()
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rate", type=int, default=0, help="pace new clients at this rate and report the average delay")
    ap.add_argument("--store", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--batch", type=int, default=0,
                    help="hand the service read batches of this many requests (handle_many), as the transport does")
    ap.add_argument("--random-macs", action="store_true",
                    help="clients in no MAC order, as a real rack's power-on (default: counting up, as bench/dhcp's)")
    args = ap.parse_args()
    pg = None
    if args.store == "pg":
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.pgserver import PgServer

        pg = PgServer()
        try:
            pg.init()  # and starts it
        except BaseException:
            pg.cleanup()
            raise
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
    cpu = time.process_time()
    try:
        elapsed = asyncio.run(run(args.clients, args.concurrency, args.rate, pg.new_schema_url() if pg else "",
                                  pg.password if pg else "", args.batch, args.random_macs))
    finally:
        if pg is not None:
            pg.cleanup()
    cpu = time.process_time() - cpu
    if args.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    # CPU per exchange as well: on a shared machine the wall-clock rate also measures the neighbours.
    print(f"{args.clients} DORA in {elapsed:.2f}s = {args.clients / elapsed:.0f} exchanges/s, "
          f"{cpu / args.clients * 1e3:.2f} ms CPU per exchange (clients' side included)")


if __name__ == "__main__":
    main()
