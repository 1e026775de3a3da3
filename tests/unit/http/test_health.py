"""Heartbeat monitor with a fake clock and the real (in-memory SQLite) store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bootd.config import RegistryConfig
from bootd.model import Machine, State
from bootd.service.health import HealthMonitor
from bootd.service.registry import RegistryService
from bootd.store.memory import memory_store

CFG = RegistryConfig(stale_after=90.0, dead_after=300.0)


@pytest.fixture
async def registry() -> AsyncIterator[RegistryService]:
    store = memory_store()
    try:
        yield RegistryService(store, CFG)
    finally:
        await store.close()


async def test_ready_node_goes_stale_then_dead_then_back(registry: RegistryService) -> None:
    clock = [1000.0]
    mon = HealthMonitor(registry, CFG, clock=lambda: clock[0])
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


async def test_untouched_states_and_restart_grace(registry: RegistryService) -> None:
    node = await registry.resolve(Machine("52:54:00:00:00:02"), 0.0)
    assert node is not None
    busy = await registry.resolve(Machine("52:54:00:00:00:03"), 0.0)
    assert busy is not None
    await registry.report(busy.name, State.FETCHING, now=0.0)
    # bootd was down for a day: the monitor starts now, nobody is declared dead at once.
    mon = HealthMonitor(registry, CFG, clock=lambda: 86400.0)
    assert await mon.check(86400.0) == []
    steps = await mon.check(86400.0 + 91)
    assert [(s.name, s.new) for s in steps] == [(busy.name, State.STALE)]  # discovered is not watched
    assert mon.interval() == 9.0


async def test_heartbeat_between_list_and_write_wins(registry: RegistryService) -> None:
    node = await registry.resolve(Machine("52:54:00:00:00:04"), 0.0)
    assert node is not None
    await registry.report(node.name, State.READY, now=0.0)
    mon = HealthMonitor(registry, CFG, clock=lambda: 0.0)
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
