"""The send deadline: one timer for every in-flight send cuts a send whose client reads nothing."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from bootd.net.http.send import SendStalled, SendWatch, SendWatches


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
