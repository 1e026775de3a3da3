"""``bootd node``, ``bootd group`` and ``bootd lease``: the registry from the shell.

The CLI opens the SQLite file directly (WAL lets it work beside a running
daemon); every write is its own short transaction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from bootd.config import Config
from bootd.errors import BootdError, NotFound
from bootd.hostlist import HostlistError, compress, expand
from bootd.model import Group, Node, State, node_json, normalize_mac
from bootd.store.sqlite import SqliteRepo


def _repo(config: Config, *, write: bool = True) -> SqliteRepo:
    """Read commands open read-only, so they work on a read-only state directory too."""
    readonly = not write and config.db_path.exists()  # a first read on a new install creates the registry
    return SqliteRepo(config.db_path, default_group=config.registry.default_group, readonly=readonly)


def _names(expr: str) -> list[str]:
    try:
        return expand(expr)
    except HostlistError as exc:
        raise BootdError(f"bad hostlist: {exc}") from None


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "never"
    delta = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _select(repo: SqliteRepo, expr: str | None) -> list[Node]:
    nodes = repo.list_nodes()
    if expr is None:
        return nodes
    wanted = _names(expr)
    by_name = {n.name: n for n in nodes}
    missing = [w for w in wanted if w not in by_name]
    if missing:
        raise NotFound(f"no such node(s): {compress(missing)}")
    return [by_name[w] for w in wanted]


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# -- node ---------------------------------------------------------------------------
def node_list(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config, write=False)
    nodes = _select(repo, args.nodes)
    if args.state:
        nodes = [n for n in nodes if n.state.value == args.state]
    if args.json:
        _print_json([node_json(n) for n in nodes])
        return 0
    now = time.time()
    rows = [(n.name, n.mac, n.group, n.capsule, n.state.value + ("" if n.enabled else " (disabled)"),
             n.ip, _ago(n.last_contact, now), n.reason) for n in nodes]
    print(table(rows, ("NAME", "MAC", "GROUP", "CAPSULE", "STATE", "IP", "LAST CONTACT", "REASON")))
    return 0


def node_show(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config, write=False)
    nodes = _select(repo, args.nodes)
    if args.json:
        out = []
        for n in nodes:
            data = node_json(n)
            data["events"] = [dataclasses.asdict(e) for e in repo.events(n.name)]
            out.append(data)
        _print_json(out)
        return 0
    for n in nodes:
        for key, value in node_json(n).items():
            print(f"{key:14} {value}")
        events = repo.events(n.name, limit=args.events)
        if events:
            t0 = events[0].ts
            print("timeline:")
            for e in events:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
                extra = " ".join(x for x in (e.reason, e.detail) if x)
                print(f"  {stamp}  +{e.ts - t0:7.1f}s  {e.state:10} {extra}".rstrip())
        print()
    return 0


def _node_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if getattr(args, "group", None):
        fields["group"] = args.group
    if getattr(args, "no_capsule", False):
        fields["capsule"] = None
    elif getattr(args, "capsule", None):
        fields["capsule"] = args.capsule
    if getattr(args, "kernel_args", None) is not None:
        fields["kernel_args"] = args.kernel_args
    if getattr(args, "enable", None) is not None:
        fields["enabled"] = args.enable
    return fields


def _vars(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BootdError(f"bad --var {item!r}; expected KEY=VALUE")
        out[key] = value
    return out


def node_add(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config)
    try:
        mac = normalize_mac(args.mac)
    except ValueError as exc:
        raise BootdError(str(exc)) from None
    fields = _node_fields(args)
    fields.pop("group", None)
    node = repo.add_node(mac, args.name, group=args.group or config.registry.default_group, now=time.time(),
                         **fields)
    if args.var:
        node = repo.set_vars(node.name, _vars(args.var))
    print(f"added {node.name} ({node.mac}) in group {node.group}")
    return 0


def node_set(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config)
    nodes = _select(repo, args.nodes)
    fields = _node_fields(args)
    if args.approve:
        fields["approved"] = True
    if args.mac:
        if len(nodes) != 1:
            raise BootdError("--mac needs exactly one node")
        fields["mac"] = args.mac
    values, unset = _vars(args.var or []), tuple(args.unset or [])
    if not fields and not values and not unset and not args.state:
        raise BootdError("nothing to set; see `bootd node set --help`")
    for n in nodes:
        if fields:
            repo.update_node(n.name, **fields)
        if values or unset:
            repo.set_vars(n.name, values, unset)
        if args.state:
            repo.set_state(n.name, State(args.state), "set by administrator", now=time.time())
    print(f"updated {compress([n.name for n in nodes])}")
    return 0


def node_approve(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config)
    nodes = _select(repo, args.nodes)
    for n in nodes:
        repo.update_node(n.name, approved=True)
    print(f"approved {compress([n.name for n in nodes])}")
    return 0


def node_delete(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config)
    nodes = _select(repo, args.nodes)
    for n in nodes:
        repo.delete_node(n.name)
    print(f"deleted {compress([n.name for n in nodes])}")
    return 0


# -- group --------------------------------------------------------------------------
def group_list(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config, write=False)
    groups = repo.list_groups()
    counts: dict[str, int] = {}
    for n in repo.list_nodes():
        counts[n.group] = counts.get(n.group, 0) + 1
    if args.json:
        _print_json([dataclasses.asdict(g) | {"nodes": counts.get(g.name, 0)} for g in groups])
        return 0
    rows = [(g.name, g.capsule, counts.get(g.name, 0), g.kernel_args, g.description) for g in groups]
    print(table(rows, ("GROUP", "CAPSULE", "NODES", "KERNEL ARGS", "DESCRIPTION")))
    return 0


def group_show(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config, write=False)
    group = repo.get_group(args.name)
    if group is None:
        raise NotFound(f"no group named {args.name!r}")
    members = [n.name for n in repo.list_nodes() if n.group == group.name]
    data = dataclasses.asdict(group) | {"nodes": members}
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key:12} {compress(value) if key == 'nodes' and value else value}")
    return 0


def group_put(args: argparse.Namespace, config: Config) -> int:
    repo = _repo(config)
    old = repo.get_group(args.name)
    if args.command_name == "add" and old is not None:
        raise BootdError(f"group {args.name!r} already exists (use `bootd group set`)")
    if args.command_name == "set" and old is None:
        raise NotFound(f"no group named {args.name!r} (use `bootd group add`)")
    base = old or Group(args.name)
    capsule = None if args.no_capsule else (args.capsule if args.capsule is not None else base.capsule)
    group = Group(
        name=args.name,
        capsule=capsule,
        kernel_args=args.kernel_args if args.kernel_args is not None else base.kernel_args,
        description=args.description if args.description is not None else base.description,
    )
    repo.put_group(group)
    print(f"{'added' if old is None else 'updated'} group {group.name}")
    return 0


def group_delete(args: argparse.Namespace, config: Config) -> int:
    _repo(config).delete_group(args.name)
    print(f"deleted group {args.name}")
    return 0


def lease_list(args: argparse.Namespace, config: Config) -> int:
    leases = _repo(config, write=False).list_leases()
    if args.json:
        _print_json([dataclasses.asdict(x) for x in leases])
        return 0
    now = time.time()
    rows = [(x.ip, x.mac, x.hostname, f"in {x.expires - now:.0f}s" if x.expires > now else "expired")
            for x in leases]
    print(table(rows, ("IP", "MAC", "HOSTNAME", "EXPIRES")))
    return 0


def add_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="list, show, add, change and delete nodes")
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    hostlist_help = "nodes as a hostlist, e.g. n[0000-0015],n0020"

    p = nsub.add_parser("list", help="list nodes and their lifecycle state")
    p.add_argument("nodes", nargs="?", help=hostlist_help)
    p.add_argument("--state", choices=[s.value for s in State], help="only nodes in this state")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=node_list)

    p = nsub.add_parser("show", help="show nodes with their boot timeline")
    p.add_argument("nodes", help=hostlist_help)
    p.add_argument("--events", type=int, default=30, help="timeline entries to show (default 30)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=node_show)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--group", help="group (its capsule and kernel args are inherited)")
        p.add_argument("--capsule", help="capsule name (overrides the group's)")
        p.add_argument("--kernel-args", help="extra kernel command line arguments")
        p.add_argument("--var", action="append", metavar="KEY=VALUE", help="per-node key/value (repeatable)")

    p = nsub.add_parser("add", help="register a node by hand")
    p.add_argument("name")
    p.add_argument("--mac", required=True, help="MAC address, e.g. 52:54:00:12:34:56")
    common(p)
    p.set_defaults(handler=node_add)

    p = nsub.add_parser("set", help="change nodes")
    p.add_argument("nodes", help=hostlist_help)
    common(p)
    p.add_argument("--no-capsule", action="store_true", help="clear the node's capsule (inherit the group's)")
    p.add_argument("--mac", help="replace the MAC (one node only)")
    p.add_argument("--enable", dest="enable", action="store_true", default=None, help="allow booting")
    p.add_argument("--disable", dest="enable", action="store_false", help="refuse to boot it")
    p.add_argument("--approve", action="store_true", help="approve nodes waiting in approve-first mode")
    p.add_argument("--unset", action="append", metavar="KEY", help="remove a per-node key (repeatable)")
    p.add_argument("--state", choices=[s.value for s in State], help="force the lifecycle state")
    p.set_defaults(handler=node_set)

    p = nsub.add_parser("approve", help="approve nodes waiting in approve-first mode")
    p.add_argument("nodes", help=hostlist_help)
    p.set_defaults(handler=node_approve)

    p = nsub.add_parser("delete", help="delete nodes (and their leases)")
    p.add_argument("nodes", help=hostlist_help)
    p.set_defaults(handler=node_delete)

    group = sub.add_parser("group", help="node groups and their defaults")
    gsub = group.add_subparsers(dest="group_command", metavar="ACTION", required=True)
    p = gsub.add_parser("list", help="list groups")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=group_list)
    p = gsub.add_parser("show", help="show a group and its nodes")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=group_show)
    for action in ("add", "set"):
        p = gsub.add_parser(action, help=f"{action} a group")
        p.add_argument("name")
        p.add_argument("--capsule", help="default capsule for the group's nodes")
        p.add_argument("--no-capsule", action="store_true", help="clear the default capsule")
        p.add_argument("--kernel-args", help="kernel arguments for the group's nodes")
        p.add_argument("--description")
        p.set_defaults(handler=group_put, command_name=action)
    p = gsub.add_parser("delete", help="delete an empty group")
    p.add_argument("name")
    p.set_defaults(handler=group_delete)

    lease = sub.add_parser("lease", help="DHCP leases")
    lsub = lease.add_subparsers(dest="lease_command", metavar="ACTION", required=True)
    p = lsub.add_parser("list", help="list leases")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lease_list)
