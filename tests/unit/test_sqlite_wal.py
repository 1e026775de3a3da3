"""The SQLite registry's WAL file stays bounded under sustained writes.

A writer rewinds the WAL only after a checkpoint has copied every frame, and a background PASSIVE checkpoint
never catches the end while writes keep coming: at 1,000 DHCP exchanges/s the file grew by 1.7 GB a minute.
The checkpointer empties it past ``wal_limit``. Real SQLite file, real threads, the store's own group commit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import bootd.store.sqlite as sqlite_store
from bootd.model import Lease
from bootd.store.sqlite import SqliteNodeStore

LIMIT = 1 << 20
BOUNDED = 16 * LIMIT  # what the bounded WAL must stay under (the unbounded one passes twice that)
MACS = 2000  # a rack renewing: the same clients again and again, so the database itself stays small


async def _sustained(store: SqliteNodeStore, wal: Path, seconds: float) -> int:
    """Lease writes back to back, 32 per group commit, for ``seconds``; the largest WAL size seen."""
    biggest = 0
    i = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = time.time()
        await asyncio.gather(*(
            store.put_lease(Lease(f"10.9.{k // 250}.{k % 250 + 1}", f"02:00:00:00:{k // 256:02x}:{k % 256:02x}",
                                  now + 3600), now=now)
            for k in ((i + j) % MACS for j in range(32))))
        i += 32
        if wal.exists():
            biggest = max(biggest, wal.stat().st_size)
    return biggest


@pytest.fixture
def fast_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.05)


async def test_wal_stays_bounded_under_sustained_writes(tmp_path: Path, fast_checkpoints: None) -> None:
    store = SqliteNodeStore(tmp_path / "bootd.sqlite", wal_limit=LIMIT)
    checkpointer = store._checkpointer
    assert checkpointer is not None
    try:
        biggest = await _sustained(store, tmp_path / "bootd.sqlite-wal", 4.0)
    finally:
        await store.close()
    assert checkpointer.resets >= 1, "the WAL never passed its limit: the test wrote too little to show anything"
    # Between two checks it grows by what 0.05 s of writes append (more when the checkpoint thread waits for the
    # GIL or the writer lock); without the limit it reaches about 100 MB in these 4 s (the test below).
    assert biggest < BOUNDED, f"WAL reached {biggest} bytes with a limit of {LIMIT}"
    leases = await _reopen_leases(tmp_path / "bootd.sqlite")
    assert len(leases) == MACS  # every write is still there after the truncations


async def test_without_the_limit_the_wal_grows(tmp_path: Path, fast_checkpoints: None) -> None:
    """The case the limit exists for (the check above must be able to fail): PASSIVE checkpoints alone."""
    store = SqliteNodeStore(tmp_path / "bootd.sqlite", wal_limit=1 << 62)
    try:
        biggest = await _sustained(store, tmp_path / "bootd.sqlite-wal", 4.0)
    finally:
        await store.close()
    assert biggest > 2 * BOUNDED, f"WAL stayed at {biggest} bytes without a limit: the bounded test shows nothing"


async def _reopen_leases(path: Path) -> list[Lease]:
    store = SqliteNodeStore(path)
    try:
        return await store.list_leases()
    finally:
        await store.close()
