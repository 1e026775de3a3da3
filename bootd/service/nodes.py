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

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootd.config import RegistryConfig
from bootd.errors import BootdError, NotFound
from bootd.hostlist import HostlistError, compress, expand
from bootd.model import Group, Lease, Node, State, normalize_mac
from bootd.service.audit import AuditLog
from bootd.service.lifecycle import Actor, Lifecycle
from bootd.store.base import Event, NodeStore

_VAR_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
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


class Invalid(BootdError):
    """An administrator's request that is malformed: nothing of it was applied."""


def _want(ok: bool, key: str, value: Any) -> None:
    if not ok:
        raise Invalid(f"{key}: expected {SETTABLE[key]}, got {value!r}")


def _check_name(kind: str, value: str) -> None:
    if not _NAME.fullmatch(value):
        raise Invalid(f"{kind}: {value!r} is not a valid name (letters, digits, '.', '_', '-'; up to 63 characters, "
                      "starting with a letter or digit)")


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
                _check_name("group", value)
                fields["group"] = value
            elif key == "capsule":
                _want(value is None or (isinstance(value, str) and value != ""), key, value)
                if value is not None:
                    _check_name("capsule", value)
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
                    _check_var(k)
                    if "\n" in v or "\0" in v:
                        raise Invalid(f"vars: the value of {k!r} must be one line")
                    values[k] = v
            elif key == "unset":
                _want(isinstance(value, list | tuple) and all(isinstance(v, str) for v in value), key, value)
                for k in value:
                    _check_var(k)
                unset = tuple(value)
        return cls(fields, values, unset, state)

    def __bool__(self) -> bool:
        return bool(self.fields or self.values or self.unset or self.state)


def _check_var(key: Any) -> None:
    if not isinstance(key, str) or not _VAR_KEY.fullmatch(key):
        raise Invalid(f"vars: {key!r} is not a valid variable name (a letter or '_', then letters, digits, "
                      "'_', '.', '-')")
    if key.lower() == "bmc.password":
        raise Invalid("vars: a BMC password is not a variable (variables are shown by `node show` and the API); "
                      "set it with `bootd bmc set-password NODE|@GROUP`")


@dataclass(frozen=True, slots=True)
class NodeView:
    node: Node
    events: list[Event]
    # What the node inherits from its group (it sets none of these itself): name -> (value, "group G").
    inherited: dict[str, tuple[str, str]] = field(default_factory=dict)


class NodeAdmin:
    def __init__(self, store: NodeStore, lifecycle: Lifecycle, config: RegistryConfig, audit: AuditLog) -> None:
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
        return NodeView(node, await self.store.events(name, events), inherited)

    # -- writes -------------------------------------------------------------------------
    async def add(self, name: str, mac: str, body: Mapping[str, Any], now: float | None = None, *,
                  who: str) -> Node:
        _check_name("name", name)
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

    async def put_group(self, name: str, body: Mapping[str, Any], *, create: bool, who: str) -> Group:
        """``create``: the group must not exist yet (``add``); else it must exist (``set``)."""
        _check_name("group", name)
        old = await self.store.get_group(name)
        if create and old is not None:
            raise Invalid(f"group {name!r} already exists (use `bootd group set`)")
        if not create and old is None:
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
            _check_name("capsule", capsule)
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
        self.audit.record(who, "group.add" if create else "group.set", name, _redacted(body))
        return group

    async def delete_group(self, name: str, *, who: str) -> None:
        await self.store.delete_group(name)
        self.audit.record(who, "group.delete", name)

    async def leases(self) -> list[Lease]:
        return await self.store.list_leases()


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
