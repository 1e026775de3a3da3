"""The chunk fast path (bootd/net/http/chunkfast.py) against a real server on loopback.

It must send what aiohttp's route sends, take a bulk slot like the route does, and hand
everything that is not a plain whole-chunk GET to aiohttp on the same connection, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path

import aiohttp

from tests.integration.test_http import Env, _register, env, start_env

__all__ = ["env"]  # the running-server fixture, shared with test_http.py


class Conn:
    """One raw keep-alive connection; reads responses one at a time by Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, env: Env) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", env.server.port))

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(self.reader.readexactly(int(headers.get("content-length", "0"))), 10)
        return status, headers, body

    async def get(self, path: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(("\r\n".join((f"GET {path} HTTP/1.1", "Host: t", *extra)) + "\r\n\r\n").encode())
        return await self.response()

    def close(self) -> None:
        self.writer.close()


def warm(env: Env, *hashes: str) -> None:
    """Open and verify chunks as a first GET through the route would (off the event loop): the fast path
    answers chunks that are already open."""
    files = env.server.sender.files
    for h in hashes:
        files.adopt(files.prepare(h, str(env.capsules.chunk_path(h)), h))


def answered(env: Env) -> int:
    assert env.server.fast_path is not None
    return env.server.fast_path.answered


async def test_fast_answer_matches_the_route(env: Env) -> None:
    chunk = env.manifest().chunks[0]
    body = env.capsules.chunk_path(chunk.sha256).read_bytes()
    conn = await Conn.open(env)
    try:
        # The first GET of a chunk goes through the route, which hashes it off the event loop; the fast
        # path answers chunks already open and verified.
        await conn.get(f"/chunks/{chunk.sha256}")
        n = answered(env)
        fast = await conn.get(f"/chunks/{chunk.sha256}")
        assert answered(env) == n + 1
        # A conditional GET that does not match goes through aiohttp's route and must look the same.
        routed = await conn.get(f"/chunks/{chunk.sha256}", 'If-None-Match: "not-this-one"')
        assert answered(env) == n + 1
    finally:
        conn.close()
    assert fast[0] == routed[0] == 200
    assert fast[2] == routed[2] == body
    assert hashlib.sha256(fast[2]).hexdigest() == chunk.sha256
    drop = {"date"}
    assert {k: v for k, v in fast[1].items() if k not in drop} == {k: v for k, v in routed[1].items() if k not in drop}
    assert fast[1]["etag"] == f'"{chunk.sha256}"' and "immutable" in fast[1]["cache-control"]


async def test_one_connection_mixes_fast_and_routed_requests(env: Env) -> None:
    async with aiohttp.ClientSession() as session:
        name = await _register(env, session, "52-54-00-00-00-7a")
    chunks = env.manifest().chunks[:2]
    warm(env, *(c.sha256 for c in chunks))
    conn = await Conn.open(env)
    try:
        n = answered(env)
        assert (await conn.get(f"/chunks/{chunks[0].sha256}"))[0] == 200
        assert (await conn.get("/healthz"))[2] == b"ok\n"
        assert (await conn.get(f"/chunks/{chunks[1].sha256}", "Range: bytes=2-5"))[0] == 206
        st, _, body = await conn.get(f"/chunks/{chunks[1].sha256}")
        assert st == 200 and hashlib.sha256(body).hexdigest() == chunks[1].sha256
        assert answered(env) == n + 2
        assert (await conn.get("/chunks/" + "0" * 64))[0] == 404  # unknown: the route's 404, same connection
        payload = b'{"event":"fetching","done":1,"total":2}'
        conn.writer.write(
            f"POST /api/v1/nodes/{name}/events HTTP/1.1\r\nHost: t\r\nX-Bootd-Token: {env.token(name)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert (await conn.response())[0] == 200
        # After a request with a body the connection stays with aiohttp: still correct, just not fast.
        st, _, body = await conn.get(f"/chunks/{chunks[0].sha256}")
        assert st == 200 and hashlib.sha256(body).hexdigest() == chunks[0].sha256
        assert answered(env) == n + 2
    finally:
        conn.close()


async def test_big_chunk_finishes_in_the_background_and_keeps_request_order(env: Env) -> None:
    """A chunk larger than the socket buffer: the rest goes out later, a request sent meanwhile waits its turn."""
    big = os.urandom(24 * 1024 * 1024)
    h = hashlib.sha256(big).hexdigest()
    path = env.capsules.chunk_path(h)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(big)
    small = env.manifest().chunks[0]
    warm(env, h, small.sha256)
    conn = await Conn.open(env)
    try:
        n = answered(env)
        conn.writer.write(f"GET /chunks/{h} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        await asyncio.sleep(0.2)  # the server has filled the socket and is waiting to send more
        assert env.server.admission.active == 1
        conn.writer.write(f"GET /chunks/{small.sha256} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        first = await conn.response()
        second = await conn.response()
    finally:
        conn.close()
    assert first[0] == 200 and first[2] == big
    assert second[0] == 200 and hashlib.sha256(second[2]).hexdigest() == small.sha256
    assert answered(env) == n + 2
    assert env.server.admission.active == 0


async def test_busy_slots_send_chunk_gets_through_the_route(tmp_path: Path) -> None:
    """With every bulk slot taken the fast path steps aside: the route queues or refuses with 503."""
    e, store = await start_env(tmp_path, max_bulk_streams=1, bulk_queue=0)
    try:
        big = os.urandom(24 * 1024 * 1024)
        h = hashlib.sha256(big).hexdigest()
        path = e.capsules.chunk_path(h)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(big)
        hog = await Conn.open(e)
        hog.writer.write(f"GET /chunks/{h} HTTP/1.1\r\nHost: t\r\n\r\n".encode())  # never read: holds the slot
        await asyncio.sleep(0.2)
        assert e.server.admission.active == 1
        conn = await Conn.open(e)
        st, headers, body = await conn.get(f"/chunks/{e.manifest().chunks[0].sha256}")
        assert st == 503 and re.fullmatch(r"\d+", headers["retry-after"]), (st, headers, body)
        hog.close()
        conn.close()
    finally:
        await e.server.close()
        await store.close()


async def test_client_that_reads_late_gets_every_answer_whole_and_in_order(env: Env) -> None:
    """Requests keep coming while the client reads nothing: the socket fills up mid-header or mid-body."""
    chunks = sorted(env.manifest().chunks, key=lambda c: c.stored_size)
    conn = await Conn.open(env)
    try:
        order = [chunks[i % len(chunks)] for i in range(40)]
        for c in order:
            conn.writer.write(f"GET /chunks/{c.sha256} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await conn.writer.drain()
            await asyncio.sleep(0.01)  # one request per read on the server side, mostly
        for c in order:
            st, _, body = await conn.response()
            assert st == 200 and hashlib.sha256(body).hexdigest() == c.sha256
    finally:
        conn.close()
    assert env.server.admission.active == 0
