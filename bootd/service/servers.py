"""Several bootd servers on one registry: who is alive, who answers which client, who sweeps.

Each server writes a heartbeat row (``servers`` table) every ``cluster.heartbeat`` seconds and reads
every row back in the same transaction. From that list, cached here, the DHCP hot path decides
with no database read per packet: the live servers (heartbeat younger than ``cluster.takeover_after``),
sorted by id, own the 256 buckets of the RFC 3074 hash in turn (bucket ``b`` -> live server
``b % N``, Kea's load-balancing split). A server that stops heartbeating drops out of the live list
after ``takeover_after`` seconds and its buckets are split among the others: that is the takeover.
A server that stops cleanly deletes its row, so its peers take over at the next heartbeat.

Lifecycle timeout sweeps need one sweeper at a time: ``lead()`` holds a lock row in the registry
(renewed by its holder each sweep, taken over when it expires).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bootd.config import Config
from bootd.errors import StoreError
from bootd.proto.dhcp.loadbalance import BUCKETS, owner_index
from bootd.ratelog import LogLimiter
from bootd.store.base import NodeStore, ServerRecord

__all__ = ["Cluster", "ServerAdmin", "ServerView", "live_servers", "split"]

log = logging.getLogger("bootd.servers")


def live_servers(rows: Sequence[ServerRecord], me: str, now: float, takeover_after: float) -> list[ServerRecord]:
    """The servers that answer clients now, sorted by id: a heartbeat at most ``takeover_after`` old.

    ``me`` always counts (a server asking is alive, even if its own last write failed).
    """
    return sorted((r for r in rows if r.id == me or now - r.heartbeat <= takeover_after), key=lambda r: r.id)


def split(ids: Sequence[str]) -> list[int]:
    """For each of the 256 buckets, the index in ``ids`` (sorted) of the server that owns it."""
    return [owner_index(b, len(ids)) for b in range(BUCKETS)] if ids else []


class Cluster:
    """This server's view of the servers sharing its registry, refreshed on the heartbeat timer."""

    def __init__(self, store: NodeStore, config: Config, *, clock: Callable[[], float] = time.time,
                 load: Callable[[], float] | None = None, addresses: Sequence[str] = ()) -> None:
        c = config.cluster
        self.store = store
        self.clock = clock
        self.id = c.id or config.server.address
        self.every = c.heartbeat
        self.takeover_after = c.takeover_after
        ids = [config.server.address, *addresses]
        self.me = ServerRecord(
            id=self.id, addresses=tuple(dict.fromkeys(ids)), public_url=config.http.public_url,
            admin_url=f"{'https' if config.admin.tls_cert else 'http'}://{config.admin.listen}:{config.admin.port}",
            pid=os.getpid(), started=clock(), heartbeat=clock())
        self._load = load
        self._last_total: tuple[float, float] | None = None  # (when, load counter) at the last heartbeat
        self.rows: list[ServerRecord] = []
        self.live: list[ServerRecord] = []
        self._owner: list[int] = []
        self._mine = bytes(BUCKETS)  # 1 where this server owns the bucket: the per-packet check is one index
        self._index = 0
        self._dead_addresses: frozenset[str] = frozenset()
        self._listeners: list[Callable[[], None]] = []
        self._log = LogLimiter(60.0)
        self._task: asyncio.Task[None] | None = None
        self._apply([self.me])  # alone until the first heartbeat: every bucket is ours

    # -- the hot path (no I/O) ---------------------------------------------------------------
    @property
    def shared(self) -> bool:
        """More than one live server: only then is a client's bucket worth computing."""
        return len(self.live) > 1

    def owns(self, bucket: int) -> bool:
        return self._mine[bucket] != 0

    def owner(self, bucket: int) -> ServerRecord:
        return self.live[self._owner[bucket]]

    def is_dead(self, address: str) -> bool:
        """Is ``address`` a DHCP server identifier of a server that is no longer alive (its share is taken over)?"""
        return address in self._dead_addresses

    @property
    def position(self) -> tuple[int, int]:
        """(this server's index among the live servers, how many are live): spreads address allocation."""
        return self._index, len(self.live)

    def live_urls(self) -> list[str]:
        """The live servers' public URLs: this server's first, then the others by id (for boot scripts and
        chunk sources; a node whose server dies mid-boot continues from the next)."""
        urls = [self.me.public_url] + [r.public_url for r in self.live if r.id != self.id]
        return [u for u in dict.fromkeys(urls) if u]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously, no await) whenever the live servers change."""
        self._listeners.append(listener)

    # -- the heartbeat -----------------------------------------------------------------------
    def _apply(self, rows: list[ServerRecord], now: float | None = None) -> bool:
        """Recompute the live list and the bucket split from ``rows``; True when the live servers changed."""
        now = self.clock() if now is None else now
        live = live_servers(rows, self.id, now, self.takeover_after)
        if not any(r.id == self.id for r in live):
            live = sorted([*live, self.me], key=lambda r: r.id)
        ids = [r.id for r in live]
        changed = ids != [r.id for r in self.live]
        self.rows = rows
        self.live = live
        if changed:
            self._owner = split(ids)
            self._index = ids.index(self.id)
            self._mine = bytes(1 if o == self._index else 0 for o in self._owner)
        alive = {a for r in live for a in r.addresses}
        self._dead_addresses = frozenset(a for r in rows if r.id not in ids for a in r.addresses) - alive
        return changed

    def _current_load(self, now: float) -> float:
        if self._load is None:
            return 0.0
        total = self._load()
        last, self._last_total = self._last_total, (now, total)
        if last is None or now <= last[0]:
            return 0.0
        return max(0.0, (total - last[1]) / (now - last[0]))

    async def beat(self, now: float | None = None) -> bool:
        """One heartbeat: write ours, read everyone's, recompute the split. True when the live servers changed."""
        now = self.clock() if now is None else now
        record = dataclasses.replace(self.me, heartbeat=now, load=round(self._current_load(now), 2))
        rows = await self.store.beat(record)
        self.me = record
        before = [r.id for r in self.live]
        changed = self._apply(rows, now)
        if changed:
            after = [r.id for r in self.live]
            log.warning("event=cluster-changed live=%s was=%s my_buckets=%d", ",".join(after), ",".join(before),
                        sum(self._mine))
            for listener in self._listeners:
                try:
                    listener()
                except Exception:  # a listener's bug must not stop the heartbeat
                    log.exception("event=cluster-listener-failed")
        return changed

    async def run(self) -> None:
        """Heartbeat until cancelled; a failed heartbeat is logged (once a minute) and retried next tick."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.beat()
            except StoreError as exc:
                held = self._log.allow("beat")
                if held is not None:
                    log.warning("event=cluster-heartbeat-failed error=%r retry_in=%ss", str(exc), self.every)

    # -- as a daemon component: started before DHCP answers (the split is known), stopped after it ------
    async def start(self) -> None:
        await self.beat()
        log.info("event=cluster-joined id=%s live=%s my_buckets=%d", self.id, ",".join(r.id for r in self.live),
                 sum(self._mine))
        self._task = asyncio.create_task(self.run(), name="cluster-heartbeat")

    async def close(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._task = None
            await self.leave()

    async def leave(self) -> None:
        """A clean stop: our row goes, so the peers take our share at their next heartbeat."""
        try:
            await self.store.drop_server(self.id)
        except StoreError as exc:
            log.warning("event=cluster-leave-failed error=%r (peers take over after %ss)", str(exc),
                        self.takeover_after)

    async def lead(self, name: str, now: float, ttl: float) -> bool:
        """Hold the cluster-wide lock ``name`` for ``ttl`` seconds (renewed by each call while held)."""
        return await self.store.take_lock(name, self.id, now, ttl)


@dataclass(frozen=True, slots=True)
class ServerView:
    """One row of `bootd server list` (and GET /api/v1/servers): a server, whether it is alive, its share."""

    id: str
    addresses: tuple[str, ...]
    public_url: str
    admin_url: str
    pid: int
    started: float
    heartbeat: float
    age: float  # seconds since its last heartbeat, by this reader's clock
    alive: bool
    load: float
    nodes: int
    buckets: int  # of the 256 hash buckets: its share of the clients (0 when dead)

    def as_json(self) -> dict[str, object]:
        out = {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]
        out["addresses"] = list(self.addresses)
        out["share"] = round(self.buckets / BUCKETS, 4)
        return out


class ServerAdmin:
    """The servers as an operator sees them, read from the registry (the CLI and the admin API)."""

    def __init__(self, store: NodeStore, config: Config) -> None:
        self.store = store
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.takeover_after = config.cluster.takeover_after

    async def list(self, now: float) -> list[ServerView]:
        rows = await self.store.list_servers()
        live = live_servers(rows, "", now, self.takeover_after)
        ids = [r.id for r in live]
        owners = split(ids)
        share = {sid: owners.count(i) for i, sid in enumerate(ids)}
        return [ServerView(r.id, r.addresses, r.public_url, r.admin_url, r.pid, r.started, r.heartbeat,
                           round(now - r.heartbeat, 1), r.id in share, r.load, r.nodes, share.get(r.id, 0))
                for r in rows]
