"""The send deadline: one timer for every in-flight send cuts a send whose client reads nothing; the shared
open of a content-addressed file."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bootd.metrics import HttpMetrics
from bootd.net.files import OpenFile, OpenFileCache
from bootd.net.http.send import Sender, SendStalled, SendWatch, SendWatches


async def test_a_send_nobody_reads_is_cut_and_a_read_one_finishes(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    data = tmp_path / "big"
    data.write_bytes(os.urandom(8 << 20))
    watches = SendWatches(0.4)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with data.open("rb") as f, a, b, c, d:
        for s in (a, c):
            s.setblocking(False)
        stalled = SendWatch(loop, a.fileno(), f.fileno(), 0, 8 << 20, watches)
        read = SendWatch(loop, c.fileno(), f.fileno(), 0, 8 << 20, watches)
        assert len(watches) == 2
        got = 0
        t0 = time.monotonic()
        while got < 8 << 20:  # the reader keeps reading: its send makes progress and completes
            got += len(await loop.run_in_executor(None, d.recv, 1 << 20))
        await asyncio.wait_for(read.fut, 5)
        with pytest.raises(SendStalled):
            await asyncio.wait_for(stalled.fut, 5)
        assert 0.4 <= time.monotonic() - t0 < 3.0
        assert len(watches) == 0  # both left the set; the timer stops with the last one
        assert b.recv(1 << 16)  # the stalled one did send what fit before the client stopped reading


class _MissThatLingers(OpenFileCache):
    """The real cache, but its first open finds the file missing and only then waits: an open that began
    before a replica's fetch made the file present."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.first = True

    def prepare(self, key: str, path: str, sha256: str | None = None, root: str | None = None) -> OpenFile:
        if not self.first:
            return super().prepare(key, path, sha256, root)
        self.first = False
        try:
            return super().prepare(key, path, sha256, root)
        except FileNotFoundError:
            self.gate.wait(10)
            raise


async def test_an_open_after_a_fetch_does_not_join_one_that_began_before_the_file_existed(tmp_path: Path) -> None:
    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    path = tmp_path / digest
    files = _MissThatLingers()
    sender = Sender(HttpMetrics(CollectorRegistry()), files)
    early = asyncio.ensure_future(sender.open_verified(digest, lambda: path, sha256=digest))
    for _ in range(200):  # until the early open has found the file missing and waits
        if not files.first:
            break
        await asyncio.sleep(0.01)
    path.write_bytes(data)  # the fetch lands
    joined = asyncio.ensure_future(sender.open_verified(digest, lambda: path, sha256=digest))
    fresh = asyncio.ensure_future(sender.open_verified(digest, lambda: path, sha256=digest, join=False))
    await asyncio.sleep(0.2)
    files.gate.set()
    entry = await fresh
    assert entry.size == len(data) and entry.read(0, 16) == data[:16]
    with pytest.raises(FileNotFoundError):
        await joined  # what the replica's route did before: a 404 for the chunk it had just fetched
    with pytest.raises(FileNotFoundError):
        await early
