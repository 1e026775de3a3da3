"""Who is this machine, and may it boot?

Every transport (DHCP, TFTP, HTTP) asks the same question on first contact,
so the policy lives here once: register unknown MACs (or refuse them, with a
logged reason) and refuse disabled or unapproved nodes.  State changes are
the lifecycle table's (``bootd.service.lifecycle``).  Registration itself is made race-free by the store.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bootd.config import RegistryConfig
from bootd.errors import RegistryFull
from bootd.model import Group, Machine, Node
from bootd.store.base import NodeStore, StoreStatus

log = logging.getLogger("bootd.registry")


@dataclass(slots=True)  # not frozen: one per first contact, and frozen costs an object.__setattr__ per field
class Resolution:
    node: Node | None
    reason: str = ""
    created: bool = False
    group: Group | None = None  # the node's group, read once with it (its variables are already in node.vars)


class _TokenBucket:
    """Registration rate limit: a flood of forged MACs must not fill the registry at line rate."""

    def __init__(self) -> None:
        self.tokens: float | None = None
        self.stamp = 0.0

    def available(self, rate: float, burst: int, now: float) -> bool:
        """Refill, then say whether one more registration fits; consume() takes it."""
        if rate <= 0:
            self.tokens = None
            return True
        if self.tokens is None:
            self.tokens, self.stamp = float(burst), now
        self.tokens = min(float(burst), self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now
        return self.tokens >= 1.0

    def consume(self) -> None:
        if self.tokens is not None:
            self.tokens -= 1.0

    def refund(self) -> None:
        if self.tokens is not None:
            self.tokens += 1.0


class RegistryService:
    def __init__(self, store: NodeStore, config: RegistryConfig) -> None:
        self.store = store
        self.config = config
        self._bucket = _TokenBucket()

    def reload(self, config: RegistryConfig) -> None:
        self.config = config

    async def store_health(self) -> StoreStatus:
        """Is the registry's database reachable now (one bounded probe)? For /healthz."""
        return await self.store.probe()

    async def decide(self, machine: Machine, now: float, *, netboot: bool = True) -> Resolution:
        """Resolve a machine to a node, registering it on first contact when allowed (decide_many says how)."""
        return (await self.decide_many([(machine, netboot)], now))[0]

    async def decide_many(self, asks: Sequence[tuple[Machine, bool]], now: float) -> list[Resolution]:
        """Resolve machines to nodes, registering them on first contact when allowed; one answer per ask, in order.

        Each ask is a machine and whether it is a network-boot client (PXE or HTTP vendor class, option 93,
        iPXE); only those register unless ``registry.register_any_client`` is set, so a laptop or a switch on
        the provisioning LAN never becomes a node. The common case (registration on, within the rate limit) is
        one trip to the store for all of them, however many (a DHCP read batch): register_many() returns known
        nodes as they are and records their contact, and the default group is read right after.
        """
        cfg = self.config
        answers: list[Resolution | None] = [None] * len(asks)
        nodes: list[tuple[int, Node]] = []
        created: set[int] = set()
        registering: list[int] = []
        looking: list[int] = []
        for i, (_machine, netboot) in enumerate(asks):
            may_register = cfg.auto_register and (netboot or cfg.register_any_client)
            if may_register and self._bucket.available(cfg.register_rate, cfg.register_burst, now):
                # Reserve the token before the await, so concurrent first contacts cannot overdraw it; a known
                # node gives it back.
                self._bucket.consume()
                registering.append(i)
            else:
                looking.append(i)
        groups: dict[str, Group | None] = {}
        if registering:
            # The default group is read right after (a new node lands in it, and most nodes stay there). One after
            # the other, not as two tasks: on the SQLite store each runs at once on the event loop's thread
            # (SqliteNodeStore._inline), where two tasks cost two more turns of the loop for every DHCP batch.
            try:
                registered = await self.store.register_many(
                    [asks[i][0].mac for i in registering], name_pattern=cfg.name_pattern,
                    first_index=cfg.first_index, group=cfg.default_group, approved=not cfg.approve_first, now=now,
                    max_nodes=cfg.max_nodes)
            except BaseException:
                for _ in registering:
                    self._bucket.refund()
                raise
            groups[cfg.default_group] = await self.store.get_group(cfg.default_group)
            for i, one in zip(registering, registered, strict=True):
                if isinstance(one, RegistryFull):
                    self._bucket.refund()
                    answers[i] = Resolution(None, str(one))
                    continue
                node, new = one
                if not new:
                    self._bucket.refund()
                else:
                    created.add(i)
                    # The member, not .value: a StrEnum prints as its value, and .value is an interpreted property
                    # read even when the line is not logged (a first contact per exchange under a rack's power-on).
                    log.info("event=registered node=%s mac=%s firmware=%s approved=%s", node.name, node.mac,
                             asks[i][0].firmware, node.approved)
                nodes.append((i, node))
        for i in looking:
            machine, netboot = asks[i]
            known = await self.store.get_node_by_mac(machine.mac)
            if known is None:
                answers[i] = Resolution(None, self._unregistered(machine, netboot))
                continue
            if now - known.last_contact >= 1.0:
                await self.store.touch(known.name, now)
            nodes.append((i, known))
        for i, node in nodes:
            if node.group not in groups:
                groups[node.group] = await self.store.get_group(node.group)
            group = groups[node.group]
            node = self._merged(node, group)
            new = i in created
            if not node.enabled:
                answers[i] = Resolution(None, f"node {node.name} is disabled", new)
            elif not node.approved:
                answers[i] = Resolution(None, f"node {node.name} waits for approval (bootd node approve "
                                              f"{node.name})", new)
            else:
                answers[i] = Resolution(node, "", new, group)
        return [a if a is not None else Resolution(None, "no answer") for a in answers]

    def _unregistered(self, machine: Machine, netboot: bool) -> str:
        """Why an unknown MAC was not registered."""
        cfg = self.config
        if not cfg.auto_register:
            return f"unknown MAC {machine.mac} and registry.auto_register is off"
        if not (netboot or cfg.register_any_client):
            return (f"unknown MAC {machine.mac} is not a network-boot client (no PXE or HTTP vendor class, option 93 "
                    "or iPXE); registry.register_any_client is off")
        return (f"unknown MAC {machine.mac}: registration rate limit ({cfg.register_rate:g}/s, burst "
                f"{cfg.register_burst}) reached; it will register on a later attempt")

    async def resolve(self, machine: Machine, now: float, *, netboot: bool = True) -> Node | None:
        result = await self.decide(machine, now, netboot=netboot)
        if result.node is None:
            # Debug only: refusals come at packet rate from a flood; the DHCP server counts them.
            log.debug("event=refused mac=%s reason=%r", machine.mac, result.reason)
        return result.node

    async def with_group(self, node: Node) -> tuple[Node, Group | None]:
        """The node with its group's variables under its own (a node's own value wins), and the group:
        one read of the group serves the variables, the boot target and the overlays."""
        group = await self.store.get_group(node.group)
        return self._merged(node, group), group

    @staticmethod
    def _merged(node: Node, group: Group | None) -> Node:
        """The node with its group's variables under its own (a node's own value wins)."""
        if group is None or not group.vars:
            return node
        return dataclasses.replace(node, vars={**group.vars, **node.vars})

    @staticmethod
    def boot_target(node: Node, group: Group | None) -> tuple[str | None, str]:
        """The capsule and extra kernel arguments for a node: its own values, else its group's."""
        capsule = node.capsule or (group.capsule if group else None)
        args = " ".join(a for a in ((group.kernel_args if group else ""), node.kernel_args) if a)
        return capsule, args
