"""The status page against a real `bootd serve`: login, cookie flags, CSRF, the viewer, the event stream."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.statusd import Daemon, node_name, node_token, status_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with status_daemon(tmp_path_factory.mktemp("status"), 20, unapproved=2) as d:
        yield d


async def login(session: aiohttp.ClientSession, d: Daemon, token: str) -> tuple[str, aiohttp.ClientResponse]:
    async with session.post(d.admin + "/status/api/login", json={"token": token}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["csrf"], r


async def node_event(d: Daemon, i: int, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as s, s.post(f"{d.public}/api/v1/nodes/{node_name(i)}/events", json=body,
                                                    headers={"X-Bootd-Token": node_token(i)}) as r:
        return r.status


class Stream:
    """An SSE reader: the updates of each `data:` message, the names of `event:` lines."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.events: list[str] = []

    async def next(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        event = ""
        while True:
            line = (await asyncio.wait_for(self.resp.content.readline(), max(0.01, deadline - time.monotonic())))
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: "):
                if event:
                    self.events.append(event)
                    event = ""
                    continue
                return list(json.loads(text[6:]))

    async def until(self, pred: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for u in await self.next(deadline - time.monotonic()):
                if pred(u):
                    return u


@pytest.fixture
async def admin_session(daemon: Daemon) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        csrf, _ = await login(s, daemon, daemon.admin_token)
        yield s, csrf


async def test_page_and_assets_come_from_bootd_with_a_strict_policy(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(daemon.admin + "/status") as r:
            assert r.status == 200
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "http://" not in html and "https://" not in html  # no CDN
        for asset in ("status.js", "status.css"):
            assert f"/status/static/{asset}" in html
            async with s.get(f"{daemon.admin}/status/static/{asset}") as r:
                assert r.status == 200 and len(await r.read()) > 1000
        async with s.get(daemon.admin + "/status/static/../bootd.toml") as r:
            assert r.status == 404
        # The node-facing listener does not serve the page; it says where it is.
        async with s.get(daemon.public + "/status") as r:
            assert r.status == 404 and "admin API is not served on this listener" in await r.text()


async def test_login_cookie_flags_and_refusals(daemon: Daemon) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(daemon.admin + "/status/api/nodes") as r:
            assert r.status == 401 and "log in" in await r.text()
        async with s.post(daemon.admin + "/status/api/login", json={"token": "0" * 64}) as r:
            assert r.status == 401 and "wrong credential" in await r.text()
        async with s.post(daemon.admin + "/status/api/login", data=f"token={daemon.admin_token}",
                          headers={"Content-Type": "application/x-www-form-urlencoded"}) as r:
            assert r.status == 415  # a cross-site form cannot log a browser in
        csrf, r = await login(s, daemon, daemon.admin_token)
        cookie = r.headers["Set-Cookie"]
        assert cookie.startswith("bootd_session=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/status" in cookie
        assert daemon.admin_token not in cookie
        async with s.get(daemon.admin + "/status/api/session") as r:
            assert await r.json() == {"role": "admin", "csrf": csrf}
        async with s.get(daemon.admin + "/status/api/nodes") as r:
            snap = await r.json()
            assert r.headers.get("Content-Encoding") in (None, "gzip", "deflate")
        assert [row[0] for row in snap["rows"]] == [node_name(i) for i in range(20)]
        assert snap["columns"][:3] == ["name", "group", "state"]
        async with s.get(daemon.admin + "/status/api/hostlist", params={"expr": "n[0001-0003]"}) as r:
            assert (await r.json())["names"] == ["n0001", "n0002", "n0003"]
        async with s.get(daemon.admin + "/status/api/hostlist", params={"expr": "n[0001-"}) as r:
            assert r.status == 400 and "bad hostlist" in await r.text()
        # Logging out needs the CSRF token too; afterwards the cookie is worth nothing.
        async with s.post(daemon.admin + "/status/api/logout") as r:
            assert r.status == 403
        async with s.post(daemon.admin + "/status/api/logout", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
    async with aiohttp.ClientSession(cookies={"bootd_session": "forged"}) as s, \
            s.get(daemon.admin + "/status/api/nodes") as r:
        assert r.status == 401


async def test_actions_need_the_csrf_token(daemon: Daemon, admin_session: tuple[aiohttp.ClientSession, str]) -> None:
    s, csrf = admin_session
    url = f"{daemon.admin}/status/api/nodes/{node_name(0)}/approve"
    async with s.post(url, json={}) as r:
        assert r.status == 403 and "X-CSRF-Token" in await r.text()
    async with s.post(url, json={}, headers={"X-CSRF-Token": "x" * 43}) as r:
        assert r.status == 403
    async with s.post(url, json={}, headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"}) as r:
        assert r.status == 403 and "another origin" in await r.text()
    async with s.get(f"{daemon.admin}/status/api/nodes/{node_name(0)}/timeline") as r:
        assert (await r.json())["node"]["approved"] is False
    async with s.post(url, json={}, headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["approved"] is True
    audit = (daemon.config.parent / "state" / "audit.log").read_text().splitlines()
    assert any(json.loads(x)["target"] == node_name(0) and json.loads(x)["who"].startswith("status:") for x in audit)


async def test_viewer_sees_but_cannot_act(daemon: Daemon) -> None:
    path = daemon.config.parent / "state" / "viewer-token"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        csrf, _ = await login(s, daemon, daemon.viewer_token)
        async with s.get(daemon.admin + "/status/api/session") as r:
            assert (await r.json())["role"] == "viewer"
        async with s.get(daemon.admin + "/status/api/nodes") as r:
            assert r.status == 200 and len((await r.json())["rows"]) == 20
        async with s.post(f"{daemon.admin}/status/api/nodes/{node_name(1)}/approve", json={},
                          headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 403 and "viewer credential may look, not act" in await r.text()
        async with s.get(f"{daemon.admin}/status/api/nodes/{node_name(1)}/timeline") as r:
            assert (await r.json())["node"]["approved"] is False
        # The viewer credential is no admin token for the API either.
        bearer = {"Authorization": f"Bearer {daemon.viewer_token}"}
        async with s.get(daemon.admin + "/api/v1/nodes", headers=bearer) as r:
            assert r.status == 401


async def test_stream_carries_state_changes_and_progress_not_stored(
        daemon: Daemon, admin_session: tuple[aiohttp.ClientSession, str]) -> None:
    s, _ = admin_session
    async with s.get(daemon.admin + "/status/api/events", timeout=aiohttp.ClientTimeout(total=30)) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        stream = Stream(r)
        first = await r.content.readline()
        while not first.startswith(b"event: "):
            first = await r.content.readline()
        assert first == b"event: hello\n"
        hello = json.loads((await r.content.readline()).decode().removeprefix("data: "))
        assert hello["role"] == "admin" and isinstance(hello["seq"], int)
        i = 5
        assert await node_event(daemon, i, {"event": "stage1"}) == 200
        u = await stream.until(lambda u: u["node"] == node_name(i) and u["t"] == "state")
        assert u["state"] == "stage1" and u["group"] in ("compute", "gpu")
        assert await node_event(daemon, i, {"event": "fetching", "done": 0, "total": 8, "bytes": 0,
                                            "bytes_total": 8 << 20}) == 200
        u = await stream.until(lambda u: u["node"] == node_name(i) and u["t"] == "progress")
        assert u["bytes_total"] == 8 << 20
        for done in (2, 5):
            assert await node_event(daemon, i, {"event": "fetching", "done": done, "total": 8,
                                                "bytes": done << 20, "bytes_total": 8 << 20}) == 200
            u = await stream.until(lambda u: u["node"] == node_name(i) and u["t"] == "progress")
            assert (u["done"], u["bytes"]) == (done, done << 20)
        async with s.get(daemon.admin + "/status/api/nodes") as snap_resp:
            snap = await snap_resp.json()
        assert snap["progress"][node_name(i)] == [5, 8, 5 << 20, 8 << 20]
        assert await node_event(daemon, i, {"event": "failed", "reason": "chunk 3: hash mismatch"}) == 200
        u = await stream.until(lambda u: u["node"] == node_name(i) and u["t"] == "state")
        assert (u["state"], u["reason"]) == ("failed", "chunk 3: hash mismatch")
    # The registry kept the state changes, not the progress reports.
    async with s.get(f"{daemon.admin}/status/api/nodes/{node_name(i)}/timeline") as r:
        events = (await r.json())["events"]
    assert [e["state"] for e in events] == ["stage1", "fetching", "failed"]
    assert json.loads(events[1]["detail"])["bytes_total"] == 8 << 20
    async with s.get(daemon.admin + "/status/api/nodes") as snap_resp:
        assert node_name(i) not in (await snap_resp.json())["progress"]


async def test_timeline_carries_the_commissioning_report(
        daemon: Daemon, admin_session: tuple[aiohttp.ClientSession, str]) -> None:
    s, _ = admin_session
    report = {"dmi": {"vendor": "Dell Inc.", "product": "PowerEdge R650", "serial": "7XK2Q3"}, "cpus": 64,
              "memory_kb": 263_000_000, "nics": [{"name": "eno1", "mac": "52:54:00:aa:00:01", "link": "up"}]}
    async with aiohttp.ClientSession() as c, c.post(f"{daemon.public}/api/v1/nodes/{node_name(3)}/inventory",
                                                    json=report, headers={"X-Bootd-Token": node_token(3)}) as r:
        assert r.status == 200, await r.text()
    async with s.get(f"{daemon.admin}/status/api/nodes/{node_name(3)}/timeline") as r:
        inv = (await r.json())["inventory"]
    assert inv["dmi"]["serial"] == "7XK2Q3" and inv["cpus"] == 64 and inv["nics"][0]["name"] == "eno1"
    js = (Path(__file__).resolve().parents[2] / "bootd" / "net" / "http" / "static" / "status.js").read_text()
    assert "t.inventory" in js and '"serial"' in js  # the timeline panel draws it


async def test_heartbeat_usage_goes_to_the_stream_and_the_timeline(
        daemon: Daemon, admin_session: tuple[aiohttp.ClientSession, str]) -> None:
    s, _ = admin_session
    i, usage = 7, {"mem_used_kb": 90_000, "mem_total_kb": 1_000_000, "root_size_kb": 500_000,
                   "root_used_kb": 320_000, "image_ram_kb": 120_000}
    assert await node_event(daemon, i, {"event": "ready"}) == 200
    async with s.get(daemon.admin + "/status/api/events", timeout=aiohttp.ClientTimeout(total=30)) as r:
        stream = Stream(r)
        async with aiohttp.ClientSession() as c, c.post(f"{daemon.public}/api/v1/nodes/{node_name(i)}/heartbeat",
                                                        json=usage, headers={"X-Bootd-Token": node_token(i)}) as hb:
            assert hb.status == 200, await hb.text()
        u = await stream.until(lambda u: u["node"] == node_name(i) and u["t"] == "contact")
    assert {k: u["usage"][k] for k in usage} == usage and u["usage"]["at"] == u["contact"]
    async with s.get(f"{daemon.admin}/status/api/nodes/{node_name(i)}/timeline") as r:
        assert (await r.json())["usage"] == u["usage"]
    js = (Path(__file__).resolve().parents[2] / "bootd" / "net" / "http" / "static" / "status.js").read_text()
    assert "t.usage" in js and "image_ram_kb" in js  # the timeline panel draws it


async def test_stream_needs_a_session(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s, s.get(daemon.admin + "/status/api/events") as r:
        assert r.status == 401


def test_state_files_private(daemon: Daemon) -> None:
    for name in ("admin-token", "viewer-token"):
        assert stat.S_IMODE((Path(daemon.config).parent / "state" / name).stat().st_mode) == 0o600
