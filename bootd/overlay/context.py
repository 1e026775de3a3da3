"""What a template may see: plain frozen values, built by the caller.

The overlay package never reads the registry: the service (or the CLI) turns
its nodes and groups into these values, so rendering stays a pure function of
its inputs and can be cached and tested without a store.

Shared parts (``cluster``, ``master``) are one object for a whole batch of
nodes; the renderer caches templates that read only those, which is what
makes ``/etc/hosts`` for 5,000 nodes cheap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from bootd.model import Node

# Top-level names a template may use; anything else is refused when the overlay is stored.
VARIABLES = ("node", "vars", "group", "cluster", "master")
# Network configuration systems the node agent may report (``node.network``); "" = unknown, emit all.
NETWORK_SYSTEMS = ("", "networkd", "ifupdown")


def _frozen(values: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(values or {}))


@dataclass(frozen=True, slots=True)
class Nic:
    """The interface the node booted from (the one its MAC was registered with)."""

    mac: str
    ip: str | None = None
    name: str | None = None  # kernel name as the node agent reports it; None until then
    prefix: int | None = None
    gateway: str | None = None


@dataclass(frozen=True, slots=True)
class HostKey:
    """One ssh host key pair in OpenSSH formats (private PEM-like text, public one-liner)."""

    private: str
    public: str


@dataclass(frozen=True, slots=True)
class NodeInfo:
    name: str
    mac: str
    group: str
    ip: str | None = None
    nic: Nic | None = None
    vars: Mapping[str, str] = field(default_factory=dict)
    machine_id: str | None = None
    host_keys: Mapping[str, HostKey] = field(default_factory=dict)
    network: str = ""  # see NETWORK_SYSTEMS

    def __post_init__(self) -> None:
        if self.network not in NETWORK_SYSTEMS:
            raise ValueError(f"node.network {self.network!r} is not one of {NETWORK_SYSTEMS}")
        object.__setattr__(self, "vars", _frozen(self.vars))
        object.__setattr__(self, "host_keys", MappingProxyType(dict(self.host_keys)))
        if self.nic is None:
            object.__setattr__(self, "nic", Nic(mac=self.mac, ip=self.ip))


@dataclass(frozen=True, slots=True)
class GroupInfo:
    name: str
    vars: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vars", _frozen(self.vars))


@dataclass(frozen=True, slots=True)
class ClusterNode:
    name: str
    ip: str | None
    group: str


@dataclass(frozen=True, slots=True)
class User:
    """A passwd entry synced from the master; ``hash`` is set only when hashes are enabled."""

    name: str
    uid: int
    gid: int
    gecos: str = ""
    home: str = "/nonexistent"
    shell: str = "/usr/sbin/nologin"
    hash: str | None = None


@dataclass(frozen=True, slots=True)
class UserGroup:
    name: str
    gid: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterView:
    """Every node of the cluster, sorted by name (what /etc/hosts lists)."""

    nodes: tuple[ClusterNode, ...] = ()
    domain: str = ""


@dataclass(frozen=True, slots=True)
class MasterInfo:
    """The server side: where nodes reach bootd, its NTP, its keys and accounts."""

    name: str
    address: str
    authorized_keys: tuple[str, ...] = ()
    users: tuple[User, ...] = ()
    groups: tuple[UserGroup, ...] = ()
    uid_min: int = 1000
    uid_max: int = 59999
    ntp: tuple[str, ...] = ()  # NTP servers for chrony; empty means the master itself


@dataclass(frozen=True, slots=True)
class Context:
    node: NodeInfo
    group: GroupInfo
    cluster: ClusterView
    master: MasterInfo

    def variables(self) -> dict[str, Any]:
        """The template namespace; ``vars`` is the group's variables overlaid by the node's (node wins)."""
        merged = dict(self.group.vars)
        merged.update(self.node.vars)
        return {"node": self.node, "vars": MappingProxyType(merged), "group": self.group,
                "cluster": self.cluster, "master": self.master}


SHARED = frozenset({"cluster", "master"})  # the parts of a Context that are the same for every node of a batch


def node_info(node: Node, *, machine_id: str | None = None, host_keys: Mapping[str, HostKey] | None = None,
              network: str = "", nic_name: str | None = None) -> NodeInfo:
    """A registry node as templates see it; identity and what the node agent reported come from the caller."""
    return NodeInfo(name=node.name, mac=node.mac, group=node.group, ip=node.ip,
                    nic=Nic(mac=node.mac, ip=node.ip, name=nic_name), vars=node.vars, machine_id=machine_id,
                    host_keys=host_keys or {}, network=network)


def cluster_view(nodes: Iterable[Node], domain: str = "") -> ClusterView:
    """Build once per registry change and reuse: the render cache keys on this object's identity."""
    return ClusterView(tuple(ClusterNode(n.name, n.ip, n.group) for n in sorted(nodes, key=lambda n: n.name)),
                       domain=domain)
