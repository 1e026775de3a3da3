"""Who is this machine, and may it boot?

Every transport (DHCP, TFTP, HTTP) asks the same question on first contact,
so the policy lives here once: register unknown MACs (or refuse them, with a
logged reason) and refuse disabled or unapproved nodes.  State changes are
the lifecycle table's (``bootd.service.lifecycle``).  Registration itself is made race-free by the store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from bootd.config import RegistryConfig
from bootd.errors import RegistryFull
from bootd.model import Group, Machine, Node
from bootd.store.base import NodeStore, StoreStatus

log = logging.getLogger("bootd.registry")


@dataclass(frozen=True, slots=True)
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


class _Unread:
    """Marks a group not read yet (None is a valid answer: no such group)."""


_UNREAD = _Unread()


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
        """Resolve a machine to a node, registering it on first contact when allowed.

        ``netboot`` says the machine is a network-boot client (PXE or HTTP vendor class, option 93,
        iPXE); only those register unless ``registry.register_any_client`` is set, so a laptop or a
        switch on the provisioning LAN never becomes a node.  The common case (registration on,
        within the rate limit) is one trip to the store: register() returns a known node as it is
        and records the contact, and the default group is read in the same trip.
        """
        cfg = self.config
        created = False
        may_register = cfg.auto_register and (netboot or cfg.register_any_client)
        node: Node | None = None
        prefetched: Group | _Unread | None = _UNREAD
        if may_register and self._bucket.available(cfg.register_rate, cfg.register_burst, now):
            # Reserve the token before the await, so concurrent first contacts cannot overdraw it;
            # a known node gives it back.
            self._bucket.consume()
            # The default group is read alongside (a new node lands in it, and most nodes stay there): on the
            # SQLite store both ride one trip to the database, in one transaction, instead of two in a row.
            registering = asyncio.ensure_future(self.store.register(
                machine.mac, name_pattern=cfg.name_pattern, first_index=cfg.first_index,
                group=cfg.default_group, approved=not cfg.approve_first, now=now, max_nodes=cfg.max_nodes,
            ))
            try:
                prefetched = await self.store.get_group(cfg.default_group)
            finally:
                registered = await asyncio.gather(registering, return_exceptions=True)
            if isinstance(registered[0], RegistryFull):
                self._bucket.refund()
                return Resolution(None, str(registered[0]))
            if isinstance(registered[0], BaseException):
                raise registered[0]
            node, created = registered[0]
            if not created:
                self._bucket.refund()
            else:
                log.info("event=registered node=%s mac=%s firmware=%s approved=%s", node.name, node.mac,
                         machine.firmware.value, node.approved)
        else:
            node = await self.store.get_node_by_mac(machine.mac)
            if node is None:
                if not cfg.auto_register:
                    return Resolution(None, f"unknown MAC {machine.mac} and registry.auto_register is off")
                if not may_register:
                    return Resolution(None, f"unknown MAC {machine.mac} is not a network-boot client (no PXE or "
                                            "HTTP vendor class, option 93 or iPXE); registry.register_any_client "
                                            "is off")
                return Resolution(None, f"unknown MAC {machine.mac}: registration rate limit "
                                        f"({cfg.register_rate:g}/s, burst {cfg.register_burst}) "
                                        "reached; it will register on a later attempt")
            if now - node.last_contact >= 1.0:
                await self.store.touch(node.name, now)
        node, group = await self.with_group(node, prefetched if node.group == cfg.default_group else _UNREAD)
        if not node.enabled:
            return Resolution(None, f"node {node.name} is disabled", created)
        if not node.approved:
            return Resolution(None, f"node {node.name} waits for approval (bootd node approve {node.name})",
                              created)
        return Resolution(node, "", created, group)

    async def resolve(self, machine: Machine, now: float, *, netboot: bool = True) -> Node | None:
        result = await self.decide(machine, now, netboot=netboot)
        if result.node is None:
            # Debug only: refusals come at packet rate from a flood; the DHCP server counts them.
            log.debug("event=refused mac=%s reason=%r", machine.mac, result.reason)
        return result.node

    async def with_group(self, node: Node, group: Group | _Unread | None = _UNREAD) -> tuple[Node, Group | None]:
        """The node with its group's variables under its own (a node's own value wins), and the group:
        one read of the group serves the variables, the boot target and the overlays (``group``: already read)."""
        if isinstance(group, _Unread):
            group = await self.store.get_group(node.group)
        if group is None or not group.vars:
            return node, group
        return dataclasses.replace(node, vars={**group.vars, **node.vars}), group

    @staticmethod
    def boot_target(node: Node, group: Group | None) -> tuple[str | None, str]:
        """The capsule and extra kernel arguments for a node: its own values, else its group's."""
        capsule = node.capsule or (group.capsule if group else None)
        args = " ".join(a for a in ((group.kernel_args if group else ""), node.kernel_args) if a)
        return capsule, args
