"""The NodeStore contract on both backends, and what only PostgreSQL has.

Tests taking ``node_store`` or ``store_target`` run on SQLite and on a real PostgreSQL server
(tests/pgserver.py); the others need the server for passwords, outages, schema upgrades and
``bootd store migrate``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bootd import config as config_mod
from bootd.errors import Conflict, NotFound, RegistryFull, StateChanged, StoreError
from bootd.model import Group, Lease, Node, State
from bootd.store import migrate, postgres
from bootd.store.base import Credential, NewNode, NodeStore, ServerRecord, StoreStatus, mask_url
from bootd.store.broken import BrokenStore
from bootd.store.factory import open_store, open_url
from bootd.store.sqlite import SqliteNodeStore
from tests.conftest import ROOT, StoreTarget, free_port, run_cli, write_config
from tests.pgserver import PgServer


def mac(i: int) -> str:
    return f"52:54:00:00:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


async def register(store: NodeStore, i: int, now: float = 1.0) -> str:
    node, _ = await store.register(mac(i), name_pattern="n{index:04d}", first_index=0, group="default",
                                   approved=True, now=now)
    return node.name


# -- the contract, on both backends ---------------------------------------------------------------------------
async def test_set_state_is_a_compare_and_set(node_store: NodeStore) -> None:
    name = await register(node_store, 1)
    node = await node_store.set_state(name, State.PXE, now=2.0, expect=State.DISCOVERED)
    assert node.state == State.PXE and node.state_since == 2.0
    with pytest.raises(StateChanged, match="is pxe, not discovered"):
        await node_store.set_state(name, State.STAGE1, now=3.0, expect=State.DISCOVERED)
    # Twenty writers race for the same transition: exactly one wins, the others learn who did.
    results = await asyncio.gather(
        *(node_store.set_state(name, State.STAGE1, f"w{i}", now=4.0 + i, expect=State.PXE) for i in range(20)),
        return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, StateChanged) for r in results if r not in winners)
    assert [e.state for e in await node_store.events(name)] == ["discovered", "pxe", "stage1"]
    with pytest.raises(NotFound):
        await node_store.set_state("nobody", State.PXE, now=5.0)


async def test_events_are_trimmed_per_node_to_the_newest(node_store: NodeStore) -> None:
    busy, quiet = await register(node_store, 1), await register(node_store, 2)
    for i in range(230):
        await node_store.set_state(busy, State.STAGE1 if i % 2 else State.PXE, f"step {i}", now=10.0 + i)
    await node_store.set_state(quiet, State.PXE, now=5.0)
    events = await node_store.events(busy, limit=1000)
    assert len(events) == 200
    assert events[-1].reason == "step 229" and events[0].reason == "step 30"
    assert [e.state for e in await node_store.events(quiet)] == ["discovered", "pxe"]
    assert [e.reason for e in await node_store.events(busy, limit=2)] == ["step 228", "step 229"]


async def test_node_administration_and_its_refusals(node_store: NodeStore) -> None:
    await node_store.put_group(Group("gpu", capsule="rocky9", kernel_args="quiet", description="A100"))
    assert await node_store.get_group("gpu") == Group("gpu", "rocky9", "quiet", "A100")
    node = await node_store.add_node(mac(1), "g1", group="gpu", now=1.0, capsule="c1", kernel_args="debug")
    assert (node.group, node.capsule, node.kernel_args, node.first_contact) == ("gpu", "c1", "debug", 0.0)
    await node_store.add_node(mac(2), "g2", group="gpu", now=1.0)
    node = await node_store.update_node("g1", mac="52-54-00-00-00-09", enabled=0, group="default")
    assert (node.name, node.mac, node.enabled, node.group) == ("g1", mac(9), False, "default")
    with pytest.raises(Conflict, match="already registered as g2"):
        await node_store.update_node("g1", mac=mac(2))
    with pytest.raises(Conflict, match="already exists"):
        await node_store.add_node(mac(3), "g2", group="gpu", now=1.0)
    with pytest.raises(StoreError, match="settable fields"):
        await node_store.update_node("g1", state="ready")
    node = await node_store.set_vars("g1", {"role": "io", "rack": "3"})
    assert node.vars == {"rack": "3", "role": "io"}
    node = await node_store.set_vars("g1", {"role": "gpu"}, unset=("rack",))
    assert node.vars == {"role": "gpu"} and (await node_store.get_node_by_mac(mac(9))) == node
    await node_store.put_lease(Lease("10.0.0.9", mac(9), 100.0, "g1"))
    assert (await node_store.get_node("g1")).ip == "10.0.0.9"  # type: ignore[union-attr]
    await node_store.delete_node("g1")
    assert await node_store.get_node("g1") is None and await node_store.list_leases() == []
    with pytest.raises(Conflict, match="default group"):
        await node_store.delete_group("default")
    with pytest.raises(NotFound):
        await node_store.delete_group("nope")
    await node_store.delete_node("g2")
    await node_store.delete_group("gpu")
    assert [g.name for g in await node_store.list_groups()] == ["default"]


async def test_first_contacts_at_once_skip_hand_names_and_fail_alone(node_store: NodeStore) -> None:
    # On PostgreSQL these land in one registration batch: one bad request must not sink the others,
    # names taken by hand are skipped, and the same MAC twice is one node.
    await node_store.add_node(mac(900), "n0001", group="default", now=0.0)
    await node_store.add_node(mac(901), "n0003", group="default", now=0.0)

    async def first_contact(i: int, group: str = "default") -> tuple[str, bool]:
        node, created = await node_store.register(mac(i), name_pattern="n{index:04d}", first_index=0, group=group,
                                                  approved=True, now=1.0)
        return node.name, created

    results = await asyncio.gather(*(first_contact(i) for i in range(10)), first_contact(4),
                                   first_contact(50, group="nope"), return_exceptions=True)
    assert isinstance(results[11], NotFound) and "bootd group add nope" in str(results[11])
    made = results[:11]
    assert all(isinstance(r, tuple) for r in made), made
    names = [r[0] for r in made]  # type: ignore[index]
    assert len(set(names[:10])) == 10 and names[10] == names[4]
    assert not {"n0001", "n0003"} & set(names)
    assert sorted([r[1] for r in made]) == [False] + [True] * 10  # type: ignore[index]
    assert len(await node_store.list_nodes()) == 12 and await node_store.get_node_by_mac(mac(50)) is None
    for name in names[:10]:
        assert [e.reason for e in await node_store.events(name)] == ["first contact"]
    if isinstance(node_store, postgres.PostgresNodeStore):
        assert node_store.register_batches < 11  # some first contacts shared a transaction


async def test_credentials_evidence_refusals_and_the_node_cap(node_store: NodeStore) -> None:
    """What the trust layer keeps in the store, alike on both backends."""
    node, _ = await node_store.register(mac(1), name_pattern="n{index:04d}", first_index=0, group="default",
                                        approved=True, now=1.0)
    assert await node_store.get_credential(node.name) is None
    await node_store.put_credential(Credential(node.name, "aa" * 32, 1.0, 100.0, "lease:10.0.0.1"))
    await node_store.put_credential(Credential(node.name, "bb" * 32, 2.0, 200.0, "lease:10.0.0.1"))  # a new boot
    await node_store.extend_credential(node.name, "aa" * 32, 999.0)  # the replaced one cannot be extended
    assert await node_store.get_credential(node.name) == Credential(node.name, "bb" * 32, 2.0, 200.0,
                                                                    "lease:10.0.0.1")
    await node_store.extend_credential(node.name, "bb" * 32, 300.0)
    cred = await node_store.get_credential(node.name)
    assert cred is not None and cred.expires == 300.0
    await node_store.note_pxe(mac(1), 5.0, None)
    await node_store.note_pxe(mac(1), 6.0, "10.0.0.1")
    assert await node_store.pxe_seen(mac(1)) == (6.0, "10.0.0.1") and await node_store.pxe_seen(mac(2)) is None
    await node_store.record_event(node.name, 7.0, "refused", "firmware asked ready -> pxe")
    assert [e.state for e in await node_store.events(node.name)][-1] == "refused"
    # Deleting the node drops its credential; the next node under the same name starts with none.
    await node_store.delete_node(node.name)
    again, created = await node_store.register(mac(2), name_pattern="n{index:04d}", first_index=0,
                                               group="default", approved=True, now=8.0)
    assert created and again.name == node.name and await node_store.get_credential(again.name) is None
    with pytest.raises(RegistryFull, match="max_nodes = 1"):
        await node_store.register(mac(3), name_pattern="n{index:04d}", first_index=0, group="default",
                                  approved=True, now=9.0, max_nodes=1)


async def test_racing_lease_writes_leave_one_lease_per_address_and_per_mac(node_store: NodeStore) -> None:
    # Forty writers fight over four addresses and four MACs at once (on PostgreSQL: over ten connections,
    # so unique violations happen and are retried); the result is a consistent table, never an error.
    await asyncio.gather(*(node_store.put_lease(Lease(f"10.0.0.{i % 4}", mac(i % 4 + (i // 4) % 2 * 4), float(i)))
                           for i in range(40)))
    leases = await node_store.list_leases()
    assert len({x.ip for x in leases}) == len(leases) and len({x.mac for x in leases}) == len(leases)
    assert leases and {x.ip for x in leases} <= {f"10.0.0.{i}" for i in range(4)}


async def test_an_address_is_never_leased_twice_whoever_writes_it(node_store: NodeStore) -> None:
    # Two servers with stale memories both think 10.0.0.7 is free: the database, not luck, refuses the second.
    for i in (1, 2, 3):
        await node_store.add_node(mac(i), f"m{i}", group="default", now=0.0)
    await node_store.put_lease(Lease("10.0.0.7", mac(1), 1000.0), now=100.0, server="a")
    with pytest.raises(Conflict, match=re.escape("10.0.0.7 is leased to 52:54:00:00:00:01")):
        await node_store.put_lease(Lease("10.0.0.7", mac(2), 1100.0), now=101.0, server="b")
    node = await node_store.get_node("m1")
    assert node is not None and node.ip == "10.0.0.7" and node.server == "a"  # shown with the server that booted it
    # Expired, the lease is free, but the address stays m1's own (its node keeps it): still refused.
    with pytest.raises(Conflict, match="node m1's own address"):
        await node_store.put_lease(Lease("10.0.0.7", mac(2), 3000.0), now=2000.0, server="b")
    # The node itself renews through any server, and moves its own address with it.
    await node_store.put_lease(Lease("10.0.0.7", mac(1), 3000.0), now=2000.0, server="b")
    await node_store.put_lease(Lease("10.0.0.8", mac(1), 3000.0), now=2001.0, server="b")
    await node_store.put_lease(Lease("10.0.0.7", mac(2), 3000.0), now=2002.0, server="a")
    assert {(x.ip, x.mac) for x in await node_store.list_leases()} == {("10.0.0.8", mac(1)), ("10.0.0.7", mac(2))}
    with pytest.raises(Conflict, match=re.escape("10.0.0.8 is already node m1's")):
        await node_store.update_node("m3", ip="10.0.0.8")


async def test_concurrent_leases_share_transactions_and_a_refused_one_fails_alone(node_store: NodeStore) -> None:
    # A storm's ACKs arrive together: both backends store them in shared transactions (SQLite's group commit,
    # PostgreSQL's leaser); one the database must refuse (a live lease of another MAC, another node's own
    # address) fails alone, and a MAC asking twice in one batch ends with one lease.
    await node_store.add_node(mac(90), "owner", group="default", now=0.0, ip="10.0.1.90")
    await node_store.put_lease(Lease("10.0.1.1", mac(1), 1000.0), now=10.0)
    before = getattr(node_store, "lease_batches", 0)
    wanted = [Lease(f"10.0.1.{i}", mac(i + 10), 1000.0, f"h{i}") for i in range(1, 40)]
    wanted.append(Lease("10.0.1.90", mac(77), 1000.0))  # the node owner's own address
    wanted.append(Lease("10.0.1.60", mac(20), 1000.0))  # mac(20) again: its second lease replaces the first
    results = await asyncio.gather(*(node_store.put_lease(x, now=10.0) for x in wanted), return_exceptions=True)
    assert isinstance(results[0], Conflict) and "10.0.1.1 is leased to 52:54:00:00:00:01" in str(results[0])
    assert isinstance(results[-2], Conflict) and "node owner's own address" in str(results[-2])
    assert results[1:-2] == [None] * 38 and results[-1] is None
    leases = {x.ip: x for x in await node_store.list_leases()}
    assert leases["10.0.1.1"].mac == mac(1) and "10.0.1.90" not in leases and "10.0.1.10" not in leases
    assert leases["10.0.1.60"].mac == mac(20) and leases["10.0.1.5"] == Lease("10.0.1.5", mac(15), 1000.0, "h5")
    assert len(leases) == 1 + 38
    if isinstance(node_store, postgres.PostgresNodeStore):
        assert node_store.lease_batches - before < 10  # forty leases, a few transactions


async def test_concurrent_state_steps_keep_each_nodes_order_and_fail_alone(node_store: NodeStore) -> None:
    # A storm's nodes report within milliseconds of each other (PostgreSQL applies them in shared
    # transactions): one node's steps keep their order, a lost compare-and-set or an unknown node fails alone.
    for i in range(20):
        await node_store.add_node(mac(i), f"s{i:02d}", group="default", now=0.0)
    steps = [node_store.set_state(f"s{i:02d}", State.PXE, "dhcp", now=10.0, expect=State.DISCOVERED)
             for i in range(20)]
    steps.append(node_store.set_state("s03", State.STAGE1, "tftp", now=11.0, expect=State.PXE))  # after its pxe
    steps.append(node_store.set_state("s04", State.READY, "x", now=11.0, expect=State.BOOTED))  # loses
    steps.append(node_store.set_state("nobody", State.PXE, now=11.0))
    results = await asyncio.gather(*steps, return_exceptions=True)
    assert all(isinstance(r, Node) and r.state is State.PXE for r in results[:20]), results
    assert isinstance(results[20], Node) and results[20].state is State.STAGE1 and results[20].state_since == 11.0
    assert isinstance(results[21], StateChanged) and isinstance(results[22], NotFound)
    stored = {n.name: n for n in await node_store.list_nodes()}
    assert stored["s03"].state is State.STAGE1 and stored["s04"].state is State.PXE
    assert stored["s05"] == results[5]  # what set_state returned is what the store holds
    assert [e.state for e in await node_store.events("s03")][-2:] == ["pxe", "stage1"]


async def test_concurrent_credentials_replace_in_order_and_an_unknown_node_fails_alone(node_store: NodeStore) -> None:
    # Every boot script of a storm issues a credential (PostgreSQL stores those waiting in shared transactions):
    # a node's second credential arriving with its first replaces it, an unknown node is refused alone.
    for i in range(12):
        await node_store.add_node(mac(i), f"c{i:02d}", group="default", now=0.0)
    writes = [node_store.put_credential(Credential(f"c{i:02d}", f"{i:02d}" * 32, 1.0, 100.0 + i, f"lease:{i}"))
              for i in range(12)]
    writes.append(node_store.put_credential(Credential("c03", "ff" * 32, 2.0, 200.0, "lease:again")))
    writes.append(node_store.put_credential(Credential("nobody", "ee" * 32, 1.0, 100.0, "")))
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert results[:13] == [None] * 13 and isinstance(results[13], NotFound), results
    assert await node_store.get_credential("c03") == Credential("c03", "ff" * 32, 2.0, 200.0, "lease:again")
    assert await node_store.get_credential("c07") == Credential("c07", "07" * 32, 1.0, 107.0, "lease:7")
    assert await node_store.get_credential("nobody") is None


async def test_a_known_nodes_contact_is_recorded_at_most_once_a_second(node_store: NodeStore) -> None:
    async def contact(i: int, now: float) -> tuple[Node, bool]:
        return await node_store.register(mac(i), name_pattern="k{index:02d}", first_index=0, group="default",
                                         approved=True, now=now)

    first = await asyncio.gather(*(contact(i, 5.0) for i in range(6)))
    assert sorted(n.name for n, new in first if new) == [f"k{i:02d}" for i in range(6)]
    again = await asyncio.gather(contact(1, 5.5), contact(2, 7.0), contact(2, 7.2), contact(40, 7.0))
    assert [(n.name, new) for n, new in again] == [("k01", False), ("k02", False), ("k02", False), ("k06", True)]
    await contact(3, 9.0)
    stored = {n.name: n.last_contact for n in await node_store.list_nodes()}
    # Half a second after the last: not recorded; later ones are (concurrent ones: one of them).
    assert stored["k01"] == 5.0 and stored["k02"] in (7.0, 7.2) and stored["k03"] == 9.0 and stored["k06"] == 7.0


async def test_reads_arriving_together_each_get_their_own_row(node_store: NodeStore) -> None:
    # PostgreSQL answers reads that arrive together with one query: each caller must still get its own row,
    # None for a missing one, and a read that comes after a write sees it.
    for i in range(5):
        await node_store.add_node(mac(i), f"r{i}", group="default", now=0.0)
    await node_store.put_credential(Credential("r2", "cc" * 32, 1.0, 100.0, "lease:10.0.0.2"))
    got = await asyncio.gather(*(node_store.get_node(f"r{i}") for i in (4, 0, 9, 4)),
                               node_store.get_credential("r2"), node_store.get_credential("r3"),
                               node_store.get_group("default"), node_store.get_group("nope"))
    assert [n.mac if isinstance(n, Node) else n for n in got[:4]] == [mac(4), mac(0), None, mac(4)]
    assert got[4] == Credential("r2", "cc" * 32, 1.0, 100.0, "lease:10.0.0.2") and got[5] is None
    assert isinstance(got[6], Group) and got[6].name == "default" and got[7] is None
    await node_store.set_state("r1", State.PXE, "dhcp", now=5.0)
    after = await node_store.get_node("r1")
    assert after is not None and after.state is State.PXE


async def test_servers_heartbeat_list_and_leave(node_store: NodeStore) -> None:
    a = ServerRecord("a", ("10.0.0.1",), "http://10.0.0.1:8080", pid=11, started=1.0, heartbeat=5.0, load=2.5)
    rows = await node_store.beat(a)
    assert rows == [a]
    b = ServerRecord("b", ("10.0.0.2", "10.1.0.2"), "http://10.0.0.2:8080", pid=12, started=2.0, heartbeat=6.0)
    assert [r.id for r in await node_store.beat(b)] == ["a", "b"]
    assert (await node_store.beat(dataclasses.replace(a, heartbeat=9.0)))[0].heartbeat == 9.0
    await node_store.add_node(mac(5), "m5", group="default", now=0.0)
    await node_store.put_lease(Lease("10.0.0.50", mac(5), 100.0), now=1.0, server="b")
    listed = await node_store.list_servers()
    assert [(r.id, r.addresses, r.nodes) for r in listed] == [("a", ("10.0.0.1",), 0),
                                                            ("b", ("10.0.0.2", "10.1.0.2"), 1)]
    await node_store.drop_server("a")
    assert [r.id for r in await node_store.list_servers()] == ["b"]


async def test_one_holder_of_a_cluster_lock_at_a_time(node_store: NodeStore) -> None:
    assert await node_store.take_lock("sweep", "a", now=100.0, ttl=10.0)
    assert not await node_store.take_lock("sweep", "b", now=105.0, ttl=10.0)
    assert await node_store.take_lock("sweep", "a", now=108.0, ttl=10.0)  # the holder renews
    assert not await node_store.take_lock("sweep", "b", now=117.0, ttl=10.0)
    assert await node_store.take_lock("sweep", "b", now=118.0, ttl=10.0)  # expired: taken over
    assert not await node_store.take_lock("sweep", "a", now=119.0, ttl=10.0)
    results = await asyncio.gather(*(node_store.take_lock("race", f"s{i}", now=200.0, ttl=10.0) for i in range(8)))
    assert sum(results) == 1
    await node_store.drop_server("b")  # a stopping server lets go of its locks
    assert await node_store.take_lock("sweep", "a", now=120.0, ttl=10.0)


async def test_sqlite_group_commit_writes_concurrent_leases_in_one_transaction(tmp_path: Path) -> None:
    # Leases written at once share one transaction; a lease the database refuses fails alone, the others of
    # its batch are committed, and every caller returns only after the commit that holds its lease.
    store = SqliteNodeStore(tmp_path / "r.sqlite")
    batches: list[int] = []
    real = store.repo.batch

    def counted(ops: list[Callable[[sqlite3.Connection], Any]], **kw: Any) -> list[tuple[bool, Any]]:
        batches.append(len(ops))
        return real(ops, **kw)

    store.repo.batch = counted  # type: ignore[method-assign]
    try:
        await store.put_lease(Lease("10.0.0.1", mac(1), 1000.0), now=10.0)
        results = await asyncio.gather(*(store.put_lease(Lease(f"10.0.0.{i}", mac(i + 10), 1000.0), now=10.0)
                                         for i in range(1, 6)), return_exceptions=True)
        assert isinstance(results[0], Conflict) and "10.0.0.1 is leased to 52:54:00:00:00:01" in str(results[0])
        assert results[1:] == [None] * 4
        assert batches == [1, 5]
        # First contacts are group-committed too: distinct names, in order, one transaction.
        names = await asyncio.gather(*(register(store, i) for i in range(30, 34)))
        assert names == ["n0000", "n0001", "n0002", "n0003"] and batches[2:] == [4]
        leases = {(x.ip, x.mac) for x in await store.list_leases()}
        assert leases == {("10.0.0.1", mac(1))} | {(f"10.0.0.{i}", mac(i + 10)) for i in range(2, 6)}
    finally:
        await store.close()
    # Committed means on disk: a second process (a fresh connection) sees all of them.
    reopened = SqliteNodeStore(tmp_path / "r.sqlite")
    try:
        assert len(await reopened.list_leases()) == 5
    finally:
        await reopened.close()


async def test_sqlite_group_commit_runs_on_the_loop_but_never_waits_there_for_another_writer(tmp_path: Path) -> None:
    # The DHCP path's batches run on the event loop's thread (no trip to the database thread); while another
    # connection (the CLI, another process) holds the write lock, they wait for it on the database thread instead,
    # and the loop keeps running meanwhile.
    store = SqliteNodeStore(tmp_path / "r.sqlite")
    where: list[int] = []
    real = store.repo.batch

    def traced(ops: list[Callable[[sqlite3.Connection], Any]], **kw: Any) -> list[tuple[bool, Any]]:
        where.append(threading.get_ident())
        return real(ops, **kw)

    store.repo.batch = traced  # type: ignore[method-assign]
    loop_thread = threading.get_ident()
    other = sqlite3.connect(tmp_path / "r.sqlite", isolation_level=None)
    try:
        await store.put_lease(Lease("10.0.0.1", mac(1), 1000.0), now=10.0)
        assert where == [loop_thread]
        other.execute("BEGIN IMMEDIATE")
        # A read on the DHCP path (the default group, every registration batch) needs no write lock: answered on
        # the loop, at once, while the other connection holds it (a WAL reader waits for no writer).
        group = await asyncio.wait_for(store.get_group("default"), 1)
        assert group is not None and group.name == "default" and where == [loop_thread]
        writing = asyncio.ensure_future(store.put_lease(Lease("10.0.0.2", mac(2), 1000.0), now=10.0))
        ticks = 0
        for _ in range(20):  # 0.2 s of a running loop while the write waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not writing.done()
        other.execute("COMMIT")
        await asyncio.wait_for(writing, 10)
        assert where[1] == loop_thread and where[2] != loop_thread  # tried on the loop, then waited on the db thread
        assert {x.ip for x in await store.list_leases()} == {"10.0.0.1", "10.0.0.2"}
    finally:
        other.close()
        await store.close()


async def test_sqlite_wal_is_checkpointed_in_the_background_not_in_a_commit(tmp_path: Path) -> None:
    # The daemon's writer never checkpoints (an fsync inside an ACK's commit); a thread of its own copies the WAL
    # into the database file within about a second, and closing the store leaves no WAL behind.
    path = tmp_path / "r.sqlite"
    store = SqliteNodeStore(path)
    try:
        assert await store._run(lambda: store.repo.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        before = path.stat().st_size
        await asyncio.gather(*(store.put_lease(Lease(f"10.0.{i // 250}.{i % 250}", mac(i), 1000.0, "h" * 200),
                                               now=10.0) for i in range(2000)))
        deadline = time.monotonic() + 10
        while path.stat().st_size <= before and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert path.stat().st_size > before, "nothing was checkpointed into the database file"
    finally:
        await store.close()
    assert not (tmp_path / "r.sqlite-wal").exists()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 2000


def test_sqlite_migration_5_keeps_one_node_per_address(tmp_path: Path) -> None:
    import sqlite3

    from bootd.store import sqlite

    path = tmp_path / "old.sqlite"
    repo = sqlite.SqliteRepo(path)
    repo.migrate()
    repo.close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 4")
    db.executescript("DROP INDEX nodes_ip; DROP TABLE servers; DROP TABLE cluster_locks;"
                     "ALTER TABLE nodes DROP COLUMN server;")
    for i, name in enumerate(("x1", "x2")):
        db.execute("INSERT INTO nodes(mac, name, grp, state, state_since, first_contact, last_contact, ip)"
                   " VALUES (?, ?, 'default', 'ready', 1, 1, 1, '10.0.0.9')", (mac(i), name))
    db.commit()
    db.close()
    repo = sqlite.SqliteRepo(path)
    assert repo.schema_version() == 5
    assert [(n.name, n.ip) for n in repo.list_nodes()] == [("x1", "10.0.0.9"), ("x2", None)]
    repo.close()


async def test_status_says_which_backend_and_that_it_is_healthy(store_target: StoreTarget) -> None:
    store = await store_target.open()
    status = await store.probe()
    assert status.backend == store_target.backend and status.healthy and status.failures == 0
    await store.close()
    assert not store.status().healthy


async def test_store_url_picks_the_backend_and_defaults_to_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    store = await open_store(config_mod.from_dict({"server": {"state_dir": str(tmp_path / "state")}}))
    assert store.status() == StoreStatus("sqlite", str(tmp_path / "state" / "bootd.sqlite"), healthy=True)
    assert BrokenStore(store, {"status"}).status().backend == "sqlite"  # no I/O, nothing to break
    await store.close()
    other = tmp_path / "elsewhere" / "r.sqlite"
    store = await open_store(config_mod.from_dict({"store": {"url": f"sqlite://{other}"}}))
    assert store.status().url == str(other) and other.exists()
    await store.close()


# -- PostgreSQL only --------------------------------------------------------------------------------------------
async def test_postgres_migrates_an_old_schema_and_keeps_its_rows(postgres_server: PgServer) -> None:
    url = postgres_server.new_schema_url()
    conn = await postgres.connect(url, password=postgres_server.password)
    assert await postgres.migrate(conn, url, target=1) == 0
    await conn.execute("INSERT INTO groups(name) VALUES ('default')")
    await conn.execute("INSERT INTO nodes(mac, name, idx, grp, state, state_since, first_contact, last_contact)"
                       " VALUES ('52:54:00:00:00:01', 'n0000', 0, 'default', 'ready', 1, 1, 1)")
    await conn.close()
    store = await open_url(url, password=postgres_server.password)
    conn = await postgres.connect(url, password=postgres_server.password)
    assert await postgres.schema_version(conn) == postgres.SCHEMA_VERSION == 5
    await conn.close()
    node = await store.get_node("n0000")
    assert node is not None and node.state == State.READY
    await store.set_state("n0000", State.STALE, "no heartbeat", now=5.0)
    assert [e.state for e in await store.events("n0000")] == ["stale"]
    await store.close()


async def test_postgres_refuses_a_newer_schema(postgres_server: PgServer) -> None:
    url = postgres_server.new_schema_url()
    conn = await postgres.connect(url, password=postgres_server.password)
    await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    await conn.execute("INSERT INTO schema_version VALUES (99)")
    await conn.close()
    with pytest.raises(StoreError, match="schema version 99, newer than this bootd"):
        await open_url(url, password=postgres_server.password)


def test_mask_url_hides_passwords_in_urls_and_conninfo_strings() -> None:
    assert mask_url("postgresql://bootd:pa:ss@db:5432/x?sslmode=require") == \
        "postgresql://bootd:***@db:5432/x?sslmode=require"
    assert mask_url("postgresql://db/x?sslmode=require&password=pw&user=u") == \
        "postgresql://db/x?sslmode=require&password=***&user=u"
    assert mask_url("host=db password='a b' user=u") == "host=db password=*** user=u"
    assert mask_url("postgresql://bootd@/x?host=/run/pg") == "postgresql://bootd@/x?host=/run/pg"


def test_migrations_are_numbered_alike_on_both_backends() -> None:
    from bootd.store import sqlite

    assert postgres.SCHEMA_VERSION == sqlite.SCHEMA_VERSION


async def test_unreachable_database_at_start_names_the_url_and_hides_the_password(tmp_path: Path) -> None:
    url = f"postgresql://bootd:s3cret-pw@/bootd?host={tmp_path}&sslmode=disable"
    with pytest.raises(StoreError) as info:
        await open_url(url, connect_timeout=2)
    message = str(info.value)
    assert "s3cret" not in message
    assert f"cannot connect to the node registry at postgresql://bootd:***@/bootd?host={tmp_path}" in message
    assert "No such file or directory" in message  # libpq's reason: no server socket there
    # The CLI says the same and exits 1.
    await SqliteNodeStore(tmp_path / "r.sqlite").close()
    cfg = write_config(tmp_path / "bootd.toml", {"server": {"state_dir": str(tmp_path)}})
    proc = run_cli("store", "migrate", "--to", url, "--from", str(tmp_path / "r.sqlite"), config=cfg)
    assert proc.returncode == 1 and "s3cret" not in proc.stdout + proc.stderr
    assert f"error: cannot connect to the node registry at postgresql://bootd:***@/bootd?host={tmp_path}" \
        in proc.stderr


async def test_password_comes_from_the_file_or_the_environment_and_is_never_printed(
        postgres_server: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = postgres_server.new_schema_url()
    secret = tmp_path / "db-password"
    secret.write_text("not-the-password\n")
    secret.chmod(0o600)
    cfg = config_mod.from_dict({"server": {"state_dir": str(tmp_path)},
                                "store": {"url": url, "password_file": str(secret), "connect_timeout": 2}})
    monkeypatch.delenv("PGPASSWORD", raising=False)
    with pytest.raises(StoreError, match='password authentication failed for user "bootd"') as info:
        await open_store(cfg)
    assert "not-the-password" not in str(info.value) and postgres_server.password not in str(info.value)
    secret.write_text(postgres_server.password + "\n")
    store = await open_store(cfg)
    assert store.status().backend == "postgresql" and postgres_server.password not in store.status().url
    await store.close()
    # No password_file: libpq's own $PGPASSWORD.
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    store = await open_store(config_mod.from_dict({"store": {"url": url}}))
    await store.close()
    secret.write_text("")
    with pytest.raises(StoreError, match="is empty"):
        await open_store(cfg)


async def test_sslmode_is_passed_through_to_libpq(postgres_server: PgServer) -> None:
    url = postgres_server.new_schema_url()
    with pytest.raises(StoreError, match='invalid sslmode value: "sometimes"'):
        await open_url(url + "&sslmode=sometimes", password=postgres_server.password)
    store = await open_url(url + "&sslmode=disable", password=postgres_server.password)
    await store.close()
    # libpq never uses TLS on a Unix socket; over TCP, watch what it asks for. A loopback listener that
    # answers libpq's SSLRequest with "N" (no TLS here): require must refuse, disable must not even ask.
    first: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readexactly(8)
        first.append(head)
        if head == SSL_REQUEST:
            writer.write(b"N")
            await writer.drain()
            await reader.read(8)
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    tcp = f"postgresql://bootd@127.0.0.1:{port}/bootd?sslmode="
    with pytest.raises(StoreError, match="server does not support SSL, but SSL was required"):
        await open_url(tcp + "require", password="unused-here", connect_timeout=5)
    assert first == [SSL_REQUEST]
    with pytest.raises(StoreError, match=re.escape(f"cannot connect to the node registry at {tcp}disable: ")):
        await open_url(tcp + "disable", password="unused-here", connect_timeout=5)
    assert len(first) == 2 and first[1] != SSL_REQUEST  # a plain StartupMessage
    listener.close()
    await listener.wait_closed()


# The 8-byte SSLRequest packet: length 8, then the code 80877103.
SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")


async def test_lost_database_is_retried_counted_logged_once_and_reported(
        postgres_server: PgServer, caplog: pytest.LogCaptureFixture) -> None:
    metrics = CollectorRegistry()
    store = await open_url(postgres_server.new_schema_url(), password=postgres_server.password,
                           retry_for=1.0, metrics=metrics)
    name = await register(store, 1)
    caplog.set_level(logging.INFO, logger="bootd.store")
    try:
        postgres_server.stop()
        assert store.status().healthy  # nobody has asked yet ...
        assert not (await store.probe(timeout=1.0)).healthy  # ... a probe (what /healthz does) finds out
        for _ in range(3):
            with pytest.raises(StoreError, match=r"is unreachable \(retried for 1s\)"):
                await store.get_node(name)
        status = store.status()
        assert not status.healthy and status.down_since is not None and status.failures >= 4
        assert metrics.get_sample_value("bootd_store_unreachable_total") == status.failures
        logged = [r for r in caplog.records if "event=store_unreachable" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]  # once per interval, not once per call
        # A call made while the database is down completes once it is back (bounded by retry_for).
        store.retry_for = 60.0  # type: ignore[attr-defined]
        pending = asyncio.create_task(store.put_lease(Lease("10.0.0.7", mac(1), 99.0)))
        await asyncio.sleep(0.5)
        assert not pending.done()
    finally:
        postgres_server.start()
    await asyncio.wait_for(pending, 60)
    assert (await store.get_lease_by_mac(mac(1))) == Lease("10.0.0.7", mac(1), 99.0)
    status = store.status()
    assert status.healthy and status.reconnects == 1
    assert metrics.get_sample_value("bootd_store_reconnects_total") == 1
    assert any("event=store_reconnected" in r.getMessage() for r in caplog.records)
    assert (await store.probe()).healthy and store.status().reconnects == 1
    # After a restart nobody noticed, the probe drops the dead pooled connections instead of failing.
    postgres_server.stop()
    postgres_server.start()
    assert (await store.probe()).healthy and store.status().failures == status.failures
    await store.close()


CLIENT = """
import asyncio, sys
from bootd.model import Lease
from bootd.store.factory import open_url

async def main():
    store = await open_url(sys.argv[1], password=sys.argv[2])
    await store.register("52:54:00:00:00:42", name_pattern="n{index:04d}", first_index=0, group="default",
                         approved=True, now=1.0)
    await store.put_lease(Lease("10.0.0.42", "52:54:00:00:00:42", 3600.0))
    print("stored", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_lease_stored_before_the_call_returns_survives_kill_9_of_the_client(
        postgres_server: PgServer) -> None:
    url = postgres_server.new_schema_url()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), url, postgres_server.password],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line == "stored\n", proc.stderr.read() if proc.stderr else ""
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL
    store = await open_url(url, password=postgres_server.password)
    assert await store.get_lease_by_ip("10.0.0.42") == Lease("10.0.0.42", "52:54:00:00:00:42", 3600.0)
    node = await store.get_node("n0000")
    assert node is not None and node.ip == "10.0.0.42"
    await store.close()


# -- bootd store migrate ------------------------------------------------------------------------------------
async def fill_sqlite(path: Path) -> None:
    """A registry with something in every table: registered and hand-added nodes, vars, groups, leases,
    events (some trimmed), a disabled node, odd text."""
    store = SqliteNodeStore(path)
    await store.put_group(Group("gpu", capsule="rocky9-gpu", kernel_args="nvidia.modeset=0", description="ünï",
                                vars={"role": "gpu", "overlays": "hostname,hosts"}))
    for i in range(40):
        await register(store, i, now=1000.0 + i / 7)
    await store.add_node(mac(900), "login1", group="gpu", now=5.0, kernel_args="quiet 'x'", enabled=False)
    await store.set_vars("n0003", {"role": "gpu", "rack": "r1\nr2"})
    for i in range(205):
        await store.set_state("n0001", State.PXE if i % 2 else State.STAGE1, f"s{i}", now=2000.0 + i, detail="d")
    for i in range(0, 40, 3):
        await store.put_lease(Lease(f"10.1.0.{i + 10}", mac(i), 5000.5 + i, f"n{i:04d}" if i % 2 else None))
    await store.put_credential(Credential("n0002", "ab" * 32, 10.0, 99.0, "lease:10.1.0.12"))
    await store.note_pxe(mac(7), 30.0, "10.1.0.17")
    await store.delete_node("n0005")
    await store.close()


async def snapshot(store: NodeStore) -> list[object]:
    nodes = await store.list_nodes()
    return [nodes, await store.list_leases(), await store.list_groups(),
            [await store.events(n.name, limit=1000) for n in nodes]]


async def test_store_migrate_copies_every_row_and_refuses_a_full_target(
        postgres_server: PgServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "bootd.toml", {"server": {"state_dir": str(state)}})
    await fill_sqlite(state / "bootd.sqlite")
    url = postgres_server.url(postgres_server.new_database(), sslmode="disable")
    env = {"PGPASSWORD": postgres_server.password}

    proc = run_cli("store", "migrate", "--to", url, config=cfg, env=env)
    assert proc.returncode == 0, proc.stderr
    source = migrate.read_sqlite(state / "bootd.sqlite")
    for table, rows in source.items():  # progress, table by table
        assert f"store migrate: {table}: {len(rows)}/{len(rows)} rows" in proc.stderr
    assert len(source["nodes"]) == 40 and len(source["events"]) == 238
    assert "every row verified" in proc.stdout

    # Every row of every table, compared raw (ids included) ...
    conn = await postgres.connect(url, password=postgres_server.password)
    assert await migrate.read_postgres(conn) == source
    await conn.close()
    assert all(source.values())  # something in every table
    # ... and as the services see it.
    sq = SqliteNodeStore(state / "bootd.sqlite")
    pg = await open_url(url, password=postgres_server.password)
    assert await snapshot(pg) == await snapshot(sq)
    # New rows continue after the copied ids and names.
    assert await register(pg, 500) == await register(sq, 500) == "n0040"
    await pg.set_state("n0040", State.PXE, now=9.0)
    await sq.close()
    await pg.close()

    proc = run_cli("store", "migrate", "--to", url, config=cfg, env=env)
    assert proc.returncode == 1 and "already holds a node registry (41 nodes" in proc.stderr
    assert "--force" in proc.stderr
    proc = run_cli("store", "migrate", "--to", url, "--force", config=cfg, env=env)
    assert proc.returncode == 0 and "replaced what was there" in proc.stdout, proc.stderr
    conn = await postgres.connect(url, password=postgres_server.password)
    assert await migrate.read_postgres(conn) == migrate.read_sqlite(state / "bootd.sqlite")
    await conn.close()


async def test_max_nodes_caps_first_contacts_even_at_once(node_store: NodeStore) -> None:
    results = await asyncio.gather(*(node_store.register(mac(i), name_pattern="n{index:04d}", first_index=0,
                                                         group="default", approved=True, now=1.0, max_nodes=3)
                                     for i in range(6)), return_exceptions=True)
    assert sum(isinstance(r, tuple) for r in results) == 3
    assert all(isinstance(r, RegistryFull) and "registry.max_nodes = 3" in str(r)
               for r in results if not isinstance(r, tuple))
    assert len(await node_store.list_nodes()) == 3
    known = next(r for r in results if isinstance(r, tuple))[0]
    again, created = await node_store.register(known.mac, name_pattern="n{index:04d}", first_index=0,
                                               group="default", approved=True, now=2.0, max_nodes=3)
    assert again.name == known.name and not created  # a known node is never refused


async def test_register_many_and_put_leases_answer_a_dhcp_batch_slot_by_slot(node_store: NodeStore) -> None:
    # What one DHCP read batch asks in one trip each: every MAC's node in order (a hand-named node skipped, a MAC
    # twice registered once, the cap reached mid-batch refusing only the MACs past it), then every lease with a
    # refused one failing alone in its slot.
    await node_store.add_node(mac(99), "n0001", group="default", now=0.0)
    asks = [mac(1), mac(2), mac(1), mac(99), mac(3), mac(4)]
    got = await node_store.register_many(asks, name_pattern="n{index:04d}", first_index=0, group="default",
                                         approved=True, now=5.0, max_nodes=4)
    nodes = [r for r in got if isinstance(r, tuple)]
    assert [created for _, created in nodes] == [True, True, False, False, True]
    names = [node.name for node, _ in nodes]
    assert names[0] == names[2] and names[3] == "n0001" and len({names[0], names[1], names[4], "n0001"}) == 4
    assert isinstance(got[-1], RegistryFull) and "registry.max_nodes = 4" in str(got[-1])
    assert sorted(n.name for n in await node_store.list_nodes()) == ["n0000", "n0001", "n0002", "n0003"]
    assert [e.reason for e in await node_store.events(names[1])] == ["first contact"]
    await node_store.put_lease(Lease("10.0.2.1", mac(50), 1000.0), now=5.0)
    stored = await node_store.put_leases([Lease("10.0.2.2", mac(1), 1000.0, "a"), Lease("10.0.2.1", mac(2), 1000.0),
                                          Lease("10.0.2.3", mac(3), 1000.0)], now=6.0)
    assert stored[0] is None and stored[2] is None
    assert isinstance(stored[1], Conflict) and "leased to 52:54:00:00:00:32" in str(stored[1])
    leases = {x.ip: x.mac for x in await node_store.list_leases()}
    assert leases == {"10.0.2.1": mac(50), "10.0.2.2": mac(1), "10.0.2.3": mac(3)}
    assert (await node_store.get_node(names[0])).ip == "10.0.2.2"  # type: ignore[union-attr]
    # The common case, distinct clients and free addresses (SQLite: three statements for the batch); mac(1) moves.
    assert await node_store.put_leases([Lease("10.0.2.4", mac(1), 1000.0), Lease("10.0.2.5", mac(5), 1000.0)],
                                       now=7.0) == [None, None]
    leases = {x.ip: x.mac for x in await node_store.list_leases()}
    assert leases == {"10.0.2.1": mac(50), "10.0.2.3": mac(3), "10.0.2.4": mac(1), "10.0.2.5": mac(5)}
    assert (await node_store.get_node(names[0])).ip == "10.0.2.4"  # type: ignore[union-attr]
    # A renewal (mac(5) on its own address) is updated in place; mac(50)'s lease, expired by now, is taken over by
    # mac(3), which leaves its old address (SQLite: the batch's upsert trips on the address, then one by one).
    assert await node_store.put_leases([Lease("10.0.2.5", mac(5), 3000.0), Lease("10.0.2.1", mac(3), 3000.0)],
                                       now=2000.0) == [None, None]
    leases = {x.ip: (x.mac, x.expires) for x in await node_store.list_leases()}
    assert leases == {"10.0.2.1": (mac(3), 3000.0), "10.0.2.4": (mac(1), 1000.0), "10.0.2.5": (mac(5), 3000.0)}
    assert (await node_store.get_node(names[4])).ip == "10.0.2.1"  # type: ignore[union-attr]
    # A live lease of another MAC is still refused in a batch.
    stored = await node_store.put_leases([Lease("10.0.2.6", mac(6), 3000.0), Lease("10.0.2.5", mac(7), 3000.0)],
                                         now=2000.0)
    assert stored[0] is None and isinstance(stored[1], Conflict)
    # Several servers on one registry: a batch records which one gave each node its address.
    assert await node_store.put_leases([Lease("10.0.2.7", mac(1), 3000.0), Lease("10.0.2.8", mac(3), 3000.0)],
                                       now=2000.0, server="s1") == [None, None]
    for name, ip in ((names[0], "10.0.2.7"), (names[4], "10.0.2.8")):
        node = await node_store.get_node(name)
        assert node is not None and (node.ip, node.server) == (ip, "s1")
    with pytest.raises(NotFound, match="no group named 'nope'"):
        await node_store.register_many([mac(7)], name_pattern="n{index:04d}", first_index=0, group="nope",
                                       approved=True, now=7.0)


async def test_cli_and_serve_use_the_configured_postgresql(postgres_server: PgServer, tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text(postgres_server.password + "\n")
    url = postgres_server.new_schema_url()
    cfg = write_config(tmp_path / "bootd.toml", {"server": {"state_dir": str(tmp_path / "state")},
                                                 "store": {"url": url, "password_file": str(secret)}})
    run_cli("node", "add", "pg1", "--mac", mac(7), config=cfg, check=True)
    proc = run_cli("node", "list", "--json", config=cfg, check=True)
    assert "pg1" in proc.stdout
    store = await open_url(url, password=postgres_server.password)
    node = await store.get_node("pg1")
    assert node is not None and node.mac == mac(7)  # in PostgreSQL, not in a SQLite file
    await store.close()
    assert not (tmp_path / "state" / "bootd.sqlite").exists()

    # /healthz of a running `bootd serve` says when the database goes away, and when it is back.
    port = free_port()
    served = write_config(tmp_path / "serve.toml", {
        "server": {"state_dir": str(tmp_path / "state"), "address": "127.0.0.1"},
        "http": {"listen": "127.0.0.1", "port": port},
        "store": {"url": url, "password_file": str(secret), "retry_for": 1}})
    log = (tmp_path / "serve.log").open("w+")
    daemon = subprocess.Popen([sys.executable, "-m", "bootd", "-c", str(served), "serve"], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)

    def healthz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                answer = await asyncio.to_thread(healthz)
                break
            except OSError:
                await asyncio.sleep(0.2)
        assert answer == (200, "ok\n"), Path(log.name).read_text()
        postgres_server.stop()
        try:
            code, text = await asyncio.to_thread(healthz)
            assert code == 503 and f"registry unreachable: {url}" in text, text
        finally:
            postgres_server.start()
        assert await asyncio.to_thread(healthz) == (200, "ok\n")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
    assert "event=store_unreachable" in Path(log.name).read_text()

    # A database that cannot be reached stops `bootd serve` at once, naming the URL.
    gone = f"postgresql://bootd@/bootd?host={tmp_path}/nowhere"
    cfg = write_config(tmp_path / "gone.toml", {"server": {"state_dir": str(tmp_path / "state")},
                                                "http": {"listen": "127.0.0.1", "port": 0},
                                                "store": {"url": gone, "connect_timeout": 2}})
    proc = run_cli("serve", config=cfg)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot connect to the node registry at {gone}" in proc.stderr


async def test_bulk_add_is_one_transaction_and_names_the_conflicting_line(node_store: NodeStore) -> None:
    await node_store.add_node(mac(900), "taken", group="default", now=1.0)
    batch = [NewNode(line=i + 1, name=f"b{i}", mac=mac(i), group="default", ip=f"10.9.0.{i + 1}",
                     vars={"rack": "r9"}) for i in range(300)]
    clash = [*batch[:150], NewNode(line=151, name="taken", mac=mac(901), group="default"), *batch[150:]]
    with pytest.raises(Conflict, match="line 151"):
        await node_store.add_nodes(clash, now=2.0)
    assert [n.name for n in await node_store.list_nodes()] == ["taken"]  # nothing of the batch
    assert await node_store.add_nodes(batch, now=2.0) == 300
    got = await node_store.get_node("b7")
    assert got is not None and got.ip == "10.9.0.8" and got.vars == {"rack": "r9"}
    with pytest.raises(Conflict, match=r"line 1: address 10\.9\.0\.1"):
        await node_store.add_nodes([NewNode(line=1, name="x", mac=mac(950), group="default", ip="10.9.0.1")], now=3)
    renamed = await node_store.rename_node("b7", "rack9-u07")
    assert renamed.name == "rack9-u07" and renamed.vars == {"rack": "r9"} and await node_store.get_node("b7") is None
    with pytest.raises(Conflict, match="already exists"):
        await node_store.rename_node("b8", "rack9-u07")
