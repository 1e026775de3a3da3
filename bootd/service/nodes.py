"""Node administration: the one place that validates and applies an administrator's change.

The HTTP admin API and the ``bootd node``/``group``/``lease`` commands both
call this service, with the same dictionary shape (the JSON body of
``POST /api/v1/nodes/{name}``), so a change means the same thing, and a bad
value is refused with the same words, whichever way it arrives.  The rules
that used to live in the HTTP handler live here: the settable fields, the
``approve`` alias, and "a disabled node is in state ``disabled``; enabling
it starts it over at ``discovered``", applied through the lifecycle table.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootd.config import RegistryConfig
from bootd.errors import NotFound
from bootd.hostlist import HostlistError, compress, expand
from bootd.model import Group, Lease, Node, State, normalize_mac
from bootd.service.audit import AuditLog
from bootd.service.bulk import parse_bulk
from bootd.service.checks import Invalid, check_name, check_var, check_var_value
from bootd.service.events import state_update
from bootd.service.inventory import InventoryStore
from bootd.service.lifecycle import Actor, Lifecycle
from bootd.store.base import Event, NodeStore

STATES = ", ".join(s.value for s in State)

# Field -> what it must be, in the words of the error message.  Everything else is refused.
SETTABLE: dict[str, str] = {
    "group": "a group name",
    "capsule": "a capsule name, or null to inherit the group's",
    "kernel_args": "a string",
    "enabled": "true or false",
    "approved": "true or false",
    "approve": "true",
    "mac": "a MAC address such as 52:54:00:12:34:56",
    "vars": "an object of string values",
    "unset": "a list of variable names",
}


def _want(ok: bool, key: str, value: Any) -> None:
    if not ok:
        raise Invalid(f"{key}: expected {SETTABLE[key]}, got {value!r}")


@dataclass(frozen=True, slots=True)
class NodeChange:
    """A validated change: store fields, variables to set and unset, and a forced state."""

    fields: dict[str, Any] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()
    state: State | None = None

    @classmethod
    def parse(cls, body: Any) -> NodeChange:
        """Validate a request (a JSON object, or what the CLI built from its options)."""
        if not isinstance(body, Mapping):
            raise Invalid("the change must be a JSON object such as {\"capsule\": \"rocky9\"}")
        unknown = sorted(str(k) for k in body if k not in SETTABLE)
        if unknown:
            raise Invalid(f"cannot set {', '.join(unknown)}; settable: {', '.join(SETTABLE)}")
        fields: dict[str, Any] = {}
        values: dict[str, str] = {}
        unset: tuple[str, ...] = ()
        state: State | None = None
        for key, value in body.items():
            if key in ("enabled", "approved"):
                _want(isinstance(value, bool), key, value)
                fields[key] = value
            elif key == "approve":
                _want(value is True, key, value)
                fields["approved"] = True
            elif key == "group":
                _want(isinstance(value, str) and value != "", key, value)
                check_name("group", value)
                fields["group"] = value
            elif key == "capsule":
                _want(value is None or (isinstance(value, str) and value != ""), key, value)
                if value is not None:
                    check_name("capsule", value)
                fields["capsule"] = value
            elif key == "kernel_args":
                _want(isinstance(value, str) and "\n" not in value, key, value)
                fields["kernel_args"] = value
            elif key == "mac":
                _want(isinstance(value, str), key, value)
                try:
                    fields["mac"] = normalize_mac(value)
                except ValueError as exc:
                    raise Invalid(f"mac: {exc}") from None
            elif key == "vars":
                _want(isinstance(value, Mapping) and all(isinstance(v, str) for v in value.values()), key, value)
                for k, v in value.items():
                    check_var(k)
                    if "\n" in v or "\0" in v:
                        raise Invalid(f"vars: the value of {k!r} must be one line")
                    check_var_value(k, v)
                    values[k] = v
            elif key == "unset":
                _want(isinstance(value, list | tuple) and all(isinstance(v, str) for v in value), key, value)
                for k in value:
                    check_var(k)
                unset = tuple(value)
        return cls(fields, values, unset, state)

    def __bool__(self) -> bool:
        return bool(self.fields or self.values or self.unset or self.state)


@dataclass(frozen=True, slots=True)
class NodeView:
    node: Node
    events: list[Event]
    # What the node inherits from its group (it sets none of these itself): name -> (value, "group G").
    inherited: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The stage one's commissioning report of its last boot (bootd.service.inventory), if any.
    inventory: dict[str, Any] | None = None
    # Its last heartbeat's usage report (memory, root, image RAM; "at": when), if this process took one.
    usage: dict[str, float] | None = None


class NodeAdmin:
    def __init__(self, store: NodeStore, lifecycle: Lifecycle, config: RegistryConfig, audit: AuditLog,
                 inventory: InventoryStore | None = None) -> None:
        self.inventory = inventory
        self.store = store
        self.lifecycle = lifecycle
        self.config = config
        self.audit = audit

    def reload(self, config: RegistryConfig) -> None:
        self.config = config

    # -- reads --------------------------------------------------------------------------
    async def select(self, hostlist: str | None = None, state: str | None = None) -> list[Node]:
        """Nodes named by a hostlist (all when None); every name must exist."""
        nodes = await self.store.list_nodes()
        if hostlist is not None:
            wanted = names(hostlist)
            by_name = {n.name: n for n in nodes}
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise NotFound(f"no such node(s): {compress(missing)}")
            nodes = [by_name[w] for w in wanted]
        if state is not None:
            nodes = [n for n in nodes if n.state.value == state]
        return nodes

    async def page(self, after: str, limit: int) -> list[Node]:
        """Nodes by name after ``after`` (exclusive), at most ``limit``: the admin API's pages."""
        nodes = await self.store.list_nodes()  # read on the store's own thread, in name order
        return [n for n in nodes if n.name > after][:limit]

    async def show(self, name: str, events: int = 50) -> NodeView:
        node = await self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}")
        group = await self.store.get_group(node.group)
        inherited: dict[str, tuple[str, str]] = {}
        if group is not None:
            source = f"group {group.name}"
            if node.capsule is None and group.capsule is not None:
                inherited["capsule"] = (group.capsule, source)
            if group.kernel_args:
                inherited["kernel_args"] = (group.kernel_args, source + " (before the node's own)")
            for key, value in group.vars.items():
                if key not in node.vars:
                    inherited[f"vars.{key}"] = (value, source)
        inventory = await self.inventory.get(node.mac) if self.inventory is not None else None
        return NodeView(node, await self.store.events(name, events), inherited, inventory,
                        self.lifecycle.usage(name))

    # -- writes -------------------------------------------------------------------------
    async def add(self, name: str, mac: str, body: Mapping[str, Any], now: float | None = None, *,
                  who: str) -> Node:
        check_name("name", name)
        try:
            mac = normalize_mac(mac)
        except ValueError as exc:
            raise Invalid(f"mac: {exc}") from None
        change = NodeChange.parse(body)
        fields = dict(change.fields)
        group = fields.pop("group", self.config.default_group)
        node = await self.store.add_node(mac, name, group=group, now=time.time() if now is None else now, **fields)
        if change.values:
            node = await self.store.set_vars(node.name, change.values)
        self.audit.record(who, "node.add", name, {"mac": mac, **_redacted(body)})
        return node

    async def add_many(self, body: str | list[Any], now: float | None = None, *, who: str) -> list[str]:
        """A bulk definition (bootd.service.bulk): every line checked, then all written in one transaction."""
        nodes = parse_bulk(body, self.config.default_group)
        groups = {g.name for g in await self.store.list_groups()}
        for n in nodes:
            if n.group not in groups:
                raise Invalid(f"line {n.line}: no group named {n.group!r} (create it with `bootd group add {n.group}`)")
        await self.store.add_nodes(nodes, now=time.time() if now is None else now)
        added = [n.name for n in nodes]
        self.audit.record(who, "node.add", plural(added), {"count": len(added)})
        return added

    async def report_inventory(self, name: str, raw: bytes, now: float) -> dict[str, Any]:
        """A node's commissioning report (it has proved it is ``name``): kept under its MAC, bounded."""
        node = await self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}")
        if self.inventory is None:
            raise NotFound("this bootd keeps no commissioning reports")
        return await self.inventory.put(node.mac, raw, now)

    async def rename_map(self, text: str, *, who: str) -> list[tuple[str, str]]:
        """``bootd node rename --map``: lines of 'MAC|SERIAL|ASSET-TAG NEW-NAME'; all checked, then applied.

        Racks are labelled by serial number or MAC, not by the n0042 a node got at
        first contact; the serial and asset tag come from the node's commissioning
        report (bootd.service.inventory).
        """
        wanted: list[tuple[int, str, str]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].split()
            if not line:
                continue
            if len(line) != 2:
                raise Invalid(f"line {number}: expected 'MAC|SERIAL|ASSET-TAG NEW-NAME'")
            try:
                check_name("name", line[1])
            except Invalid as exc:
                raise Invalid(f"line {number}: {exc}") from None
            wanted.append((number, line[0], line[1]))
        if not wanted:
            raise Invalid("no renames in the map; expected lines of 'MAC|SERIAL|ASSET-TAG NEW-NAME'")
        nodes = await self.store.list_nodes()
        index: dict[str, list[Node]] = {}
        for node in nodes:
            index.setdefault(node.mac, []).append(node)
        if self.inventory is not None and any(not _is_mac(key) for _, key, _ in wanted):
            # Only a map that names serials or asset tags reads every node's commissioning report.
            for node in nodes:
                report = await self.inventory.get(node.mac)
                for key in ("serial", "asset_tag"):
                    value = ((report or {}).get("dmi") or {}).get(key)
                    if value:
                        index.setdefault(str(value), []).append(node)
        names_now = {n.name for n in nodes}
        plan: list[tuple[str, str]] = []
        seen_new: dict[str, int] = {}
        seen_old: dict[str, int] = {}
        for number, key, new in wanted:
            try:
                key = normalize_mac(key)
            except ValueError:
                pass
            found = index.get(key, [])
            if not found:
                raise Invalid(f"line {number}: no node has MAC, serial or asset tag {key!r}")
            if len(found) > 1:
                raise Invalid(f"line {number}: {key!r} matches {plural([n.name for n in found])}; use the MAC")
            old = found[0].name
            for kind, value, seen in (("name", new, seen_new), ("node", old, seen_old)):
                first = seen.setdefault(value, number)
                if first != number:
                    raise Invalid(f"line {number}: {kind} {value} is already on line {first}")
            if new != old and new in names_now:
                raise Invalid(f"line {number}: a node named {new!r} already exists (to swap names, rename "
                              "through a temporary name)")
            if new != old:
                plan.append((old, new))
        for old, new in plan:
            await self.store.rename_node(old, new)
            self.lifecycle.forget(old)
        if plan:
            self.audit.record(who, "node.rename", plural([o for o, _ in plan]), {"to": plural([n for _, n in plan])})
        return plan

    async def change(self, hostlist: str, body: Mapping[str, Any], now: float | None = None, *,
                     who: str) -> list[Node]:
        """Apply one validated change to every node of the hostlist (all are checked to exist first)."""
        change = NodeChange.parse(body)
        if not change:
            raise Invalid("nothing to change; settable: " + ", ".join(SETTABLE))
        nodes = await self.select(hostlist)
        if "mac" in change.fields and len(nodes) != 1:
            raise Invalid("mac: a MAC can be set on exactly one node")
        now = time.time() if now is None else now
        done = [await self._apply(node, change, now) for node in nodes]
        self.audit.record(who, "node.set", plural([n.name for n in nodes]), _redacted(body))
        return done

    async def _apply(self, node: Node, change: NodeChange, now: float) -> Node:
        name = node.name
        if change.fields:
            node = await self.store.update_node(name, **change.fields)
        if change.values or change.unset:
            node = await self.store.set_vars(name, change.values, change.unset)
        if change.state is not None:
            node = await self.lifecycle.change(name, change.state, "set by administrator", actor=Actor.ADMIN,
                                               now=now)
        elif change.fields.get("enabled") is False and node.state is not State.DISABLED:
            node = await self.lifecycle.change(name, State.DISABLED, "disabled by admin", actor=Actor.ADMIN,
                                               now=now)
        elif change.fields.get("enabled") is True and node.state is State.DISABLED:
            node = await self.lifecycle.change(name, State.DISCOVERED, "enabled by admin", actor=Actor.ADMIN,
                                               now=now)
        else:
            self.lifecycle.events.publish(state_update(node))  # approved, group: the status page shows them
        return node

    async def force_state(self, hostlist: str, state: str, now: float | None = None, *, who: str) -> list[Node]:
        """``bootd node set --state``: the administrator overrides the lifecycle (a CLI-only escape hatch:
        the admin API does not offer it, so a leaked API token cannot rewrite the cluster's states)."""
        try:
            new = State(state)
        except ValueError:
            raise Invalid(f"state: expected one of {STATES}, got {state!r}") from None
        now = time.time() if now is None else now
        nodes = await self.select(hostlist)
        done = [await self.lifecycle.change(n.name, new, "set by administrator", actor=Actor.ADMIN, now=now)
                for n in nodes]
        self.audit.record(who, "node.state", plural([n.name for n in nodes]), {"state": new.value})
        return done

    async def approve(self, hostlist: str, *, who: str) -> list[Node]:
        return await self.change(hostlist, {"approve": True}, who=who)

    async def delete(self, hostlist: str, *, who: str) -> list[str]:
        nodes = await self.select(hostlist)
        for node in nodes:
            await self.store.delete_node(node.name)
            self.lifecycle.forget(node.name)
            self.lifecycle.events.publish({"t": "removed", "node": node.name})
        self.audit.record(who, "node.delete", plural([n.name for n in nodes]))
        return [n.name for n in nodes]

    # -- groups and leases --------------------------------------------------------------
    async def groups(self) -> list[tuple[Group, list[str]]]:
        members: dict[str, list[str]] = {}
        for n in await self.store.list_nodes():
            members.setdefault(n.group, []).append(n.name)
        return [(g, members.get(g.name, [])) for g in await self.store.list_groups()]

    async def group(self, name: str) -> tuple[Group, list[str]]:
        group = await self.store.get_group(name)
        if group is None:
            raise NotFound(f"no group named {name!r}")
        return group, [n.name for n in await self.store.list_nodes() if n.group == name]

    async def put_group(self, name: str, body: Mapping[str, Any], *, create: bool | None, who: str) -> Group:
        """``create``: the group must not exist yet (``add``); False: it must exist (``set``); None: either
        (the API's PUT)."""
        check_name("group", name)
        old = await self.store.get_group(name)
        if create and old is not None:
            raise Invalid(f"group {name!r} already exists (use `bootd group set`)")
        if create is False and old is None:
            raise NotFound(f"no group named {name!r} (use `bootd group add`)")
        allowed = {"capsule": "a capsule name, or null", "kernel_args": "a string", "description": "a string",
                   "vars": "an object of string values", "unset": "a list of variable names"}
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise Invalid(f"cannot set {', '.join(unknown)} on a group; settable: {', '.join(allowed)}")
        base = old or Group(name)
        capsule = body.get("capsule", base.capsule)
        if capsule is not None:
            if not isinstance(capsule, str) or not capsule:
                raise Invalid(f"capsule: expected {allowed['capsule']}, got {capsule!r}")
            check_name("capsule", capsule)
        for key in ("kernel_args", "description"):
            if key in body and not isinstance(body[key], str):
                raise Invalid(f"{key}: expected a string, got {body[key]!r}")
        # Variables are validated exactly as a node's are.
        change = NodeChange.parse({k: body[k] for k in ("vars", "unset") if k in body})
        values = {k: v for k, v in {**base.vars, **change.values}.items() if k not in change.unset}
        group = await self.store.put_group(Group(
            name=name, capsule=capsule,
            kernel_args=body.get("kernel_args", base.kernel_args),
            description=body.get("description", base.description),
            vars=values,
        ))
        self.audit.record(who, "group.set" if old is not None else "group.add", name, _redacted(body))
        return group

    async def delete_group(self, name: str, *, who: str) -> None:
        await self.store.delete_group(name)
        self.audit.record(who, "group.delete", name)

    async def leases(self) -> list[Lease]:
        return await self.store.list_leases()


def _is_mac(text: str) -> bool:
    try:
        normalize_mac(text)
    except ValueError:
        return False
    return True


def _redacted(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of a change: variable values may be site secrets, so only their names."""
    out = dict(body)
    if isinstance(out.get("vars"), Mapping):
        out["vars"] = sorted(out["vars"])
    return out


def names(expr: str) -> list[str]:
    try:
        return expand(expr)
    except HostlistError as exc:
        raise Invalid(f"bad hostlist: {exc}") from None


def plural(names_: Sequence[str]) -> str:
    return compress(list(names_))
