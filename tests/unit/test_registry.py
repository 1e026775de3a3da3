"""The node registry: migrations, race-free registration, restarts, groups, refusals.

Tests taking ``node_store`` or ``store_target`` run twice: on SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from bootd.config import RegistryConfig
from bootd.errors import Conflict, NotFound, StoreError
from bootd.metrics import make_registry
from bootd.model import Firmware, Group, Lease, Machine, State
from bootd.service.lifecycle import Actor, Lifecycle
from bootd.service.registry import RegistryService
from bootd.store import sqlite as sqlite_store
from bootd.store.base import NodeStore
from bootd.store.broken import BrokenStore
from bootd.store.sqlite import SqliteRepo
from tests.conftest import StoreTarget


def mac(i: int) -> str:
    return f"52:54:00:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


async def dump(store: NodeStore) -> list[object]:
    """Everything a restart must keep, backend-neutral, for before/after comparisons."""
    nodes = await store.list_nodes()
    return [nodes, await store.list_leases(), await store.list_groups(),
            {n.name: await store.events(n.name) for n in nodes}]


def test_migrations_upgrade_an_old_database_and_keep_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(sqlite_store.MIGRATIONS[0])
    db.execute("PRAGMA user_version = 1")
    db.execute("INSERT INTO groups(name) VALUES ('default')")
    db.execute("INSERT INTO nodes(mac, name, idx, grp, state, state_since, first_contact, last_contact)"
               " VALUES ('52:54:00:00:00:01', 'n0000', 0, 'default', 'ready', 1, 1, 1)")
    db.commit()
    db.close()
    repo = SqliteRepo(path)
    assert repo.schema_version() == sqlite_store.SCHEMA_VERSION == 5
    node = repo.get_node("n0000")
    assert node is not None and node.state == State.READY
    repo.set_state("n0000", State.STALE, "no heartbeat", now=5.0)
    assert [e.state for e in repo.events("n0000")] == ["stale"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="newer than this bootd"):
        SqliteRepo(path)


async def test_500_concurrent_first_contacts_get_500_distinct_names(store_target: StoreTarget) -> None:
    store = await store_target.open()
    service = RegistryService(store, RegistryConfig())
    machines = [Machine(mac(i), firmware=Firmware.BIOS) for i in range(500)]
    nodes = await asyncio.gather(*(service.resolve(m, now=1.0) for m in machines))
    names = [n.name for n in nodes if n is not None]
    assert len(names) == 500 and len(set(names)) == 500
    assert sorted(names) == [f"n{i:04d}" for i in range(500)]
    # A repeated contact, again all at once, never makes a second node.
    again = await asyncio.gather(*(service.resolve(m, now=2.0) for m in reversed(machines)))
    assert {n.name for n in again if n} == set(names)
    assert len(await store.list_nodes()) == 500
    await store.close()


async def test_restart_keeps_every_node_and_lease(store_target: StoreTarget) -> None:
    store = await store_target.open()
    service = RegistryService(store, RegistryConfig(name_pattern="c{index:03d}", first_index=7))
    for i in range(20):
        await service.resolve(Machine(mac(i)), now=float(i))
    await store.put_lease(Lease("10.0.0.5", mac(3), expires=100.0))
    await store.set_vars("c010", {"role": "gpu"})
    before = await dump(store)
    await store.close()

    store = await store_target.open()
    assert await dump(store) == before
    node = await store.get_node_by_mac(mac(3))
    assert node is not None and node.name == "c010" and node.ip == "10.0.0.5" and node.vars == {"role": "gpu"}
    # Numbering continues after the highest index, never reusing a name.
    new, created = await store.register(mac(99), name_pattern="c{index:03d}", first_index=7, group="default",
                                        approved=True, now=50.0)
    assert created and new.name == "c027"
    await store.close()


async def test_pattern_skips_names_taken_by_hand(node_store: NodeStore) -> None:
    store = node_store
    await store.add_node(mac(1), "n0000", group="default", now=0.0)
    node, created = await store.register(mac(2), name_pattern="n{index:04d}", first_index=0, group="default",
                                         approved=True, now=1.0)
    assert created and node.name == "n0001"
    with pytest.raises(Conflict, match="already registered as n0000"):
        await store.add_node(mac(1), "other", group="default", now=2.0)
    with pytest.raises(Conflict, match="already exists"):
        await store.add_node(mac(3), "n0001", group="default", now=2.0)
    await store.close()


async def test_groups_give_defaults_that_nodes_override(node_store: NodeStore) -> None:
    store = node_store
    service = RegistryService(store, RegistryConfig())
    await store.put_group(Group("gpu", capsule="rocky9-gpu", kernel_args="nvidia.modeset=0"))
    await store.add_node(mac(1), "g001", group="gpu", now=0.0)
    await store.add_node(mac(2), "g002", group="gpu", now=0.0, capsule="rocky9-test", kernel_args="debug")
    n1, n2 = await store.get_node("g001"), await store.get_node("g002")
    assert n1 is not None and n2 is not None
    gpu = await store.get_group("gpu")  # read once with the node by decide(); passed in here
    assert service.boot_target(n1, gpu) == ("rocky9-gpu", "nvidia.modeset=0")
    assert service.boot_target(n2, gpu) == ("rocky9-test", "nvidia.modeset=0 debug")
    with pytest.raises(Conflict, match="still has 2 node"):
        await store.delete_group("gpu")
    with pytest.raises(NotFound, match="bootd group add"):
        await store.add_node(mac(3), "x", group="nope", now=0.0)
    await store.close()


async def test_refusals_say_why(node_store: NodeStore) -> None:
    store = node_store
    off = RegistryService(store, RegistryConfig(auto_register=False))
    result = await off.decide(Machine(mac(1)), now=0.0)
    assert result.node is None and "auto_register is off" in result.reason
    assert await store.list_nodes() == []

    approve = RegistryService(store, RegistryConfig(approve_first=True))
    result = await approve.decide(Machine(mac(2)), now=0.0)
    assert result.node is None and result.created and "waits for approval" in result.reason
    await store.update_node("n0000", approved=True)
    assert (await approve.decide(Machine(mac(2)), now=1.0)).node is not None

    await store.update_node("n0000", enabled=False)
    result = await approve.decide(Machine(mac(2)), now=2.0)
    assert result.node is None and "disabled" in result.reason
    await store.close()


async def test_lifecycle_reports_and_heartbeats(node_store: NodeStore) -> None:
    store = node_store
    service = RegistryService(store, RegistryConfig())
    lifecycle = Lifecycle(store, RegistryConfig(), make_registry())
    node = await service.resolve(Machine(mac(1)), now=0.0)
    assert node is not None and node.state == State.DISCOVERED
    await lifecycle.change(node.name, State.PXE, actor=Actor.FIRMWARE, now=1.0)
    for i, state in enumerate([State.STAGE1, State.FETCHING, State.VERIFIED, State.BOOTED]):
        await lifecycle.change(node.name, state, actor=Actor.NODE, now=float(i + 2))
    node = await lifecycle.heartbeat(node.name, now=10.0)
    assert node.state == State.READY
    events = [e.state for e in await store.events(node.name)]
    assert events == ["discovered", "pxe", "stage1", "fetching", "verified", "booted", "ready"]
    with pytest.raises(NotFound):
        await lifecycle.heartbeat("nobody", now=11.0)
    await store.close()


async def test_store_faults_surface_as_store_errors(node_store: NodeStore) -> None:
    inner = node_store
    store = BrokenStore(inner, fail={"register_many"})
    service = RegistryService(store, RegistryConfig())
    with pytest.raises(StoreError, match="injected"):
        await service.resolve(Machine(mac(1)), now=0.0)
    assert await inner.list_nodes() == []
    await inner.close()


async def test_leases_one_per_mac_and_per_address(node_store: NodeStore) -> None:
    store = node_store
    await store.put_lease(Lease("10.0.0.10", mac(1), 10.0))
    await store.put_lease(Lease("10.0.0.11", mac(1), 20.0))
    await store.put_lease(Lease("10.0.0.11", mac(2), 30.0))
    assert [(x.ip, x.mac) for x in await store.list_leases()] == [("10.0.0.11", mac(2))]
    assert await store.get_lease_by_mac(mac(2)) == Lease("10.0.0.11", mac(2), 30.0)
    assert await store.get_lease_by_ip("10.0.0.10") is None
    await store.release_lease("10.0.0.11")
    assert await store.list_leases() == []


async def test_registration_rate_limit_refuses_with_a_reason_then_recovers(node_store: NodeStore) -> None:
    store = node_store
    service = RegistryService(store, RegistryConfig(register_rate=2.0, register_burst=3))
    results = [await service.decide(Machine(mac(i)), now=100.0) for i in range(5)]
    assert [r.node is not None for r in results] == [True, True, True, False, False]
    assert "registration rate limit" in results[3].reason
    assert len(await store.list_nodes()) == 3
    # Known nodes are never limited; after half a second one more unknown MAC may register.
    assert (await service.decide(Machine(mac(0)), now=100.1)).node is not None
    assert (await service.decide(Machine(mac(3)), now=100.6)).node is not None
    assert (await service.decide(Machine(mac(4)), now=100.6)).node is None
    await store.close()


async def test_rate_limit_holds_under_concurrent_first_contacts(node_store: NodeStore) -> None:
    store = node_store
    service = RegistryService(store, RegistryConfig(register_rate=1.0, register_burst=10))
    results = await asyncio.gather(*(service.decide(Machine(mac(i)), now=5.0) for i in range(100)))
    assert sum(r.node is not None for r in results) == 10
    assert len(await store.list_nodes()) == 10
    await store.close()
