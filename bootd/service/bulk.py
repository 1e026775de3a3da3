"""Bulk node definitions: a file of many nodes, checked whole before any of it is written.

A site defines a rack from a spreadsheet export or its inventory system, often
a thousand lines at once.  Half a rack defined is worse than none (the admin
must then find which half), so a definition is parsed and checked completely
here, every error naming its line, and the store writes all of it in one
transaction (:meth:`bootd.store.base.NodeStore.add_nodes`) or nothing.

Two shapes carry the same thing: text lines (``name mac [ip=A] [group=G]
[capsule=C] [bmc=ADDR] [KEY=VALUE...]``, ``#`` comments, blank lines skipped)
for files, and a JSON list of objects for programs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from bootd.model import normalize_mac
from bootd.service.checks import Invalid, check_name, check_var, check_var_value
from bootd.store.base import NewNode

MAX_NODES = 10_000  # one definition; a bigger site sends several
_KEYS = ("name", "mac", "ip", "group", "capsule", "kernel_args", "bmc", "vars")
FORMAT = ("one node per line: NAME MAC [ip=ADDRESS] [group=G] [capsule=C] [bmc=BMC-ADDRESS] [KEY=VALUE...]; "
          "or a JSON list of objects with name, mac and optionally ip, group, capsule, kernel_args, bmc, vars")


def parse_lines(text: str) -> list[tuple[int, dict[str, Any]]]:
    """Text lines -> (line number, object) in the JSON shape, so one checker serves both."""
    out: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.replace(",", " ").split()
        if len(words) < 2 or "=" in words[0] or "=" in words[1]:
            raise Invalid(f"line {number}: expected NAME MAC first; {FORMAT}")
        entry: dict[str, Any] = {"name": words[0], "mac": words[1]}
        extra: dict[str, str] = {}
        for word in words[2:]:
            key, eq, value = word.partition("=")
            if not eq or not key:
                raise Invalid(f"line {number}: {word!r} is not KEY=VALUE; {FORMAT}")
            if key in ("ip", "group", "capsule", "bmc", "kernel_args"):
                entry[key] = value
            else:
                extra[key] = value
        if extra:
            entry["vars"] = extra
        out.append((number, entry))
    return out


def _entry(line: int, entry: Any, default_group: str) -> NewNode:
    where = f"line {line}"
    if not isinstance(entry, Mapping):
        raise Invalid(f"{where}: expected an object with name and mac")
    unknown = sorted(str(k) for k in entry if k not in _KEYS)
    if unknown:
        raise Invalid(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_KEYS)}")
    name, mac = entry.get("name"), entry.get("mac")
    if not isinstance(name, str) or not isinstance(mac, str):
        raise Invalid(f"{where}: name and mac are required strings")
    try:
        check_name("name", name)
        mac = normalize_mac(mac)
        ip = entry.get("ip")
        if ip is not None:
            if not isinstance(ip, str):
                raise Invalid(f"ip: expected an IPv4 address, got {ip!r}")
            try:
                ip = str(ipaddress.IPv4Address(ip))
            except ValueError:
                raise Invalid(f"ip: {ip!r} is not an IPv4 address") from None
        group = entry.get("group", default_group)
        if not isinstance(group, str):
            raise Invalid(f"group: expected a group name, got {group!r}")
        check_name("group", group)
        capsule = entry.get("capsule")
        if capsule is not None:
            if not isinstance(capsule, str):
                raise Invalid(f"capsule: expected a capsule name, got {capsule!r}")
            check_name("capsule", capsule)
        kernel_args = entry.get("kernel_args", "")
        if not isinstance(kernel_args, str) or "\n" in kernel_args:
            raise Invalid(f"kernel_args: expected one line of text, got {kernel_args!r}")
        values = entry.get("vars", {})
        if not isinstance(values, Mapping) or not all(isinstance(v, str) and "\n" not in v for v in values.values()):
            raise Invalid("vars: expected an object of one-line string values")
        values = dict(values)
        for key in values:
            check_var(key)
            check_var_value(key, values[key])
        bmc = entry.get("bmc")
        if bmc is not None:
            if not isinstance(bmc, str) or not bmc or any(c.isspace() for c in bmc):
                raise Invalid(f"bmc: expected a BMC address (host name or IP), got {bmc!r}")
            values["bmc.address"] = bmc
    except (Invalid, ValueError) as exc:
        raise Invalid(f"{where}: {exc}") from None
    return NewNode(line=line, name=name, mac=mac, group=group, capsule=capsule, ip=ip,
                   kernel_args=kernel_args, vars=values)


def parse_bulk(body: str | list[Any], default_group: str) -> list[NewNode]:
    """Check a whole definition; the first error names its line and nothing is returned."""
    entries = parse_lines(body) if isinstance(body, str) else list(enumerate(body, start=1))
    if not entries:
        raise Invalid(f"no nodes in the definition; {FORMAT}")
    if len(entries) > MAX_NODES:
        raise Invalid(f"{len(entries)} nodes in one definition; at most {MAX_NODES}: split the file")
    nodes = [_entry(line, entry, default_group) for line, entry in entries]
    seen: dict[tuple[str, str], int] = {}
    for n in nodes:
        for kind, value in (("name", n.name), ("MAC", n.mac), ("address", n.ip)):
            if value is None:
                continue
            first = seen.setdefault((kind, value), n.line)
            if first != n.line:
                raise Invalid(f"line {n.line}: {kind} {value} is already on line {first}")
    return nodes
