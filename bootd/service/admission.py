"""Boot-storm admission control for bulk (chunk) streams.

When a whole rack powers on, every stage one asks for hundreds of chunks at
once.  Serving all of them concurrently only spreads the same bandwidth over
more sockets (each node then finishes later than it would in turn) and it
keeps thousands of half-sent responses alive.  So bulk streams take a slot
from a fixed budget; up to ``queue`` more wait in strict arrival order (a
slot freed is handed to the oldest waiter, so a newcomer can never barge in
front of someone already queued), and anything beyond that is told to come
back later with a jittered delay so the retries of a thousand nodes do not
arrive in one wave.

The provisioning LAN is shared, so one host must not take every slot: a
source address holds at most ``per_source`` slots and ``queue_per_source``
queue places, and a freed slot goes round-robin to the next source that waits
(within a source, oldest first).  Addresses the administrator trusts (a
replica server) are exempt from the per-source caps, never from the totals.
:class:`ConnectionLimits` applies the same idea to open connections.

Small requests (iPXE scripts, manifests, node events) do not go through this
at all, which is how they never wait behind bulk traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    """No slot and no queue place for this request; ``retry_after`` is whole seconds (HTTP wants integers)."""

    def __init__(self, retry_after: int, active: int, queued: int, source: str | None = None) -> None:
        self.retry_after = retry_after
        self.active = active
        self.queued = queued
        self.reason = "total" if source is None else "per-source"
        where = "" if source is None else f" for {source}"
        super().__init__(
            f"bulk transfer limit{where} reached ({active} streaming, {queued} queued); retry in {retry_after} s"
        )


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    active: int
    queued: int
    admitted: int
    rejected: int
    waited: int


class TrustedNetworks:
    """Is an address one the administrator exempted from per-source caps?  Answers are cached per address."""

    def __init__(self, networks: tuple[str, ...] = ()) -> None:
        self._nets = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._cache: dict[str, bool] = {}

    def __call__(self, address: str) -> bool:
        if not self._nets:
            return False
        hit = self._cache.get(address)
        if hit is None:
            try:
                ip = ipaddress.ip_address(address)
                hit = any(ip in net for net in self._nets)
            except ValueError:
                hit = False
            if len(self._cache) > 65536:
                self._cache.clear()  # bounded: spoofed sources cannot grow it
            self._cache[address] = hit
        return hit


class AdmissionControl:
    """A fair semaphore: bounded per source and in total, with bounded queues that refuse instead of growing.

    ``asyncio.Semaphore`` is not used because it lets a task that arrives just
    as a slot frees take it ahead of older waiters, and it has no queue bound.
    Invariant: a slot is free only when no waiter could take it (every waiting
    source is at its own cap), so an arrival may take a free slot at once.
    """

    def __init__(
        self,
        limit: int,
        queue: int,
        retry_after: float,
        *,
        per_source: int | None = None,
        queue_per_source: int | None = None,
        trusted: Callable[[str], bool] | None = None,
        jitter: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if limit < 1:
            raise ValueError(f"the bulk stream limit must be at least 1, got {limit}")
        if queue < 0:
            raise ValueError(f"the bulk queue length must not be negative, got {queue}")
        self.limit = limit
        self.queue_limit = queue
        self.per_source = limit if per_source is None else per_source
        self.queue_per_source = queue if queue_per_source is None else queue_per_source
        self.retry_after = retry_after
        self.jitter = jitter
        self._trusted = trusted or (lambda _source: False)
        self._rng = rng
        self._active = 0
        self._by_source: dict[str, int] = {}
        # source -> its waiters, oldest first; the dict's order is the round-robin order of sources.
        self._waiters: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._queued = 0
        self._admitted = 0
        self._rejected = 0
        self._waited = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return self._queued

    def active_from(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self._active, self._queued, self._admitted, self._rejected, self._waited)

    def retry_delay(self) -> int:
        """Base delay stretched by up to ``jitter`` of itself, rounded to whole seconds.

        With the default (2 s, jitter 1.0) clients are told 2, 3 or 4 s, spreading a refused wave
        over two seconds; the stage one adds sub-second jitter of its own.
        """
        return max(1, round(self.retry_after * (1.0 + self.jitter * self._rng())))

    def _under_cap(self, source: str) -> bool:
        return self._by_source.get(source, 0) < self.per_source or self._trusted(source)

    def _refusal(self, source: str) -> Overloaded | None:
        """Why an acquire() from ``source`` would be refused now, or None if it would get a slot or a place."""
        if self._active < self.limit and self._under_cap(source):
            return None
        waiting = self._waiters.get(source)
        mine = len(waiting) if waiting else 0
        if self._queued >= self.queue_limit:
            return Overloaded(self.retry_delay(), self._active, self._queued)
        if mine >= self.queue_per_source and not self._trusted(source):
            return Overloaded(self.retry_delay(), self.active_from(source), mine, source)
        return None

    def would_reject(self, source: str = "") -> bool:
        """Would an acquire() now raise Overloaded?  Lets a HEAD report the 503 a GET would get."""
        return self._refusal(source) is not None

    def try_acquire(self, source: str = "") -> bool:
        """Take a slot without waiting if one is free for this source (the common, fast case)."""
        if self._active < self.limit:
            n = self._by_source.get(source, 0)
            if n < self.per_source or self._trusted(source):
                self._active += 1
                self._by_source[source] = n + 1
                self._admitted += 1
                return True
        return False

    async def acquire(self, source: str = "") -> None:
        """Take a slot, waiting in line if needed; raises Overloaded when this source's or the whole line is full."""
        if self.try_acquire(source):
            return
        refused = self._refusal(source)
        if refused is not None:
            self._rejected += 1
            raise refused
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(source, deque()).append(fut)
        self._queued += 1
        self._waited += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release(source)
            else:
                self._forget(source, fut)
            raise
        self._admitted += 1

    def _forget(self, source: str, fut: asyncio.Future[None]) -> None:
        waiting = self._waiters.get(source)
        if waiting is None:
            return
        try:
            waiting.remove(fut)
            self._queued -= 1
        except ValueError:
            pass
        if not waiting:
            del self._waiters[source]

    def release(self, source: str = "") -> None:
        """Return ``source``'s slot, then hand a slot to the next waiting source in turn that is under its cap."""
        n = self._by_source.get(source, 0)
        if n <= 0 or self._active <= 0:
            raise RuntimeError(f"release() for {source!r} without a matching acquire()")
        if n == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = n - 1
        self._active -= 1
        if self._waiters:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._active < self.limit:
            for src in self._waiters:
                if self._under_cap(src):
                    break
            else:
                return  # every waiting source is at its own cap: the slot stays free
            waiting = self._waiters.pop(src)  # re-inserted at the end: round robin
            fut = waiting.popleft()
            self._queued -= 1
            if waiting:
                self._waiters[src] = waiting
            if fut.done():
                continue  # cancelled while queued
            self._active += 1
            self._by_source[src] = self._by_source.get(src, 0) + 1
            fut.set_result(None)

    @asynccontextmanager
    async def slot(self, source: str = "") -> AsyncIterator[None]:
        await self.acquire(source)
        try:
            yield
        finally:
            self.release(source)


class ConnectionLimits:
    """Open connections, in total and per source address (trusted sources exempt from the latter).

    ``admit`` says why a new connection is refused, or counts it in; ``release`` when it closes.
    """

    def __init__(self, total: int, per_source: int, trusted: Callable[[str], bool] | None = None) -> None:
        self.total = total
        self.per_source = per_source
        self._trusted = trusted or (lambda _source: False)
        self.open = 0
        self._by_source: dict[str, int] = {}

    def admit(self, source: str) -> str | None:
        if self.open >= self.total:
            return "max-connections"
        n = self._by_source.get(source, 0)
        if n >= self.per_source and not self._trusted(source):
            return "max-connections-per-source"
        self.open += 1
        self._by_source[source] = n + 1
        return None

    def release(self, source: str) -> None:
        n = self._by_source.get(source, 0)
        if n <= 1:
            self._by_source.pop(source, None)
        else:
            self._by_source[source] = n - 1
        self.open = max(0, self.open - 1)
