"""Who is this machine, and may it boot?

Every transport (DHCP, TFTP, HTTP) asks the same question on first contact,
so the policy lives here once: register unknown MACs (or refuse them, with a
logged reason) and refuse disabled or unapproved nodes.  State changes are
the lifecycle table's (``bootd.service.lifecycle``).  Registration itself is made race-free by the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bootd.config import RegistryConfig
from bootd.model import Machine, Node
from bootd.store.base import NodeStore

log = logging.getLogger("bootd.registry")


@dataclass(frozen=True, slots=True)
class Resolution:
    node: Node | None
    reason: str = ""
    created: bool = False


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

    async def decide(self, machine: Machine, now: float) -> Resolution:
        """Resolve a machine to a node, registering it on first contact when allowed.

        The common case (registration on, within the rate limit) is one trip to the
        store: register() returns a known node as it is and records the contact.
        """
        created = False
        if self.config.auto_register and self._bucket.available(self.config.register_rate,
                                                                 self.config.register_burst, now):
            # Reserve the token before the await, so concurrent first contacts cannot overdraw it;
            # a known node gives it back.
            self._bucket.consume()
            node, created = await self.store.register(
                machine.mac,
                name_pattern=self.config.name_pattern,
                first_index=self.config.first_index,
                group=self.config.default_group,
                approved=not self.config.approve_first,
                now=now,
            )
            if not created:
                self._bucket.refund()
            else:
                log.info("event=registered node=%s mac=%s firmware=%s approved=%s", node.name, node.mac,
                         machine.firmware.value, node.approved)
        else:
            found = await self.store.get_node_by_mac(machine.mac)
            if found is None:
                if not self.config.auto_register:
                    return Resolution(None, f"unknown MAC {machine.mac} and registry.auto_register is off")
                return Resolution(None, f"unknown MAC {machine.mac}: registration rate limit "
                                        f"({self.config.register_rate:g}/s, burst {self.config.register_burst}) "
                                        "reached; it will register on a later attempt")
            node = found
            if now - node.last_contact >= 1.0:
                await self.store.touch(node.name, now)
        if not node.enabled:
            return Resolution(None, f"node {node.name} is disabled", created)
        if not node.approved:
            return Resolution(None, f"node {node.name} waits for approval (bootd node approve {node.name})",
                              created)
        return Resolution(node, "", created)

    async def resolve(self, machine: Machine, now: float) -> Node | None:
        result = await self.decide(machine, now)
        if result.node is None:
            log.info("event=refused mac=%s reason=%r", machine.mac, result.reason)
        return result.node

    async def boot_target(self, node: Node) -> tuple[str | None, str]:
        """The capsule and extra kernel arguments for a node: its own values, else its group's."""
        group = await self.store.get_group(node.group)
        capsule = node.capsule or (group.capsule if group else None)
        args = " ".join(a for a in ((group.kernel_args if group else ""), node.kernel_args) if a)
        return capsule, args
