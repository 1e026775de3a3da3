"""The lifecycle's clock: a periodic sweep that applies the table's timeouts.

What is due is decided by ``bootd.service.lifecycle.timeout`` (a pure
function of node and time, so tests drive it with numbers); this module only
decides how often to look.  After bootd itself was down every node looks
silent, so silence is counted from the later of a node's last contact and
the monitor's start: a restart does not declare the whole cluster dead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from bootd.config import RegistryConfig
from bootd.service.lifecycle import Lifecycle, Timeout

log = logging.getLogger("bootd.health")


class HealthMonitor:
    def __init__(self, lifecycle: Lifecycle, *, clock: Callable[[], float] = time.time,
                 lead: Callable[[str, float, float], Awaitable[bool]] | None = None) -> None:
        self.lifecycle = lifecycle
        self.clock = clock
        self.started = clock()
        # Several servers on one registry: only the holder of the "sweep" lock sweeps (bootd.service.servers).
        self.lead = lead

    @property
    def config(self) -> RegistryConfig:
        return self.lifecycle.config

    async def check(self, now: float) -> list[Timeout]:
        """One sweep; returns what changed so callers (and tests) can see it."""
        return await self.lifecycle.sweep(now, self.started)

    def interval(self) -> float:
        """Sweep often enough that a state is at most ~10% late, but not more than every second."""
        c = self.config
        spans = [c.stale_after, c.dead_after - c.stale_after] + ([c.pxe_timeout] if c.pxe_timeout > 0 else [])
        return max(1.0, min(spans) / 10)

    async def tick(self, now: float) -> list[Timeout] | None:
        """One timer tick: sweep if this server holds the sweep lock (or runs alone); None when another sweeps.

        The lock is held a few intervals and renewed by every sweep of its holder, so a dead sweeper's
        place is taken within that time.
        """
        if self.lead is not None and not await self.lead("sweep", now, max(3 * self.interval(), 10.0)):
            return None
        return await self.check(now)

    async def run(self) -> None:
        """Sweep forever (cancel to stop); a failed sweep is logged and retried on the next tick."""
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.tick(self.clock())
            except Exception:
                log.exception("event=health-sweep-failed")
