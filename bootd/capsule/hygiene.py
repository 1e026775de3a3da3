"""Image hygiene: what no node image should carry, dropped on every build, import and exec.

A capsule is booted by many nodes at once, so anything that identifies one
machine would be shared by all of them: ssh host keys (every node would
present the same key), ``/etc/machine-id`` (journald, DHCP client ids and
D-Bus would collide), and the resolver and host name of the master the image
was built on. apt's package lists and caches are dropped too: they are tens of
megabytes a node would hold in RAM for nothing. (The overlay step gives each
node its own keys and id.)

It works on the importer's entry list, not on the source, so importing an
administrator's directory never changes that directory. ``/etc/machine-id`` is
kept as an empty file, as Debian ships it (mmdebstrap and the cloud images do
the same): systemd then generates an id at boot and treats the boot as the
first one.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bootd.capsule.archive import LNK, REG, Entry

# Directories whose contents go; the directories and these names in them stay (apt expects them).
_EMPTIED = ((b"var/lib/apt/lists", {b"lock", b"partial", b"auxfiles"}),
            (b"var/cache/apt/archives", {b"lock", b"partial"}))
_REMOVED_GLOBS = (b"etc/ssh/ssh_host_*_key", b"etc/ssh/ssh_host_*_key.pub", b"var/lib/dbus/machine-id")
# Files removed when they hold the master's own content (mmdebstrap copies both in).
_MASTER_FILES = (b"etc/resolv.conf", b"etc/hostname")


@dataclass
class HygieneReport:
    removed: list[tuple[str, str, int]] = field(default_factory=list)  # (path, why, bytes)
    emptied: list[str] = field(default_factory=list)

    def add(self, e: Entry, why: str) -> None:
        self.removed.append(("/" + e.path.decode("utf-8", "surrogateescape"), why,
                             e.size if e.kind == REG else 0))

    def summary(self) -> list[str]:
        """One line per reason: count and bytes, then the emptied files."""
        by_why: dict[str, tuple[int, int]] = {}
        for _, why, size in self.removed:
            n, b = by_why.get(why, (0, 0))
            by_why[why] = (n + 1, b + size)
        lines = [f"removed {n} {why} ({b} bytes)" for why, (n, b) in sorted(by_why.items())]
        lines += [f"emptied {p} (generated at first boot)" for p in self.emptied]
        return lines

    def to_json(self) -> dict[str, object]:
        return {"removed": [{"path": p, "why": w, "bytes": b} for p, w, b in self.removed],
                "emptied": list(self.emptied)}


def master_files(root: Path = Path("/")) -> dict[bytes, bytes]:
    """This machine's resolv.conf and hostname, to recognise copies of them in an image."""
    out: dict[bytes, bytes] = {}
    for rel in _MASTER_FILES:
        try:
            out[rel] = (root / os.fsdecode(rel)).read_bytes()
        except OSError:
            continue
    return out


def _content(e: Entry, limit: int) -> bytes | None:
    if e.kind != REG or e.opener is None or e.size > limit:
        return None if e.size else b""
    f = e.opener()
    try:
        return f.read(limit + 1)
    finally:
        f.close()


def _why(e: Entry, master: dict[bytes, bytes]) -> str | None:
    path = e.path
    if any(fnmatch.fnmatchcase(path, g) for g in _REMOVED_GLOBS):
        return "ssh host keys" if path.startswith(b"etc/ssh/") else "copies of the machine id"
    for top, keep in _EMPTIED:
        if path.startswith(top + b"/"):
            return None if path[len(top) + 1:] in keep else ("apt lists" if b"lists" in top else "apt cache files")
    if path.startswith(b"var/cache/apt/") and path != b"var/cache/apt/archives":
        return "apt cache files"  # pkgcache.bin, srcpkgcache.bin
    if path in master and e.kind == REG:
        want = master[path]
        if _content(e, len(want)) == want:
            return f"copies of the master's /{path.decode()}"
    return None


def clean_entries(entries: list[Entry], master: dict[bytes, bytes] | None = None,
                  report: HygieneReport | None = None) -> list[Entry]:
    """The entries without what hygiene removes; ``report`` (if given) says what went."""
    master = master_files() if master is None else master
    report = report if report is not None else HygieneReport()
    out: list[Entry] = []
    gone: dict[bytes, Entry] = {}
    for e in entries:
        why = _why(e, master)
        if why is not None:
            report.add(e, why)
            gone[e.path] = e
            continue
        if e.path == b"etc/machine-id" and (e.kind != REG or e.size):
            report.emptied.append("/etc/machine-id")
            e = Entry(e.path, REG, 0o444, e.uid, e.gid, e.mtime)
        out.append(e)
    if gone:
        out = _relink(out, gone)
    return out


def _relink(entries: list[Entry], gone: dict[bytes, Entry]) -> list[Entry]:
    """Hard links to a removed first name: the next name takes the content, the rest link to it."""
    heir: dict[bytes, bytes] = {}
    out: list[Entry] = []
    for e in entries:
        if e.kind != LNK or e.linkname not in gone:
            out.append(e)
            continue
        first = heir.get(e.linkname)
        if first is None:
            src = gone[e.linkname]
            heir[e.linkname] = e.path
            out.append(Entry(e.path, REG, src.mode, src.uid, src.gid, src.mtime, size=src.size,
                             xattrs=src.xattrs, opener=src.opener))
        else:
            out.append(Entry(e.path, LNK, e.mode, e.uid, e.gid, e.mtime, linkname=first))
    return out


def transform(report: HygieneReport, master: dict[bytes, bytes] | None = None) -> Callable[[list[Entry]], list[Entry]]:
    """clean_entries as the importer's ``transform`` hook, filling ``report``."""
    def run(entries: list[Entry]) -> list[Entry]:
        return clean_entries(entries, master, report)
    return run
