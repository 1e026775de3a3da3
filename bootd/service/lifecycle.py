"""The node lifecycle: one table, the only owner of every state change.

Before this module, five places set states and the store accepted any
transition, so nobody could say what a state meant.  Now a change is asked
for by an *actor* and the table says whether that actor may take the node
from its current state to the new one (h11's ``_state.py`` is the model).
Who the actor is matters more than the state names:

* ``FIRMWARE`` is anyone on the provisioning LAN: DHCP, TFTP and the iPXE
  script route carry no credential.  It may only move a node that is not
  running (``discovered``, ``failed``, ``stale``, ``dead``) to ``pxe``.  A
  spoofed DHCP packet therefore cannot knock a booting or running node out
  of its state; a node that really rebooted says so itself (``stage1``,
  with its credential) seconds later.
* ``NODE`` is the node itself, proven by its credential.  It walks the boot
  chain forwards (skipping a step whose report was lost is fine), may start
  over (``stage1``) or fail from anywhere; a node that was stale or dead and
  checks in again is ``ready``.
* ``MONITOR`` is bootd's own clock: the timeouts below.
* ``ADMIN`` may set any state (the CLI's ``--state``, enable/disable).

Every write is a compare-and-set in the store (the state the table was
checked against must still be the stored one), so the CLI and the daemon,
or several servers, never overwrite each other's transitions.  A refused
transition changes nothing, is logged and counted, and is recorded in the
node's timeline (at most once a minute per node, so a flood of forged
requests cannot turn into a flood of writes).

Timeouts are owned here too: each non-final state says how long a node may
stay silent in it and what it becomes then.  Silence is counted from the
node's last contact, so a long fetch that keeps reporting progress is never
timed out; ``pxe`` counts from when the node entered it, because a machine
looping in its firmware keeps talking without getting anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from bootd.config import RegistryConfig
from bootd.errors import BootdError, NotFound, StateChanged
from bootd.model import Node, State
from bootd.service.events import PROGRESS_FIELDS, EventBus, progress_update, state_update
from bootd.store.base import NodeStore

log = logging.getLogger("bootd.lifecycle")

S = State


class Actor(enum.StrEnum):
    FIRMWARE = "firmware"  # unauthenticated: DHCP, TFTP, the iPXE script route
    NODE = "node"  # the node, with its credential
    MONITOR = "monitor"  # bootd's timeouts
    ADMIN = "admin"  # an administrator (CLI or admin API)


ALL = frozenset(State)
BOOTING = frozenset({S.STAGE1, S.FETCHING, S.VERIFIED, S.BOOTED})
AT_REST = frozenset({S.DISCOVERED, S.FAILED, S.STALE, S.DEAD})
# The boot chain in order.  A node reports forwards along it and may skip steps (a report that could
# not be delivered is not retried forever: the agent carries on), but never goes back, except to
# start over at `stage1`.
CHAIN = (S.DISCOVERED, S.PXE, S.STAGE1, S.FETCHING, S.VERIFIED, S.BOOTED, S.READY)


def _up_to(state: State) -> frozenset[State]:
    return frozenset(CHAIN[: CHAIN.index(state) + 1])


# (actor, new state) -> the states it may come from.  Anything not listed is refused.
TABLE: dict[tuple[Actor, State], frozenset[State]] = {
    (Actor.FIRMWARE, S.PXE): AT_REST | {S.PXE},
    (Actor.NODE, S.STAGE1): ALL - {S.DISABLED},
    (Actor.NODE, S.FETCHING): _up_to(S.FETCHING),
    (Actor.NODE, S.VERIFIED): _up_to(S.VERIFIED),
    # A systemd image reports `booted` while it starts (the node agent), which can outlast stale_after
    # under emulation: a node still starting up is booted again, not lost.
    (Actor.NODE, S.BOOTED): _up_to(S.BOOTED) | {S.STALE, S.DEAD},
    (Actor.NODE, S.READY): _up_to(S.READY) | {S.STALE, S.DEAD},
    (Actor.NODE, S.FAILED): ALL - {S.DISABLED},
    (Actor.MONITOR, S.STALE): BOOTING | {S.READY},
    (Actor.MONITOR, S.DEAD): BOOTING | {S.READY, S.STALE},
    (Actor.MONITOR, S.FAILED): frozenset({S.PXE}),
    **{(Actor.ADMIN, state): ALL for state in State},
}

# What a node may report about itself over the node API (the table's NODE rows).
NODE_REPORTABLE = frozenset(new for actor, new in TABLE if actor is Actor.NODE)


# What the node agent measures with every report (bootd/stage1/node-agent.sh, usage_fields): memory in use,
# its root filesystem, and the RAM the root image holds.
USAGE_FIELDS = ("mem_used_kb", "mem_total_kb", "root_size_kb", "root_used_kb", "image_ram_kb")
REPORTED = (*PROGRESS_FIELDS, *USAGE_FIELDS)  # the facts a node's event may carry into its timeline
MAX_HEARTBEAT = 4096  # bytes of a heartbeat's body read: the agent's report is about 150
MAX_USAGE = 200_000  # nodes whose last usage report is kept (one entry per node; deleted nodes are forgotten)
_INT_MAX = 2**63  # a report's numbers are counters and sizes: what fits a signed 64-bit integer


def reported(body: Mapping[str, Any], fields: tuple[str, ...] = REPORTED) -> dict[str, int]:
    """The whole numbers among ``fields`` in a node's report; anything else (text, floats, booleans, numbers
    below 0 or beyond 64 bits, other keys) is dropped, not refused: a report is a side channel of the
    contact, and an agent of another version must still be heard."""
    out: dict[str, int] = {}
    for key in fields:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT_MAX:
            out[key] = value
    return out


def usage_report(raw: bytes) -> dict[str, int]:
    """A heartbeat's body (``{"mem_used_kb": ..., ...}``) as the usage it reports; empty when there is none.

    An old agent sends no body, and a body that is too long, not JSON or not an object says nothing
    usable: none of these is an error, the heartbeat itself still counts.
    """
    if not raw or len(raw) > MAX_HEARTBEAT:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return {}
    return reported(body, USAGE_FIELDS) if isinstance(body, dict) else {}


def allowed(actor: Actor, old: State, new: State) -> bool:
    return old in TABLE.get((actor, new), frozenset())


class TransitionRefused(BootdError):
    """The table does not allow this actor to take the node from its state to the new one."""

    def __init__(self, node: str, actor: Actor, old: State, new: State) -> None:
        super().__init__(f"{actor.value} may not move node {node!r} from {old.value} to {new.value}")
        self.node, self.actor, self.old, self.new = node, actor, old, new


@dataclass(frozen=True, slots=True)
class Timeout:
    """What the monitor does about one silent node: move it from ``old`` to ``new``, and why."""

    name: str
    old: State
    new: State
    reason: str


def timeout(node: Node, now: float, config: RegistryConfig, since: float = 0.0) -> Timeout | None:
    """The timeout due for ``node`` at ``now``, if any (a pure function: tests drive it with numbers).

    ``since`` is when the monitor started: after bootd itself was down every
    node looks silent, so silence is counted from the later of the two.
    """
    state = node.state
    if state is S.PXE:
        if config.pxe_timeout > 0:
            waited = now - max(node.state_since, since)
            if waited >= config.pxe_timeout:
                return Timeout(node.name, state, S.FAILED,
                               f"got its boot program {waited:.0f} s ago and never reported from the stage one "
                               "(no network in the stage one? wrong kernel modules? see the console)")
        return None
    if state in BOOTING or state is S.READY:
        silent = now - max(node.last_contact, since)
        if silent >= config.dead_after:
            return Timeout(node.name, state, S.DEAD, f"no contact for {silent:.0f} s")
        if silent >= config.stale_after:
            return Timeout(node.name, state, S.STALE, f"no contact for {silent:.0f} s")
        return None
    if state is S.STALE:
        # Marking a node stale records a contact time, so count from when it became stale.
        stale_for = now - max(node.state_since, since)
        if stale_for >= config.dead_after - config.stale_after:
            return Timeout(node.name, state, S.DEAD, f"no contact for {stale_for + config.stale_after:.0f} s")
    # discovered (a machine that asked once and may never boot), dead, failed and disabled wait for
    # a person or for the node itself: no timer.
    return None


class LifecycleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.changes = Counter("bootd_lifecycle_transitions", "Node state changes, by actor and new state",
                               ["actor", "state"], registry=registry)
        self.refused = Counter("bootd_lifecycle_refused", "State changes the lifecycle table refused, by actor, "
                               "old and new state", ["actor", "old", "new"], registry=registry)
        self.lost = Counter("bootd_lifecycle_lost_races", "Compare-and-set writes that found the state changed "
                            "by another writer", registry=registry)


REFUSAL_RECORD_INTERVAL = 60.0


class Lifecycle:
    """Applies the table.  Every state change in the daemon and the CLI goes through ``change``.

    Every change it writes, every contact and every fetch progress is also published on ``events``
    (the status page's bus, in memory only).
    """

    def __init__(self, store: NodeStore, config: RegistryConfig, metrics: CollectorRegistry,
                 events: EventBus | None = None) -> None:
        self.store = store
        self.config = config
        self.metrics = LifecycleMetrics(metrics)
        self.events = EventBus() if events is None else events
        self._recorded: dict[str, float] = {}  # node -> when its last refusal was written to the timeline
        # node -> its last heartbeat's usage report and when it came ("at"). In memory only, like fetch
        # progress: a report per node every heartbeat is not worth a registry write, and it is current again at
        # the next heartbeat after a restart.
        self._usage: dict[str, dict[str, float]] = {}

    def reload(self, config: RegistryConfig) -> None:
        self.config = config

    async def change(self, name: str, new: State, reason: str = "", *, actor: Actor, now: float,
                     detail: str = "", node: Node | None = None) -> Node:
        """Move ``name`` to ``new`` if the table allows it; raise TransitionRefused otherwise.

        ``node`` is the caller's fresh copy, saving a read; the write checks it is still current.
        A lost compare-and-set is retried once against the new state.
        """
        for attempt in (1, 2):
            if node is None:
                node = await self.store.get_node(name)
                if node is None:
                    raise NotFound(f"no node named {name!r}")
            old = node.state
            if not allowed(actor, old, new):
                await self._refused(node, actor, new, now)
                raise TransitionRefused(name, actor, old, new)
            if actor is Actor.FIRMWARE and old is new:
                return node  # firmware chatter is no progress: pxe keeps the time it was entered
            if actor is Actor.NODE and old is new is S.FETCHING and reason == node.reason:
                # Progress of a fetch under way: a contact in the registry (its timeouts count from it),
                # the numbers on the bus only.  The timeline keeps the state changes, not 1 row a second.
                await self.store.touch(name, now)
                self.events.publish(progress_update(name, detail, now))
                return dataclasses.replace(node, last_contact=now)
            try:
                updated = await self.store.set_state(name, new, reason, now=now, detail=detail, expect=old)
            except StateChanged:
                self.metrics.lost.inc()
                if attempt == 2:
                    raise
                node = None
                continue
            self.metrics.changes.labels(actor=actor.value, state=new.value).inc()
            if new in (S.PXE, S.STAGE1):
                self.forget(name)  # booting again: what the last boot used says nothing about this one
            self.events.publish(state_update(updated))
            if new is S.FETCHING and detail:
                self.events.publish(progress_update(name, detail, now))
            if old is not new:
                log.info("event=state node=%s from=%s to=%s by=%s%s", name, old.value, new.value, actor.value,
                         f" reason={reason!r}" if reason else "")
            return updated
        raise AssertionError("unreachable")

    async def heartbeat(self, name: str, now: float, report: bytes = b"") -> Node:
        """A running node checks in: a node that was booted, stale or dead is ready again.

        ``report`` is the heartbeat's body (the node agent's usage fields, see :func:`usage_report`):
        kept as the node's last usage and published with the contact.
        """
        node = await self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}")
        if node.state is S.DISABLED:
            await self._refused(node, Actor.NODE, S.READY, now)
            raise TransitionRefused(name, Actor.NODE, node.state, S.READY)
        usage = self._keep_usage(name, usage_report(report), now)
        if node.state in (S.BOOTED, S.STALE, S.DEAD):
            return await self.change(name, S.READY, "heartbeat", actor=Actor.NODE, now=now, node=node)
        await self.store.touch(name, now)
        contact: dict[str, Any] = {"t": "contact", "node": name, "contact": now}
        if usage is not None:
            contact["usage"] = dict(usage)  # the bus's copy: readers never share the kept one
        self.events.publish(contact)
        return node

    def _keep_usage(self, name: str, facts: dict[str, int], now: float) -> dict[str, float] | None:
        if not facts:
            return None  # no report (an old agent): the last one stays, with its own time
        if name not in self._usage and len(self._usage) >= MAX_USAGE:
            return None  # bounded: more nodes reporting than any registry here holds
        usage: dict[str, float] = {**facts, "at": now}
        self._usage[name] = usage
        return usage

    def usage(self, name: str) -> dict[str, float] | None:
        """The node's last heartbeat usage report with its time ``at``, if this process took one since the
        node booted (another server of the cluster may have taken its heartbeats)."""
        usage = self._usage.get(name)
        return dict(usage) if usage is not None else None

    def forget(self, name: str) -> None:
        """The node is gone (deleted, renamed) or booting again: its last usage report is no longer its own."""
        self._usage.pop(name, None)

    async def sweep(self, now: float, since: float = 0.0) -> list[Timeout]:
        """Apply every timeout that is due; returns what changed."""
        done: list[Timeout] = []
        for node in await self.store.list_nodes():
            step = timeout(node, now, self.config, since)
            if step is None:
                continue
            # Judge a fresh copy (a heartbeat may have arrived since list_nodes()), then write it as a
            # compare-and-set against the state judged: a report that lands in between wins.
            fresh = await self.store.get_node(node.name)
            if fresh is None or timeout(fresh, now, self.config, since) != step:
                continue
            try:
                changed = await self.store.set_state(node.name, step.new, step.reason, now=now, expect=step.old)
            except StateChanged:
                self.metrics.lost.inc()
                continue
            except NotFound:
                continue
            self.metrics.changes.labels(actor=Actor.MONITOR.value, state=step.new.value).inc()
            self.events.publish(state_update(changed))
            log.warning("event=%s node=%s was=%s reason=%r", step.new.value, step.name, step.old.value, step.reason)
            done.append(step)
        return done

    async def _refused(self, node: Node, actor: Actor, new: State, now: float) -> None:
        self.metrics.refused.labels(actor=actor.value, old=node.state.value, new=new.value).inc()
        last = self._recorded.get(node.name)
        if last is not None and now - last < REFUSAL_RECORD_INTERVAL:
            return
        self._recorded[node.name] = now
        if len(self._recorded) > 100_000:  # bounded: forget the oldest half
            for key in list(self._recorded)[:50_000]:
                del self._recorded[key]
        text = f"{actor.value} asked {node.state.value} -> {new.value}: not allowed"
        log.info("event=transition-refused node=%s actor=%s from=%s to=%s", node.name, actor.value,
                 node.state.value, new.value)
        try:
            await self.store.record_event(node.name, now, "refused", text)
        except BootdError as exc:
            log.warning("event=refusal-not-recorded node=%s error=%r", node.name, str(exc))
