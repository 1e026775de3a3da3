"""Boot-storm admission control on a running server: 503 + Retry-After over the limit, small requests unaffected."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.test_http import Env, curl, metric_value, start_env


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e, store = await start_env(tmp_path, max_bulk_streams=2, bulk_queue=1, retry_after=2.0)
    try:
        yield e
    finally:
        await e.server.close()
        await store.close()


async def stalled_get(port: int, path: str) -> socket.socket:
    """A client that asks for a big object and then does not read: its stream keeps its slot."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, ("127.0.0.1", port))
    await loop.sock_sendall(s, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


async def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_over_limit_gets_503_with_retry_after_while_small_requests_flow(env: Env) -> None:
    big = os.urandom(32 * 1024 * 1024)
    h = hashlib.sha256(big).hexdigest()
    path = env.capsules.chunk_path(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(big)
    adm = env.server.admission
    socks = [await stalled_get(env.server.port, f"/chunks/{h}") for _ in range(2)]
    try:
        await wait_for(lambda: adm.active == 2)
        socks.append(await stalled_get(env.server.port, f"/chunks/{h}"))
        await wait_for(lambda: adm.queued == 1)
        small = env.manifest().chunks[0].sha256
        async with aiohttp.ClientSession() as session:
            async with session.get(env.url(f"/chunks/{small}")) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] in {"2", "3", "4"}
                assert r.headers["Cache-Control"] == "no-store"
                assert "limit" in await r.text()
            status, _, headers = await curl(env.url(f"/chunks/{small}"))
            assert status == 503 and "Retry-After:" in headers
            # Jitter: the delays handed out are not all equal.
            delays = set()
            for _ in range(30):
                async with session.get(env.url(f"/chunks/{small}")) as r:
                    assert r.status == 503
                    delays.add(r.headers["Retry-After"])
            assert delays <= {"2", "3", "4"} and len(delays) >= 2
            # A HEAD takes no slot but tells what a GET would get: the stage one reads Retry-After this way,
            # exactly as its agent does it (HTTP/1.0 over a bare socket).
            reader, writer = await asyncio.open_connection("127.0.0.1", env.server.port)
            writer.write(f"HEAD /chunks/{small} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            head = (await asyncio.wait_for(reader.read(), 5)).decode()
            writer.close()
            assert head.startswith("HTTP/1.0 503") or head.startswith("HTTP/1.1 503"), head
            assert re.search(r"^Retry-After: [234]\r$", head, re.M), head
            # Meanwhile, scripts, manifests and node events are answered at once.
            started = time.monotonic()
            for _ in range(20):
                async with session.get(env.url("/boot/52-54-00-00-20-01.ipxe")) as r:
                    assert r.status == 200 and "bootd.node=" in await r.text()
                async with session.get(env.url(f"/capsules/{env.vid}/manifest")) as r:
                    assert r.status == 200
                    await r.read()
                async with session.get(env.url("/healthz")) as r:
                    assert r.status == 200
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, f"60 small requests took {elapsed:.2f} s while bulk was saturated"
            async with session.get(env.url("/metrics")) as r:
                text = await r.text()
            assert metric_value(text, "bootd_http_bulk_rejected_total") >= 32
            assert metric_value(text, "bootd_http_bulk_active") == 2
            assert metric_value(text, "bootd_http_bulk_queued") == 1
            # A freed slot goes to the queued stream, not to a newcomer.
            socks.pop(0).close()
            await wait_for(lambda: adm.queued == 0 and adm.active == 2)
            async with session.head(env.url(f"/chunks/{small}")) as r:
                assert r.status == 200  # room in the queue again: HEAD answers normally
            for s in socks:
                s.close()
            socks.clear()
            await wait_for(lambda: adm.active == 0)
            async with session.get(env.url(f"/chunks/{small}")) as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).hexdigest() == small
    finally:
        for s in socks:
            s.close()


async def test_waiting_in_the_queue_then_served(env: Env) -> None:
    """Streams over the limit but within the queue wait and are then served completely."""
    chunks = env.manifest().chunks
    async with aiohttp.ClientSession() as session:

        async def fetch(c: object) -> str:
            sha = c.sha256  # type: ignore[attr-defined]
            for _ in range(50):
                async with session.get(env.url(f"/chunks/{sha}")) as r:
                    if r.status == 503:
                        await asyncio.sleep(0.01)  # a test stand-in for honouring Retry-After
                        continue
                    assert r.status == 200
                    return hashlib.sha256(await r.read()).hexdigest()
            raise AssertionError("never admitted")

        got = await asyncio.gather(*(fetch(c) for c in chunks * 4))
    assert got == [c.sha256 for c in chunks * 4]
    assert env.server.admission.active == 0
