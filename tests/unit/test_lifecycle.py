"""The lifecycle table, driven row by row against the real (in-memory SQLite) store."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest

from bootd.config import RegistryConfig
from bootd.errors import StateChanged
from bootd.metrics import make_registry
from bootd.model import Machine, Node, State
from bootd.service.lifecycle import (
    CHAIN,
    NODE_REPORTABLE,
    TABLE,
    Actor,
    Lifecycle,
    TransitionRefused,
    allowed,
    timeout,
)
from bootd.service.registry import RegistryService
from bootd.store.base import NodeStore

S = State
CFG = RegistryConfig(stale_after=90.0, dead_after=300.0, pxe_timeout=120.0)


@pytest.fixture
async def life(node_store: NodeStore) -> AsyncIterator[Lifecycle]:
    """On both backends (``node_store``: SQLite and a real PostgreSQL)."""
    yield Lifecycle(node_store, CFG, make_registry())


async def new_node(life: Lifecycle, index: int) -> str:
    node = await RegistryService(life.store, CFG).resolve(Machine(f"52:54:00:00:{index >> 8:02x}:{index & 255:02x}"),
                                                          0.0)
    assert node is not None
    return node.name


async def test_every_row_and_every_illegal_transition(life: Lifecycle) -> None:
    """All actor x old x new combinations: exactly the table's rows are applied, the rest refused."""
    combos = list(itertools.product(Actor, State, State))
    applied = refused = 0
    for i, (actor, old, new) in enumerate(combos):
        name = await new_node(life, i)
        await life.change(name, old, "setup", actor=Actor.ADMIN, now=1.0)
        if allowed(actor, old, new):
            node = await life.change(name, new, "row", actor=actor, now=2.0)
            assert node.state is new
            applied += 1
        else:
            with pytest.raises(TransitionRefused) as info:
                await life.change(name, new, "not a row", actor=actor, now=2.0)
            assert f"from {old.value} to {new.value}" in str(info.value)
            stored = await life.store.get_node(name)
            assert stored is not None and stored.state is old  # nothing written
            refused += 1
    assert applied == sum(len(v) for v in TABLE.values())
    assert applied + refused == len(combos)
    counted = sum(s.value for m in life.metrics.refused.collect() for s in m.samples if s.name.endswith("_total"))
    assert counted == refused


async def test_the_decisions_that_matter() -> None:
    # Nobody on the LAN can knock a booting or running node out of its state.
    for state in (S.STAGE1, S.FETCHING, S.VERIFIED, S.BOOTED, S.READY, S.DISABLED):
        assert not allowed(Actor.FIRMWARE, state, S.PXE)
    for state in (S.DISCOVERED, S.FAILED, S.STALE, S.DEAD):
        assert allowed(Actor.FIRMWARE, state, S.PXE)
    # A node walks forwards, may skip a step whose report was lost, and starts over at stage1.
    assert allowed(Actor.NODE, S.PXE, S.FETCHING) and not allowed(Actor.NODE, S.READY, S.FETCHING)
    assert allowed(Actor.NODE, S.READY, S.STAGE1) and allowed(Actor.NODE, S.DEAD, S.READY)
    assert not any(allowed(Actor.NODE, S.DISABLED, new) for new in State)
    assert {S.STAGE1, S.FETCHING, S.VERIFIED, S.BOOTED, S.READY, S.FAILED} == NODE_REPORTABLE
    assert CHAIN[0] is S.DISCOVERED and CHAIN[-1] is S.READY
    # Only the monitor times out, and only into stale, dead or failed.
    assert {new for actor, new in TABLE if actor is Actor.MONITOR} == {S.STALE, S.DEAD, S.FAILED}


async def test_refusal_is_recorded_in_the_timeline_once_a_minute_and_counted(life: Lifecycle) -> None:
    name = await new_node(life, 1)
    await life.change(name, S.READY, actor=Actor.ADMIN, now=1.0)
    for t in (10.0, 20.0, 75.0):
        with pytest.raises(TransitionRefused):
            await life.change(name, S.PXE, "dhcp", actor=Actor.FIRMWARE, now=t)
    refusals = [e for e in await life.store.events(name) if e.state == "refused"]
    assert [e.ts for e in refusals] == [10.0, 75.0]
    assert "firmware asked ready -> pxe" in refusals[0].reason
    sample = life.metrics.refused.labels(actor="firmware", old="ready", new="pxe")
    assert sample._value.get() == 3


async def test_compare_and_set_loses_to_a_writer_in_between(life: Lifecycle) -> None:
    name = await new_node(life, 2)
    stale_copy = await life.store.get_node(name)
    assert stale_copy is not None and stale_copy.state is S.DISCOVERED
    await life.change(name, S.READY, actor=Actor.ADMIN, now=1.0)  # another process, in between
    with pytest.raises(StateChanged):
        await life.store.set_state(name, S.PXE, now=2.0, expect=S.DISCOVERED)
    # Through the lifecycle the write is retried against the fresh state, which the table refuses.
    with pytest.raises(TransitionRefused):
        await life.change(name, S.PXE, actor=Actor.FIRMWARE, now=2.0, node=stale_copy)
    node = await life.store.get_node(name)
    assert node is not None and node.state is S.READY
    assert life.metrics.lost._value.get() == 1


def node(state: State, *, since: float = 0.0, contact: float = 0.0) -> Node:
    return Node("52:54:00:00:00:01", "n0000", "default", state=state, state_since=since, last_contact=contact)


def test_timeouts_belong_to_the_table() -> None:
    # pxe: counted from entering pxe (firmware chatter is no progress) -> failed, with a reason.
    assert timeout(node(S.PXE, since=100.0, contact=500.0), 219.0, CFG) is None
    t = timeout(node(S.PXE, since=100.0, contact=500.0), 221.0, CFG)
    assert t is not None and t.new is S.FAILED and "never reported from the stage one" in t.reason
    # Booting states: progress (any report) resets the clock, so a long fetch is never timed out.
    assert timeout(node(S.FETCHING, since=0.0, contact=1000.0), 1080.0, CFG) is None
    t = timeout(node(S.FETCHING, since=0.0, contact=1000.0), 1091.0, CFG)
    assert t is not None and t.new is S.STALE
    t = timeout(node(S.READY, contact=0.0), 301.0, CFG)
    assert t is not None and t.new is S.DEAD
    # stale -> dead counts from when it became stale.
    assert timeout(node(S.STALE, since=100.0, contact=10.0), 309.0, CFG) is None
    t = timeout(node(S.STALE, since=100.0, contact=10.0), 311.0, CFG)
    assert t is not None and t.new is S.DEAD
    # At rest: no timer.  A restart of bootd counts silence from the monitor's start.
    for state in (S.DISCOVERED, S.FAILED, S.DEAD, S.DISABLED):
        assert timeout(node(state), 10**9, CFG) is None
    assert timeout(node(S.READY, contact=0.0), 86400.0 + 50, CFG, since=86400.0) is None
    assert timeout(node(S.PXE, since=0.0), 10**6, RegistryConfig(pxe_timeout=0)) is None


async def test_sweep_fails_a_node_stuck_in_pxe(life: Lifecycle) -> None:
    name = await new_node(life, 3)
    await life.change(name, S.PXE, "dhcp", actor=Actor.FIRMWARE, now=10.0)
    # Firmware chatter while in pxe does not reset its clock.
    await life.change(name, S.PXE, "script", actor=Actor.FIRMWARE, now=100.0)
    assert await life.sweep(129.0) == []
    [step] = await life.sweep(131.0)
    assert (step.old, step.new) == (S.PXE, S.FAILED)
    stored = await life.store.get_node(name)
    assert stored is not None and stored.state is S.FAILED and "stage one" in stored.reason


async def test_heartbeat_usage_is_kept_per_node_bounded_and_forgotten_on_a_new_boot(
        life: Lifecycle, monkeypatch: pytest.MonkeyPatch) -> None:
    from bootd.service import lifecycle

    monkeypatch.setattr(lifecycle, "MAX_USAGE", 2)
    a, b, c = [await new_node(life, 900 + i) for i in range(3)]
    for name in (a, b, c):
        await life.change(name, S.BOOTED, "", actor=Actor.NODE, now=1.0)
    node = await life.heartbeat(a, 2.0, b'{"image_ram_kb": 5, "mem_used_kb": 7}')
    assert node.state is S.READY  # booted -> ready by the heartbeat, and its report kept all the same
    assert life.usage(a) == {"image_ram_kb": 5, "mem_used_kb": 7, "at": 2.0}
    await life.heartbeat(b, 3.0, b'{"image_ram_kb": 6}')
    node = await life.heartbeat(c, 4.0, b'{"image_ram_kb": 8}')
    assert life.usage(c) is None and node.state is S.READY  # bounded: a third node's report is not kept
    await life.heartbeat(a, 5.0, b'{"image_ram_kb": 9}')  # a node already kept is still updated
    assert life.usage(a) == {"image_ram_kb": 9, "at": 5.0}
    await life.heartbeat(a, 6.0)  # no body (an old agent): the last report stays, with its time
    assert life.usage(a) == {"image_ram_kb": 9, "at": 5.0}
    await life.change(a, S.DEAD, "", actor=Actor.MONITOR, now=7.0)
    assert life.usage(a) is not None  # what it used when it went silent is still worth showing
    await life.change(a, S.PXE, "", actor=Actor.FIRMWARE, now=8.0)
    assert life.usage(a) is None  # a new boot: the old figures are not this boot's
    await life.change(b, S.DISABLED, "", actor=Actor.ADMIN, now=9.0)
    with pytest.raises(TransitionRefused):
        await life.heartbeat(b, 10.0, b'{"image_ram_kb": 1}')
    assert life.usage(b) == {"image_ram_kb": 6, "at": 3.0}  # a refused heartbeat reports nothing
