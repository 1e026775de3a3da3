"""Heartbeat monitor: nodes that stop talking become ``stale``, then ``dead``.

The decision is a pure function of (node, now) so tests drive it with a fake
clock; a periodic task (started by the daemon) only calls ``check(now)``.

Two details matter in practice:

* ``set_state`` records contact time, so marking a node stale would reset its
  silence.  The stale-to-dead step therefore counts from when the node became
  stale (``state_since``), which lands on ``last_contact + dead_after``.
* After bootd itself was down, every node looks silent.  Silence is counted
  from the later of the node's last contact and the monitor's start, so a
  restart does not declare the whole cluster dead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from bootd.config import RegistryConfig
from bootd.model import Node, State
from bootd.service.registry import RegistryService

log = logging.getLogger("bootd.health")

# States in which a node is expected to keep talking to bootd (progress reports or heartbeats).
WATCHED = frozenset({State.STAGE1, State.FETCHING, State.VERIFIED, State.BOOTED, State.READY})


@dataclass(frozen=True, slots=True)
class Transition:
    name: str
    old: State
    new: State
    reason: str


def judge(node: Node, now: float, config: RegistryConfig, since: float = 0.0) -> Transition | None:
    """What the monitor should do about one node at ``now`` (None: leave it alone)."""
    if node.state in WATCHED:
        silent = now - max(node.last_contact, since)
        if silent >= config.dead_after:
            return Transition(node.name, node.state, State.DEAD, f"no contact for {silent:.0f} s")
        if silent >= config.stale_after:
            return Transition(node.name, node.state, State.STALE, f"no contact for {silent:.0f} s")
    elif node.state is State.STALE:
        stale_for = now - max(node.state_since, since)
        if stale_for >= config.dead_after - config.stale_after:
            silent = stale_for + config.stale_after
            return Transition(node.name, node.state, State.DEAD, f"no contact for {silent:.0f} s")
    return None


class HealthMonitor:
    def __init__(
        self,
        registry: RegistryService,
        config: RegistryConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.config = config
        self.clock = clock
        self.started = clock()

    async def check(self, now: float) -> list[Transition]:
        """One sweep; returns what changed so callers (and tests) can see it."""
        done: list[Transition] = []
        for node in await self.registry.store.list_nodes():
            step = judge(node, now, self.config, self.started)
            if step is None:
                continue
            # Re-read just before writing: a heartbeat may have arrived since list_nodes().
            fresh = await self.registry.store.get_node(node.name)
            if fresh is None or judge(fresh, now, self.config, self.started) != step:
                continue
            await self.registry.report(node.name, step.new, step.reason, now=now)
            log.warning("event=%s node=%s was=%s reason=%r", step.new.value, step.name, step.old.value,
                        step.reason)
            done.append(step)
        return done

    def interval(self) -> float:
        """Sweep often enough that a state is at most ~10% late, but not more than every second."""
        return max(1.0, min(self.config.stale_after, self.config.dead_after - self.config.stale_after) / 10)

    async def run(self) -> None:
        """Sweep forever (cancel to stop); a failed sweep is logged and retried on the next tick."""
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.check(self.clock())
            except Exception:
                log.exception("event=health-sweep-failed")
