"""``bootd node``, ``bootd group`` and ``bootd lease``: the registry from the shell.

Every command builds the same services as the daemon, in-process, over the
store (bootd.compose.open_services): a change from the CLI and the same change
from the admin API are validated, applied and refused by the same code
(bootd.service.nodes).  It works with the daemon stopped; beside a running
daemon, SQLite's WAL and the lifecycle's compare-and-set keep both honest.
Read commands open the store read-only, so they also work on a read-only
state directory.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bootd.compose import open_services
from bootd.config import Config
from bootd.hostlist import compress
from bootd.model import Node, State, node_json
from bootd.service.audit import cli_user
from bootd.service.checks import Invalid
from bootd.service.services import Services

T = TypeVar("T")


def _run(config: Config, job: Callable[[Services], Awaitable[T]], *, write: bool = True) -> T:
    """Run one command's work against the services; reads open the registry read-only."""
    readonly = not write and config.db_path.exists()  # a first read on a new install creates the registry

    async def main() -> T:
        async with open_services(config, readonly=readonly) as services:
            return await job(services)

    return asyncio.run(main())


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


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


# -- node ---------------------------------------------------------------------------
def node_list(args: argparse.Namespace, config: Config) -> int:
    nodes = _run(config, lambda s: s.nodes.select(args.nodes, args.state), write=False)
    if args.json:
        _print_json([node_json(n) for n in nodes])
        return 0
    now = time.time()
    rows = [(n.name, n.mac, n.group, n.capsule, n.state.value + ("" if n.enabled else " (disabled)"),
             n.ip, _ago(n.last_contact, now), n.reason) for n in nodes]
    print(table(rows, ("NAME", "MAC", "GROUP", "CAPSULE", "STATE", "IP", "LAST CONTACT", "REASON")))
    return 0


def node_show(args: argparse.Namespace, config: Config) -> int:
    async def job(s: Services) -> list[Any]:
        return [await s.nodes.show(n.name, args.events if not args.json else 100)
                for n in await s.nodes.select(args.nodes)]

    views = _run(config, job, write=False)
    if args.json:
        _print_json([node_json(v.node) | {"events": [dataclasses.asdict(e) for e in v.events],
                                           "inherited": {k: {"value": val, "from": src}
                                                         for k, (val, src) in v.inherited.items()},
                                           "inventory": v.inventory}
                     for v in views])
        return 0
    for v in views:
        for key, value in node_json(v.node).items():
            print(f"{key:14} {value}")
        for key, (value, source) in v.inherited.items():
            print(f"{key:14} {value}   (from {source})")
        for line in hardware_lines(v.inventory):
            print(line)
        if v.events:
            t0 = v.events[0].ts
            print("timeline:")
            for e in v.events:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.ts))
                extra = " ".join(x for x in (e.reason, e.detail) if x)
                print(f"  {stamp}  +{e.ts - t0:7.1f}s  {e.state:10} {extra}".rstrip())
        print()
    return 0


def hardware_lines(inv: dict[str, Any] | None) -> list[str]:
    """The commissioning report as `node show` prints it: one line per kind of part."""
    if not inv:
        return []
    dmi = inv.get("dmi") or {}
    out = [f"{'hardware':14} " + " ".join(f"{k}={dmi[k]}" for k in ("vendor", "product", "serial", "asset_tag")
                                            if dmi.get(k))]
    mem = inv.get("memory_kb")
    out.append(f"{'cpus':14} {inv.get('cpus') or '?'} x {inv.get('cpu_model') or '?'}; memory "
               f"{(mem or 0) // 1024} MiB")
    for nic in inv.get("nics") or []:
        speed = f" {nic['speed_mbps']} Mb/s" if nic.get("speed_mbps") else ""
        out.append(f"{'nic':14} {nic.get('name')} {nic.get('mac')} link={nic.get('link')}{speed}")
    for disk in inv.get("disks") or []:
        size = (disk.get("size_bytes") or 0) / 1e9
        out.append(f"{'disk':14} {disk.get('name')} {size:.1f} GB {disk.get('model') or ''}".rstrip())
    return out


def node_rename(args: argparse.Namespace, config: Config) -> int:
    try:
        text = sys.stdin.read() if args.map == "-" else Path(args.map).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"bootd: cannot read {args.map}: {exc}", file=sys.stderr)
        return 1
    plan = _run(config, lambda s: s.nodes.rename_map(text, who=cli_user()))
    for old, new in plan:
        print(f"renamed {old} -> {new}")
    if not plan:
        print("nothing to rename (every node already has its name)")
    return 0


def _change(args: argparse.Namespace) -> dict[str, Any]:
    """The options as the admin API's JSON body, so bootd.service.nodes validates both alike."""
    body: dict[str, Any] = {}
    if getattr(args, "group", None):
        body["group"] = args.group
    if getattr(args, "no_capsule", False):
        body["capsule"] = None
    elif getattr(args, "capsule", None):
        body["capsule"] = args.capsule
    if getattr(args, "kernel_args", None) is not None:
        body["kernel_args"] = args.kernel_args
    if getattr(args, "enable", None) is not None:
        body["enabled"] = args.enable
    if getattr(args, "approve", False):
        body["approve"] = True
    if getattr(args, "mac", None) and args.node_command == "set":
        body["mac"] = args.mac
    if getattr(args, "var", None) or getattr(args, "overlay", None):
        body["vars"] = _vars(args.var or [])
        if getattr(args, "overlay", None):
            body["vars"]["overlays"] = ",".join(args.overlay)
    if getattr(args, "unset", None):
        body["unset"] = list(args.unset)
    return body


def _vars(items: Iterable[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise Invalid(f"bad --var {item!r}; expected KEY=VALUE")
        out[key] = value
    return out


def node_add(args: argparse.Namespace, config: Config) -> int:
    node = _run(config, lambda s: s.nodes.add(args.name, args.mac, _change(args), who=cli_user()))
    print(f"added {node.name} ({node.mac}) in group {node.group}")
    return 0


def node_import(args: argparse.Namespace, config: Config) -> int:
    """A bulk definition file (bootd.service.bulk): all of it, or nothing and the line that is wrong."""
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"bootd: cannot read {args.file}: {exc}", file=sys.stderr)
        return 1
    added = _run(config, lambda s: s.nodes.add_many(text, who=cli_user()))
    print(f"added {len(added)} nodes: {compress(added)}")
    return 0


def node_set(args: argparse.Namespace, config: Config) -> int:
    body = _change(args)

    async def job(s: Services) -> list[Node]:
        nodes = await s.nodes.change(args.nodes, body, who=cli_user()) if body or not args.state else []
        if args.state:
            nodes = await s.nodes.force_state(args.nodes, args.state, who=cli_user())
        return nodes

    nodes = _run(config, job)
    print(f"updated {compress([n.name for n in nodes])}")
    return 0


def node_approve(args: argparse.Namespace, config: Config) -> int:
    nodes = _run(config, lambda s: s.nodes.approve(args.nodes, who=cli_user()))
    print(f"approved {compress([n.name for n in nodes])}")
    return 0


def node_delete(args: argparse.Namespace, config: Config) -> int:
    names = _run(config, lambda s: s.nodes.delete(args.nodes, who=cli_user()))
    print(f"deleted {compress(names)}")
    return 0


# -- group --------------------------------------------------------------------------
def group_list(args: argparse.Namespace, config: Config) -> int:
    groups = _run(config, lambda s: s.nodes.groups(), write=False)
    if args.json:
        _print_json([dataclasses.asdict(g) | {"nodes": len(m)} for g, m in groups])
        return 0
    rows = [(g.name, g.capsule, len(m), g.kernel_args, g.description) for g, m in groups]
    print(table(rows, ("GROUP", "CAPSULE", "NODES", "KERNEL ARGS", "DESCRIPTION")))
    return 0


def group_show(args: argparse.Namespace, config: Config) -> int:
    group, members = _run(config, lambda s: s.nodes.group(args.name), write=False)
    data = dataclasses.asdict(group) | {"nodes": members}
    if args.json:
        _print_json(data)
    else:
        for key, value in data.items():
            print(f"{key:12} {compress(value) if key == 'nodes' and value else value}")
    return 0


def group_put(args: argparse.Namespace, config: Config) -> int:
    body: dict[str, Any] = {}
    if args.no_capsule:
        body["capsule"] = None
    elif args.capsule is not None:
        body["capsule"] = args.capsule
    for key in ("kernel_args", "description"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.var or args.overlay:
        body["vars"] = _vars(args.var or [])
        if args.overlay:
            body["vars"]["overlays"] = ",".join(args.overlay)
    if args.unset:
        body["unset"] = list(args.unset)
    create = args.command_name == "add"
    group = _run(config, lambda s: s.nodes.put_group(args.name, body, create=create, who=cli_user()))
    print(f"{'added' if create else 'updated'} group {group.name}")
    return 0


def group_delete(args: argparse.Namespace, config: Config) -> int:
    _run(config, lambda s: s.nodes.delete_group(args.name, who=cli_user()))
    print(f"deleted group {args.name}")
    return 0


def lease_list(args: argparse.Namespace, config: Config) -> int:
    leases = _run(config, lambda s: s.nodes.leases(), write=False)
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
        p.add_argument("--overlay", action="append", metavar="NAME",
                       help="the node's overlays, in order (repeatable; overrides the group's)")

    p = nsub.add_parser("add", help="register a node by hand")
    p.add_argument("name")
    p.add_argument("--mac", required=True, help="MAC address, e.g. 52:54:00:12:34:56")
    common(p)
    p.set_defaults(handler=node_add)

    p = nsub.add_parser("import", help="define many nodes from a file: NAME MAC [ip=A] [group=G] [capsule=C] "
                                       "[bmc=ADDR] [KEY=VALUE...] per line; all or nothing")
    p.add_argument("file", metavar="FILE", help="the definition ('-' for stdin)")
    p.set_defaults(handler=node_import)

    p = nsub.add_parser("rename", help="rename nodes by MAC, serial or asset tag (from commissioning)")
    p.add_argument("--map", required=True, metavar="FILE",
                   help="lines of 'MAC|SERIAL|ASSET-TAG NEW-NAME' ('-' for stdin); all checked before any rename")
    p.set_defaults(handler=node_rename)

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
        p.add_argument("--var", action="append", metavar="KEY=VALUE",
                       help="a variable the group's nodes inherit (a node's own wins; repeatable)")
        p.add_argument("--unset", action="append", metavar="KEY", help="remove a group variable (repeatable)")
        p.add_argument("--overlay", action="append", metavar="NAME",
                       help="the overlays of the group's nodes, in order (repeatable; default: the shipped set)")
        p.set_defaults(handler=group_put, command_name=action)
    p = gsub.add_parser("delete", help="delete an empty group")
    p.add_argument("name")
    p.set_defaults(handler=group_delete)

    lease = sub.add_parser("lease", help="DHCP leases")
    lsub = lease.add_subparsers(dest="lease_command", metavar="ACTION", required=True)
    p = lsub.add_parser("list", help="list leases")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=lease_list)
