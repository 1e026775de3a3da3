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

Small requests (iPXE scripts, manifests, node events) do not go through this
at all, which is how they never wait behind bulk traffic.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


class Overloaded(Exception):
    """Every slot is busy and the queue is full; ``retry_after`` is whole seconds (HTTP wants integers)."""

    def __init__(self, retry_after: int, active: int, queued: int) -> None:
        self.retry_after = retry_after
        self.active = active
        self.queued = queued
        super().__init__(
            f"bulk transfer limit reached ({active} streaming, {queued} queued); retry in {retry_after} s"
        )


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    active: int
    queued: int
    admitted: int
    rejected: int
    waited: int


class AdmissionControl:
    """A FIFO semaphore with a bounded queue that refuses instead of growing.

    ``asyncio.Semaphore`` is not used because it lets a task that arrives just
    as a slot frees take it ahead of older waiters, and it has no queue bound.
    """

    def __init__(
        self,
        limit: int,
        queue: int,
        retry_after: float,
        *,
        jitter: float = 1.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if limit < 1:
            raise ValueError(f"the bulk stream limit must be at least 1, got {limit}")
        if queue < 0:
            raise ValueError(f"the bulk queue length must not be negative, got {queue}")
        self.limit = limit
        self.queue_limit = queue
        self.retry_after = retry_after
        self.jitter = jitter
        self._rng = rng
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._admitted = 0
        self._rejected = 0
        self._waited = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def stats(self) -> AdmissionStats:
        return AdmissionStats(self._active, self.queued, self._admitted, self._rejected, self._waited)

    def retry_delay(self) -> int:
        """Base delay stretched by up to ``jitter`` of itself, rounded to whole seconds.

        With the default (2 s, jitter 1.0) clients are told 2, 3 or 4 s, spreading a refused wave
        over two seconds; the stage one adds sub-second jitter of its own.
        """
        return max(1, round(self.retry_after * (1.0 + self.jitter * self._rng())))

    def would_reject(self) -> bool:
        """Would an acquire() now raise Overloaded?  Lets a HEAD report the 503 a GET would get."""
        self._prune()
        return self._active >= self.limit and len(self._waiters) >= self.queue_limit

    def try_acquire(self) -> bool:
        """Take a slot without waiting if one is free and nobody is queued (the common, fast case)."""
        if self._active < self.limit and not self._waiters:
            self._active += 1
            self._admitted += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line if needed; raises Overloaded when the line is full."""
        if self.try_acquire():
            return
        self._prune()
        if len(self._waiters) >= self.queue_limit:
            self._rejected += 1
            raise Overloaded(self.retry_delay(), self._active, len(self._waiters))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._waited += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release()
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        self._admitted += 1

    def release(self) -> None:
        """Give the slot to the oldest live waiter, or return it to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot moves over; _active is unchanged
                return
        if self._active <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._active -= 1

    def _prune(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
