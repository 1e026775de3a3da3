"""``bootd overlay``: per-node files and templates from the shell.

Works on the overlay directory (``overlay.dir``) directly: every change is
staged, validated (every template compiled) and published with one rename,
so it is safe beside a running daemon. ``render`` reads the registry
read-only to build the node's context (one small function, until the CLI
talks to the overlay service); it never sees secrets: host keys and the
machine id are placeholders, and password hashes are not read.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from bootd.cli.node import table
from bootd.config import Config
from bootd.errors import BootdError, NotFound, OverlayError
from bootd.overlay import RUNTIME_OVERLAYS, SYSTEM_OVERLAYS
from bootd.overlay.accounts import read_accounts, read_authorized_keys
from bootd.overlay.context import Context, GroupInfo, HostKey, MasterInfo, cluster_view, node_info
from bootd.overlay.hostkeys import KEY_TYPES
from bootd.overlay.meta import FILES_DIR, META_FILE, OverlayMeta, check_path
from bootd.overlay.overlay import Overlay, load_overlay
from bootd.overlay.render import render
from bootd.overlay.store import OverlayStore, read_source_file

PLACEHOLDER = "(secret: made per node by bootd serve)"


def _store(config: Config) -> OverlayStore:
    return OverlayStore(Path(config.overlay.dir))


def _json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def overlay_list(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    rows: list[dict[str, Any]] = []
    for name, source in store.names().items():
        try:
            ov = store.load(name)
        except BootdError as exc:
            rows.append({"name": name, "source": source, "error": str(exc)})
            continue
        rows.append({"name": name, "source": source, "kind": ov.kind, "secret": ov.secret,
                     "files": len(ov.entries), "description": ov.meta.description})
    if args.json:
        _json(rows)
        return 0
    print(table([(r["name"], r.get("kind", "?"), "yes" if r.get("secret") else "no", r["source"],
                  r.get("files", "?"), r.get("description") or r.get("error", "")) for r in rows],
                ("NAME", "KIND", "SECRET", "SOURCE", "FILES", "DESCRIPTION")))
    return 0


def _describe(ov: Overlay) -> dict[str, Any]:
    data = ov.meta.to_json()
    data.update(name=ov.name, source=ov.source, digest=ov.digest)
    data["entries"] = [{"file": e.src, "path": "/" + e.dest, "template": e.template is not None,
                        "mode": f"{e.meta.mode:04o}", "owner": e.meta.owner, "group": e.meta.group}
                       for e in ov.entries]
    return data


def overlay_show(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    if args.file:
        sys.stdout.buffer.write(read_source_file(store, args.name, args.file))
        return 0
    ov = store.load(args.name)
    if args.json:
        _json(_describe(ov))
        return 0
    print(f"name:        {ov.name} ({ov.source})")
    when = "stage one, before switch_root" if ov.kind == "system" else "stage one, then node agent every interval"
    print(f"kind:        {ov.kind} ({when})")
    print(f"secret:      {'yes: served only to the node' if ov.secret else 'no'}")
    print(f"description: {ov.meta.description or '-'}")
    print(f"digest:      {ov.digest}")
    print()
    print(table([(e.src, "/" + e.dest, "template" if e.template is not None else "file", f"{e.meta.mode:04o}",
                  f"{e.meta.owner}:{e.meta.group}") for e in ov.entries],
                ("FILE", "PATH", "TYPE", "MODE", "OWNER")))
    for d in ov.meta.directories:
        each = f" for each item of {d.each}" if d.each else ""
        print(f"directory {d.path} {d.mode} {d.owner}:{d.group}{each}")
    return 0


def overlay_create(args: argparse.Namespace, config: Config) -> int:
    meta = OverlayMeta(kind=args.kind, secret=args.secret, description=args.description or "")
    ov = _store(config).create(args.name, meta)
    print(f"created overlay {ov.name} ({ov.kind}{', secret' if ov.secret else ''}); add files with "
          f"`bootd overlay edit {ov.name} etc/FILE` or `bootd overlay import {ov.name} DIR --replace`")
    return 0


def overlay_import(args: argparse.Namespace, config: Config) -> int:
    ov = _store(config).import_tree(args.name, Path(args.source), replace=args.replace)
    templates = sum(1 for e in ov.entries if e.template is not None)
    print(f"imported overlay {ov.name}: {len(ov.entries)} files ({templates} templates), {ov.kind}"
          f"{', secret' if ov.secret else ''}")
    return 0


def overlay_export(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    if args.dest == "-":
        store.export(args.name, sys.stdout.buffer)
        sys.stdout.flush()
        return 0
    dest = Path(args.dest)
    n = _write_atomic(dest, lambda fh: store.export(args.name, fh))
    print(f"exported overlay {args.name} to {dest} ({n} bytes)")
    return 0


def _write_atomic(dest: Path, write: Callable[[BinaryIO], int]) -> int:
    """Private file, temp + fsync + rename: a reader never sees half a tar."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            n = write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def overlay_delete(args: argparse.Namespace, config: Config) -> int:
    _store(config).delete(args.name)
    print(f"deleted overlay {args.name}")
    return 0


def _editor() -> list[str]:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    return shlex.split(editor)


def overlay_edit(args: argparse.Namespace, config: Config) -> int:
    """Edit a copy; only a copy that validates replaces the overlay (a shipped one becomes a site copy)."""
    store = _store(config)
    store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"edit-{args.name}.", dir=store.root))
    try:
        tree = store.checkout(args.name, work)
    except BaseException:
        os.rmdir(work)
        raise
    target = tree / META_FILE if args.file is None else tree / FILES_DIR / check_path(args.file)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not target.exists():
        target.touch(mode=0o600)
    before = target.read_bytes()
    cmd = [*_editor(), str(target)]
    try:
        rc = subprocess.run(cmd, check=False).returncode
    except OSError as exc:
        raise OverlayError(f"cannot run the editor {cmd[0]!r} ($VISUAL/$EDITOR): {exc.strerror}") from None
    if rc != 0:
        raise OverlayError(f"the editor exited with status {rc}; overlay {args.name} is unchanged "
                           f"(your copy: {target})")
    if target.read_bytes() == before:
        _remove(work)
        print(f"overlay {args.name}: no change")
        return 0
    try:
        load_overlay(tree, args.name, "site")  # refuse before touching the store, with file and line
        ov = store.commit(args.name, tree)
    except OverlayError as exc:
        print(f"bootd: error: {exc}", file=sys.stderr)
        print(f"bootd: overlay {args.name} is unchanged; your edit is kept in {target}", file=sys.stderr)
        return 1
    _remove(work)
    print(f"saved overlay {ov.name} ({len(ov.entries)} files)")
    return 0


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def node_context(config: Config, name: str) -> Context:
    """The render context of one node, from the registry read through the node service (read-only)."""
    from bootd.cli.node import _run

    nodes = _run(config, lambda s: s.nodes.select(None), write=False)
    node = next((n for n in nodes if n.name == name), None)
    if node is None:
        raise NotFound(f"no node {name!r}")
    o = config.overlay
    users, groups = read_accounts(o.passwd, o.group, uid_min=o.uid_min, uid_max=o.uid_max)
    try:
        keys = read_authorized_keys(o.authorized_keys)
    except OverlayError as exc:
        print(f"bootd: warning: {exc}; rendering without root's keys", file=sys.stderr)
        keys = ()
    fake = {t: HostKey(private=PLACEHOLDER, public=PLACEHOLDER) for t in KEY_TYPES}
    info = node_info(node, machine_id=PLACEHOLDER, host_keys=fake)
    cluster = cluster_view(nodes, domain=config.dhcp.domain or "")
    master = MasterInfo(name=socket.gethostname().split(".")[0], address=config.server.address,
                        authorized_keys=keys, users=users, groups=groups, uid_min=o.uid_min, uid_max=o.uid_max)
    return Context(node=info, group=GroupInfo(node.group), cluster=cluster, master=master)


def overlay_render(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    names = args.overlays or [*SYSTEM_OVERLAYS, *RUNTIME_OVERLAYS]
    overlays = store.load_many(names)
    if args.kind:
        overlays = [o for o in overlays if o.kind == args.kind]
    result = render(overlays, node_context(config, args.node))
    if args.out:
        out = Path(args.out)
        _write_atomic(out, lambda fh: fh.write(result.data))
        print(f"wrote {out}: {len(result.data)} bytes, etag {result.etag}")
        return 0
    if args.json:
        _json({"node": args.node, "overlays": [o.name for o in overlays], "bytes": len(result.data),
               "etag": result.etag, "secret": result.secret,
               "files": [{"path": "/" + f.path, "kind": f.kind, "mode": f"{f.mode:04o}", "owner": f.owner,
                          "group": f.group, "size": f.size, "overlay": f.overlay} for f in result.files]})
        return 0
    print(f"# node {args.node}: overlays {', '.join(o.name for o in overlays)}; {len(result.data)} bytes, "
          f"etag {result.etag}")
    print(table([("/" + f.path + ("/" if f.kind == "dir" else ""), f"{f.mode:04o}", f"{f.owner}:{f.group}",
                  f.size if f.kind == "file" else "-", f.overlay) for f in result.files],
                ("PATH", "MODE", "OWNER", "SIZE", "OVERLAY")))
    if args.contents:
        with tarfile.open(fileobj=io.BytesIO(result.data)) as tf:
            for m in tf.getmembers():
                if m.isfile():
                    fh = tf.extractfile(m)
                    assert fh is not None
                    data = fh.read()
                    print(f"\n==> /{m.name} <==")
                    try:
                        print(data.decode(), end="" if data.endswith(b"\n") else "\n")
                    except UnicodeDecodeError:
                        print(f"({len(data)} bytes of binary data)")
    return 0


def add_parser(sub: Any) -> None:
    top = sub.add_parser("overlay", help="per-node files and templates (list, show, create, edit, import, render)")
    osub = top.add_subparsers(dest="overlay_command", metavar="VERB", required=True)

    p = osub.add_parser("list", help="shipped and site overlays")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=overlay_list)

    p = osub.add_parser("show", help="an overlay's files, modes and owners, or one stored file's content")
    p.add_argument("name")
    p.add_argument("file", nargs="?", help="stored file to print (e.g. etc/hosts.j2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=overlay_show)

    p = osub.add_parser("create", help="create an empty site overlay")
    p.add_argument("name")
    p.add_argument("--kind", choices=("system", "runtime"), default="system",
                   help="system: written by the stage one before switch_root; runtime: also refreshed by the "
                        "node agent (default system)")
    p.add_argument("--secret", action="store_true", help="serve only to the node's own credential")
    p.add_argument("--description", help="one line saying what it is for")
    p.set_defaults(handler=overlay_create)

    p = osub.add_parser("edit", help="edit a file (or overlay.json) in $EDITOR; saved only if it validates")
    p.add_argument("name")
    p.add_argument("file", nargs="?", help="file under the node's root, e.g. etc/motd.j2 (default: overlay.json)")
    p.set_defaults(handler=overlay_edit)

    p = osub.add_parser("import", help="import a directory or tar: an overlay (overlay.json + files/) or a tree")
    p.add_argument("name")
    p.add_argument("source")
    p.add_argument("--replace", action="store_true", help="replace an existing site overlay")
    p.set_defaults(handler=overlay_import)

    p = osub.add_parser("export", help="write an overlay's source as a tar (DEST - for stdout)")
    p.add_argument("name")
    p.add_argument("dest")
    p.set_defaults(handler=overlay_export)

    p = osub.add_parser("delete", help="delete a site overlay")
    p.add_argument("name")
    p.set_defaults(handler=overlay_delete)

    p = osub.add_parser("render", help="what a node would get (secrets are placeholders)")
    p.add_argument("node")
    p.add_argument("overlays", nargs="*", metavar="OVERLAY", help="overlays in order (default: the shipped set)")
    p.add_argument("--kind", choices=("system", "runtime"), help="only overlays of this kind")
    p.add_argument("--contents", action="store_true", help="print every file's content")
    p.add_argument("--out", help="write the tar the node would fetch to this file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=overlay_render)
