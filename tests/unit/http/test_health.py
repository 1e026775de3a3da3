"""Heartbeat monitor with a fake clock and the real (in-memory SQLite) store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bootd.config import RegistryConfig
from bootd.metrics import make_registry
from bootd.model import Machine, State
from bootd.service.health import HealthMonitor
from bootd.service.lifecycle import Actor, Lifecycle
from bootd.service.registry import RegistryService
from bootd.store.base import NodeStore
from bootd.store.memory import memory_store

CFG = RegistryConfig(stale_after=90.0, dead_after=300.0)


class Registry:
    """The registry plus the lifecycle these tests drive (states set by the administrator)."""

    def __init__(self, store: NodeStore) -> None:
        self.store = store
        self.resolve = RegistryService(store, CFG).resolve
        self.lifecycle = Lifecycle(self.store, CFG, make_registry())

    async def report(self, name: str, state: State, *, now: float) -> None:
        await self.lifecycle.change(name, state, actor=Actor.ADMIN, now=now)

    async def heartbeat(self, name: str, now: float):  # type: ignore[no-untyped-def]
        return await self.lifecycle.heartbeat(name, now)


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    store = memory_store()
    try:
        yield Registry(store)
    finally:
        await store.close()


async def test_ready_node_goes_stale_then_dead_then_back(registry: Registry) -> None:
    clock = [1000.0]
    mon = HealthMonitor(registry.lifecycle, clock=lambda: clock[0])
    node = await registry.resolve(Machine("52:54:00:00:00:01"), 1000.0)
    assert node is not None
    await registry.report(node.name, State.READY, now=1000.0)
    assert await mon.check(1089.0) == []
    [t] = await mon.check(1091.0)
    assert (t.old, t.new) == (State.READY, State.STALE)
    assert await mon.check(1200.0) == []
    [t] = await mon.check(1301.0)
    assert t.new is State.DEAD and "no contact" in t.reason
    assert await mon.check(5000.0) == []
    n = await registry.heartbeat(node.name, 5001.0)
    assert n.state is State.READY


async def test_untouched_states_and_restart_grace(registry: Registry) -> None:
    node = await registry.resolve(Machine("52:54:00:00:00:02"), 0.0)
    assert node is not None
    busy = await registry.resolve(Machine("52:54:00:00:00:03"), 0.0)
    assert busy is not None
    await registry.report(busy.name, State.FETCHING, now=0.0)
    # bootd was down for a day: the monitor starts now, nobody is declared dead at once.
    mon = HealthMonitor(registry.lifecycle, clock=lambda: 86400.0)
    assert await mon.check(86400.0) == []
    steps = await mon.check(86400.0 + 91)
    assert [(s.name, s.new) for s in steps] == [(busy.name, State.STALE)]  # discovered is not watched
    assert mon.interval() == 9.0


async def test_heartbeat_between_list_and_write_wins(registry: Registry) -> None:
    node = await registry.resolve(Machine("52:54:00:00:00:04"), 0.0)
    assert node is not None
    await registry.report(node.name, State.READY, now=0.0)
    mon = HealthMonitor(registry.lifecycle, clock=lambda: 0.0)
    store = registry.store
    real_list = store.list_nodes

    async def list_then_beat() -> list:  # type: ignore[type-arg]
        nodes = await real_list()
        await registry.heartbeat(node.name, 95.0)
        return nodes

    store.list_nodes = list_then_beat  # type: ignore[method-assign]
    assert await mon.check(100.0) == []
    n = await registry.store.get_node(node.name)
    assert n is not None and n.state is State.READY


async def test_one_server_at_a_time_sweeps_a_shared_registry(registry: Registry) -> None:
    """Two servers' monitors on one registry: the holder of the sweep lock sweeps; when it stops renewing
    (dead), the other takes the lock once it has expired."""
    from bootd import config as config_mod
    from bootd.service.servers import Cluster

    node = await registry.resolve(Machine("52:54:00:00:00:05"), 1000.0)
    assert node is not None
    await registry.report(node.name, State.READY, now=1000.0)
    clusters = [Cluster(registry.store, config_mod.from_dict({"cluster": {"id": ident}})) for ident in ("a", "b")]
    a, b = (HealthMonitor(registry.lifecycle, clock=lambda: 0.0, lead=c.lead) for c in clusters)
    a.started = b.started = 0.0
    assert await a.tick(1050.0) == []  # a holds the lock: it swept (nothing due yet)
    assert await b.tick(1051.0) is None  # b does not sweep while a holds it
    [t] = await a.tick(1095.0)
    assert t.new is State.STALE
    assert await b.tick(1096.0) is None
    # a dies: its lock (held max(3 x interval, 10 s) = 27 s) expires, and b sweeps from then on.
    assert await b.tick(1095.0 + 27.5) is not None
    assert await a.tick(1125.0) is None
