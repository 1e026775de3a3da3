"""The status page's event bus (bounded per subscriber) and its sessions (bounded, expiring, CSRF)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bootd.config import AdminConfig, Config, ServerConfig
from bootd.service.credentials import Credentials
from bootd.service.events import RESYNC_LIMIT, EventBus, TooManySubscribers, progress_update
from bootd.service.sessions import Refused, Sessions
from bootd.store.memory import memory_store


def state(name: str, s: str = "pxe") -> dict[str, object]:
    return {"t": "state", "node": name, "state": s}


def test_updates_arrive_in_order_and_progress_coalesces() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish(state("a", "stage1"))
    bus.publish(state("a", "fetching"))
    for done in range(1, 50):
        bus.publish(progress_update("a", f'{{"done": {done}, "total": 50}}', float(done)))
    bus.publish({"t": "contact", "node": "b", "contact": 1.0})
    bus.publish({"t": "contact", "node": "b", "contact": 2.0})
    got = sub.take()
    assert [(u["t"], u.get("state"), u.get("done"), u.get("contact")) for u in got] == [
        ("state", "stage1", None, None), ("state", "fetching", None, None), ("progress", None, 49, 49.0),
        ("contact", None, None, 2.0)]
    assert sub.take() == []
    assert bus.progress["a"]["done"] == 49
    bus.publish(state("a", "verified"))
    assert "a" not in bus.progress  # a finished fetch leaves nothing behind


def test_a_slow_subscriber_is_resynced_then_dropped_never_grows() -> None:
    now = [0.0]
    bus = EventBus(queue_size=100, clock=lambda: now[0])
    slow, fast = bus.subscribe(), bus.subscribe()
    for i in range(150):
        bus.publish(state(f"n{i}"))
        fast.take()
        assert len(slow.pending) <= 100
    assert slow.take_resync() and not slow.take_resync()  # told once
    assert not slow.pending  # dropped, not kept: the snapshot it fetches has all of it
    assert not fast.resync and not fast.closed
    for _ in range(RESYNC_LIMIT):
        for i in range(101):
            bus.publish(state(f"n{i}"))
        now[0] += 1
        slow.take_resync()
    assert slow.closed and bus.dropped == 1 and not fast.closed
    bus.publish(state("x"))
    assert len(slow.pending) == 0  # a closed subscriber holds nothing


def test_resyncs_spread_over_time_do_not_drop() -> None:
    now = [0.0]
    bus = EventBus(queue_size=10, clock=lambda: now[0])
    sub = bus.subscribe()
    for _ in range(RESYNC_LIMIT * 3):
        for i in range(11):
            bus.publish(state(f"n{i}"))
        assert sub.take_resync()
        now[0] += 61
    assert not sub.closed


def test_subscribers_are_bounded() -> None:
    bus = EventBus(max_subscribers=2)
    a, _ = bus.subscribe(), bus.subscribe()
    with pytest.raises(TooManySubscribers, match="the most it serves"):
        bus.subscribe()
    bus.unsubscribe(a)
    bus.subscribe()


async def test_wait_wakes_on_publish_and_on_close() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.create_task(sub.wait(5))
    await asyncio.sleep(0.01)
    bus.publish(state("a"))
    await asyncio.wait_for(waiter, 1)
    sub.take()
    waiter = asyncio.create_task(sub.wait(5))
    await asyncio.sleep(0.01)
    bus.close()
    await asyncio.wait_for(waiter, 1)
    assert sub.closed


def test_progress_update_keeps_only_numbers() -> None:
    u = progress_update("a", '{"done": 1, "total": 2, "bytes": "lots", "mem_used_kb": 5}', 3.0)
    assert u == {"t": "progress", "node": "a", "contact": 3.0, "done": 1, "total": 2}
    assert progress_update("a", "{not json", 1.0) == {"t": "progress", "node": "a", "contact": 1.0}


# -- sessions ------------------------------------------------------------------------------------------
def sessions(tmp_path: Path, *, idle: float = 100.0, most: int = 3, viewer: bool = True) -> tuple[Sessions, list[float],
                                                                                                 str, str]:
    config = Config(server=ServerConfig(state_dir=tmp_path),
                    admin=AdminConfig(session_idle=idle, max_sessions=most, viewer=viewer))
    creds = Credentials(memory_store(), config)
    creds.load()
    now = [0.0]
    admin = (tmp_path / "admin-token").read_text()
    view = (tmp_path / "viewer-token").read_text() if viewer else ""
    return Sessions(creds, config.admin, clock=lambda: now[0]), now, admin, view


def test_login_roles_and_csrf(tmp_path: Path) -> None:
    s, _, admin, viewer = sessions(tmp_path)
    with pytest.raises(Refused, match="wrong credential"):
        s.login("nope")
    with pytest.raises(Refused):
        s.login("")
    a = s.login(admin)
    v = s.login(viewer)
    assert (a.role, v.role) == ("admin", "viewer") and a.id != v.id and a.csrf != v.csrf
    assert s.authorize_action(a.id, a.csrf) is a
    for sid, csrf in ((a.id, None), (a.id, v.csrf), (a.id, a.csrf[:-1]), (None, a.csrf), ("forged", a.csrf)):
        with pytest.raises(Refused) as exc:
            s.authorize_action(sid, csrf)
        assert exc.value.status in (401, 403)
    with pytest.raises(Refused, match="may look, not act") as exc:
        s.authorize_action(v.id, v.csrf)
    assert exc.value.status == 403
    assert s.check_csrf(v.id, v.csrf) is v  # a viewer may log itself out
    s.logout(a.id)
    with pytest.raises(Refused, match="not logged in"):
        s.get(a.id)


def test_sessions_expire_when_idle(tmp_path: Path) -> None:
    s, now, admin, _ = sessions(tmp_path, idle=100.0)
    a = s.login(admin)
    now[0] = 90.0
    s.get(a.id)  # use restarts the idle time
    now[0] = 180.0
    assert s.get(a.id) is a
    now[0] = 280.0
    with pytest.raises(Refused, match="expired"):
        s.get(a.id)
    assert len(s) == 0


def test_sessions_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    s, now, admin, _ = sessions(tmp_path, most=3)
    first = [s.login(admin) for _ in range(3)]
    now[0] = 1.0
    s.get(first[0].id)  # the oldest is the most recently used now
    s.login(admin)
    assert len(s) == 3
    s.get(first[0].id)
    with pytest.raises(Refused):
        s.get(first[1].id)


def test_no_viewer_credential_when_disabled(tmp_path: Path) -> None:
    s, _, admin, _ = sessions(tmp_path, viewer=False)
    assert not (tmp_path / "viewer-token").exists()
    assert s.login(admin).role == "admin"
    with pytest.raises(Refused):
        s.login("0" * 64)


# -- the snapshot route ----------------------------------------------------------------------------------
async def test_concurrent_snapshots_share_one_store_read(tmp_path: Path) -> None:
    """Pages asking at once (wall screens resyncing in a storm) cost one read of the registry, not one each."""
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from bootd.compose import services
    from bootd.net.http.status import StatusPage

    config = Config(server=ServerConfig(state_dir=tmp_path))
    store, svc = services(config, store=memory_store())
    for i in range(3):
        await store.add_node(f"52:54:00:00:00:0{i}", f"n{i}", group="default", now=1.0)
    reads = 0
    real = store.list_nodes

    async def counted() -> list[Any]:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.3)  # a slow read: every request below arrives while it runs
        return await real()

    store.list_nodes = counted  # type: ignore[method-assign]
    svc.credentials.load()
    page = StatusPage(config, svc)
    app = web.Application()
    page.register(app)
    async with TestServer(app) as server, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(server.make_url("/status/api/login"),
                          json={"token": (tmp_path / "admin-token").read_text()}) as r:
            assert r.status == 200

        async def snapshot() -> list[str]:
            async with s.get(server.make_url("/status/api/nodes")) as r:
                return [row[0] for row in (await r.json())["rows"]]

        got = await asyncio.gather(*(snapshot() for _ in range(8)))
        assert got == [["n0", "n1", "n2"]] * 8
        assert reads == 1
        assert await snapshot() == ["n0", "n1", "n2"]  # a later request reads again
        assert reads == 2
    await store.close()


async def test_the_lifecycle_publishes_changes_contacts_timeouts_and_progress() -> None:
    """What feeds the page: every state change, heartbeat and timeout; progress on the bus only."""
    from bootd.config import RegistryConfig
    from bootd.metrics import make_registry
    from bootd.model import State
    from bootd.service.lifecycle import Actor, Lifecycle

    store = memory_store()
    bus = EventBus()
    sub = bus.subscribe()
    life = Lifecycle(store, RegistryConfig(stale_after=90.0, dead_after=300.0), make_registry(), events=bus)
    await store.add_node("52:54:00:00:00:01", "n1", group="default", now=0.0)
    await life.change("n1", State.STAGE1, actor=Actor.NODE, now=1.0)
    await life.change("n1", State.FETCHING, actor=Actor.NODE, now=2.0, detail='{"done": 0, "total": 4}')
    await life.change("n1", State.FETCHING, actor=Actor.NODE, now=3.0, detail='{"done": 2, "total": 4, '
                                                                                '"bytes": 20, "bytes_total": 40}')
    got = sub.take()
    assert [(u["t"], u.get("state"), u.get("done")) for u in got] == [
        ("state", "stage1", None), ("state", "fetching", None), ("progress", None, 2)]
    assert got[-1]["bytes"] == 20 and got[-1]["contact"] == 3.0
    # The progress report is no row of the timeline; it is a contact (timeouts count from it).
    assert [e.state for e in await store.events("n1")] == ["stage1", "fetching"]
    node = await store.get_node("n1")
    assert node is not None and node.last_contact == 3.0 and node.state is State.FETCHING
    await life.change("n1", State.BOOTED, actor=Actor.NODE, now=4.0)
    await life.heartbeat("n1", 5.0)  # booted -> ready
    await life.heartbeat("n1", 6.0)  # a contact
    assert [(u["t"], u.get("state")) for u in sub.take()] == [("state", "booted"), ("state", "ready"),
                                                             ("contact", None)]
    assert "n1" not in bus.progress
    await life.sweep(6.0 + 95.0)
    [u] = sub.take()
    assert (u["t"], u["state"], u["reason"]) == ("state", "stale", "no contact for 95 s")
    await store.close()
