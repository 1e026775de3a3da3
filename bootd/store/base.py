"""The repository interface every service talks to.

Services depend on this Protocol only, so the SQLite implementation can be
swapped for PostgreSQL (or a broken fake in tests) without touching them.
All methods are coroutines: a store must never block the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from bootd.errors import RegistryFull, mask_url
from bootd.model import Group, Lease, Node, State

__all__ = ["mask_url"]

# Fields an administrator may change with update_node(); anything else is owned by bootd.
NODE_FIELDS = ("name", "mac", "group", "capsule", "enabled", "approved", "kernel_args", "ip")


@dataclass(frozen=True, slots=True)
class NewNode:
    """One line of a bulk creation: checked by the service, written by :meth:`NodeStore.add_nodes`.

    ``line`` is where it came from, so a conflict found inside the transaction
    can still name the line of the administrator's file.
    """

    line: int
    name: str
    mac: str
    group: str
    capsule: str | None = None
    ip: str | None = None
    kernel_args: str = ""
    vars: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Event:
    """One lifecycle step of a node, kept for the boot timeline."""

    node: str
    ts: float
    state: str
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Credential:
    """A node's current credential: only the sha256 of the token is stored, never the token."""

    node: str
    digest: str
    issued: float
    expires: float
    evidence: str = ""


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What /healthz and `bootd server list` say about the registry (the URL has no password)."""

    backend: str
    url: str
    healthy: bool
    failures: int = 0  # calls that found the database unreachable, since start
    reconnects: int = 0  # times the database came back after being unreachable
    down_since: float | None = None  # wall clock of the first failure of the current outage
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class ServerRecord:
    """One bootd server sharing this registry (a row of ``servers``): who, where, when it was last alive,
    how busy. ``heartbeat`` is the server's own clock (the servers' clocks must agree, e.g. NTP)."""

    id: str
    addresses: tuple[str, ...] = ()  # its DHCP server identifiers (server.address, subnets' next_server)
    public_url: str = ""
    admin_url: str = ""
    pid: int = 0
    started: float = 0.0
    heartbeat: float = 0.0
    load: float = 0.0  # requests answered per second over its last heartbeat interval
    nodes: int = 0  # nodes it booted (filled by list_servers only)


class NodeStore(Protocol):
    async def get_node(self, name: str) -> Node | None: ...
    async def get_node_by_mac(self, mac: str) -> Node | None: ...
    async def list_nodes(self) -> list[Node]: ...
    async def register(
        self,
        mac: str,
        *,
        name_pattern: str,
        first_index: int,
        group: str,
        approved: bool,
        now: float,
        max_nodes: int = 0,
    ) -> tuple[Node, bool]:
        """The node of ``mac``, registering it on first contact (RegistryFull past ``max_nodes``)."""
        ...
    async def register_many(self, macs: list[str], *, name_pattern: str, first_index: int, group: str,
                            approved: bool, now: float, max_nodes: int = 0) -> list[tuple[Node, bool] | RegistryFull]:
        """register() for each MAC, in order, in one trip (a DHCP read batch): a full registry is that MAC's
        RegistryFull in its slot; any other failure raises for all."""
        ...
    async def add_node(self, mac: str, name: str, *, group: str, now: float, **fields: Any) -> Node: ...
    async def add_nodes(self, nodes: list[NewNode], *, now: float) -> int:
        """All of ``nodes`` in one transaction, or none (a Conflict names the line)."""
        ...

    async def update_node(self, name: str, **fields: Any) -> Node: ...
    async def rename_node(self, name: str, new: str) -> Node: ...
    async def set_vars(self, name: str, values: dict[str, str], unset: tuple[str, ...] = ()) -> Node: ...
    async def delete_node(self, name: str) -> None: ...
    async def set_state(self, name: str, state: State, reason: str = "", *, now: float,
                        detail: str = "", expect: State | None = None) -> Node:
        """Set the lifecycle state; with ``expect``, only if the node is still in that state.

        The check and the write are one transaction (compare-and-set), so two processes (the
        daemon and the CLI, or several servers) never overwrite each other's transitions: the
        loser gets ``StateChanged`` and nothing is written.
        """
        ...
    async def touch(self, name: str, now: float) -> None: ...
    async def record_event(self, name: str, ts: float, state: str, reason: str = "", detail: str = "") -> None:
        """Add a timeline entry that is not a state change (a refused transition, for one)."""
        ...
    async def events(self, name: str, limit: int = 100) -> list[Event]: ...

    async def put_credential(self, cred: Credential) -> None: ...
    async def get_credential(self, name: str) -> Credential | None: ...
    async def extend_credential(self, name: str, digest: str, expires: float) -> None: ...
    async def note_pxe(self, mac: str, ts: float, address: str | None) -> None: ...
    async def pxe_seen(self, mac: str) -> tuple[float, str | None] | None: ...

    async def list_groups(self) -> list[Group]: ...
    async def get_group(self, name: str) -> Group | None: ...
    async def put_group(self, group: Group) -> Group: ...
    async def delete_group(self, name: str) -> None: ...

    async def get_lease_by_mac(self, mac: str) -> Lease | None: ...
    async def get_lease_by_ip(self, ip: str) -> Lease | None: ...
    async def list_leases(self) -> list[Lease]: ...
    async def put_lease(self, lease: Lease, *, now: float | None = None, server: str | None = None) -> None:
        """Store a lease (before its ACK). Conflict when the address is another MAC's live lease or another
        node's own address: across servers, the database decides, not each server's memory."""
    async def put_leases(self, leases: list[Lease], *, now: float | None = None,
                         server: str | None = None) -> list[Exception | None]:
        """put_lease() for each, committed together: each slot None (stored) or why that lease was not (a
        Conflict). Returns once every stored one is committed; raises (StoreError) when nothing could be."""
        ...
    async def release_lease(self, ip: str) -> None: ...

    async def beat(self, server: ServerRecord) -> list[ServerRecord]:
        """Write this server's row (its heartbeat) and return every server's, in one transaction."""
    async def list_servers(self) -> list[ServerRecord]: ...
    async def drop_server(self, server_id: str) -> None:
        """A clean stop: the row (and any lock it holds) goes, so peers take over at once."""
    async def take_lock(self, name: str, holder: str, now: float, ttl: float) -> bool:
        """Hold the named cluster lock until now + ttl (renewing it if ours); False while another holds it."""

    async def probe(self, timeout: float = 2.0) -> StoreStatus:
        """Ask the database now (one trivial query, bounded by ``timeout``), then return status()."""
        ...

    def status(self) -> StoreStatus:
        """Cheap and synchronous (no I/O): the state the last calls left behind, for /healthz."""
        ...

    async def close(self) -> None: ...
