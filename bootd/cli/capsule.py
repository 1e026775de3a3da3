"""``bootd capsule``: build, import, change, inspect, check, export, roll back and clean capsules.

The CLI works on the store directly (``Config.capsule.dir``). That is safe next
to a running daemon: publishing is a rename, and gc/delete/publish take the
store's lock file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bootd.capsule.build import build_capsule
from bootd.capsule.chroot import exec_in_capsule
from bootd.capsule.chunker import ChunkParams
from bootd.capsule.export import export_version
from bootd.capsule.hygiene import HygieneReport, transform
from bootd.capsule.image import ImageStore
from bootd.capsule.importer import ImportOptions, ImportResult, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.recipe import load_recipe
from bootd.capsule.verify import verify_version
from bootd.compose import sync_capsules
from bootd.config import Config
from bootd.errors import CapsuleError
from bootd.service.catalog import capsule_detail, capsule_rows
from bootd.service.replica import SyncReport


def _store(config: Config) -> CapsuleStore:
    return CapsuleStore(Path(config.capsule.dir))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


@contextmanager
def _bar(desc: str, total: int | None) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A byte progress bar on stderr (silent when stderr is not a terminal)."""
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=None, leave=False, dynamic_ncols=True) as bar:
        def update(n: int) -> None:
            bar.update(n)

        def set_total(n: int) -> None:
            bar.total = n
            bar.refresh()
        yield update, set_total


def import_options(config: Config) -> ImportOptions:
    c = config.capsule
    chunk = ChunkParams(c.chunk_min, c.chunk_avg, c.chunk_max, members=c.chunk_cut == "members")
    return ImportOptions(chunk=chunk, zstd_level=c.zstd_level,
                         stage1_releases=stage1_releases(config))


def stage1_releases(config: Config) -> frozenset[str] | None:
    """The kernel releases the built stage one has NIC modules for (None before `bootd stage1 build`)."""
    try:
        info = json.loads((config.boot.stage1_dir / "stage1.json").read_text())
    except (OSError, ValueError):
        return None
    sets = info.get("module_sets")
    return frozenset(sets) if isinstance(sets, dict) else None


def _print_hygiene(report: HygieneReport) -> None:
    lines = report.summary()
    print("  hygiene: " + ("; ".join(lines) if lines else "nothing to remove"))


def _print_result(result: ImportResult, what: str = "imported") -> None:
    share = 100.0 * result.new_bytes / result.stored_size if result.stored_size else 0.0
    rate = result.raw_size / result.seconds / 1e6 if result.seconds > 0 else 0.0
    print(f"{what} {result.name}: version {result.version}")
    print(f"  {result.entries} entries, archive {_size(result.raw_size)}, stored {_size(result.stored_size)} "
          f"in {result.chunks} chunks; new {_size(result.new_bytes)} ({share:.1f}%) in {result.new_chunks} chunks")
    print(f"  kernel: {result.kernel.path + ' ' + result.kernel.sha256[:12] if result.kernel else 'none'}")
    if result.previous and result.previous != result.version:
        print(f"  replaced version {result.previous}")
    elif result.previous == result.version:
        print("  unchanged (same tree as the current version)")
    print(f"  {result.seconds:.1f} s, {rate:.0f} MB/s")


def capsule_import(args: argparse.Namespace, config: Config) -> int:
    report = HygieneReport()
    with _bar(f"import {args.name}", None) as (update, set_total):
        result = import_capsule(_store(config), args.name, Path(args.source),
                                kernel=Path(args.kernel) if args.kernel else None, options=import_options(config),
                                progress=update, on_total=set_total,
                                transform=None if args.no_hygiene else transform(report))
    if args.json:
        _print_json({**result.to_json(), "hygiene": None if args.no_hygiene else report.to_json()})
        return 0
    _print_result(result)
    if not args.no_hygiene:
        _print_hygiene(report)
    return 0


def capsule_build(args: argparse.Namespace, config: Config) -> int:
    recipe = load_recipe(args.recipe)
    cache = Path(args.cache) if args.cache else config.capsule.build_cache
    with _bar(f"import {args.name}", None) as (update, set_total):
        built = build_capsule(_store(config), args.name, recipe, cache, options=import_options(config),
                              progress=update, on_total=set_total)
    if args.json:
        _print_json({**built.result.to_json(), "hygiene": built.hygiene.to_json(),
                     "mmdebstrap_seconds": round(built.mmdebstrap_seconds, 3),
                     "import_seconds": round(built.import_seconds, 3), "tar_bytes": built.tar_bytes})
        return 0
    _print_result(built.result, "built")
    _print_hygiene(built.hygiene)
    print(f"  mmdebstrap {built.mmdebstrap_seconds:.1f} s (tar {_size(built.tar_bytes)}), "
          f"import {built.import_seconds:.1f} s; package cache {cache}")
    return 0


def _exec(args: argparse.Namespace, config: Config, argv: list[str], interactive: bool) -> int:
    with _bar(f"import {args.name}", None) as (update, _):
        out = exec_in_capsule(_store(config), args.name, argv, interactive=interactive, options=import_options(config),
                              progress=update)
    if out.result is None:
        print(f"bootd: error: {' '.join(argv)} exited with status {out.exit_code} in {args.name}; "
              f"nothing was published ({args.name} stays at {out.previous[:12]})", file=sys.stderr)
        return 1
    _print_result(out.result, "published")
    _print_hygiene(out.hygiene)
    return 0


def capsule_exec(args: argparse.Namespace, config: Config) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("bootd: error: no command given: bootd capsule exec NAME -- CMD [ARG...]", file=sys.stderr)
        return 2
    return _exec(args, config, argv, interactive=False)


def capsule_shell(args: argparse.Namespace, config: Config) -> int:
    print(f"bootd: shell in {args.name}; exit 0 publishes a new version, any other status discards the changes",
          file=sys.stderr)
    return _exec(args, config, ["/bin/sh", "-c", "if [ -x /bin/bash ]; then exec /bin/bash -l; fi; exec /bin/sh -l"],
                 interactive=True)


def capsule_history(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    current = store.resolve(args.name)
    records = store.history(args.name)
    if current is None and not records:
        raise CapsuleError(f"no capsule named {args.name!r}")
    rows = [dict(r.to_json(), current=r.version == current and i == len(records) - 1,
                 stored=store.manifest_path(r.version).exists()) for i, r in enumerate(records)]
    if current is not None and (not records or records[-1].version != current):
        rows.append({"time": None, "version": current, "origin": "?", "stored_bytes": None, "new_bytes": None,
                     "detail": "(made before history was kept)", "current": True, "stored": True})
    if args.json:
        _print_json(rows)
        return 0
    print(_table([("*" if r["current"] else "", i,
                   time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])) if r["time"] else "?",
                   r["version"][:12], r["origin"],
                   _size(r["stored_bytes"]) if r["stored_bytes"] is not None else "?",
                   _size(r["new_bytes"]) if r["new_bytes"] is not None else "?",
                   _detail(r))
                  for i, r in enumerate(rows, 1)],
                 ("", "#", "TIME", "VERSION", "MADE BY", "STORED", "NEW", "DETAIL")))
    return 0


def _detail(row: dict[str, Any]) -> str:
    text = f"from {row['detail'][:12]}" if row["origin"] == "rollback" else str(row["detail"])
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if row["stored"] else f"{text} (removed by gc)"


def capsule_rollback(args: argparse.Namespace, config: Config) -> int:
    record = _store(config).rollback(args.name, args.version)
    print(f"rolled back {args.name} to version {record.version} (was {record.detail})")
    return 0


def capsule_list(args: argparse.Namespace, config: Config) -> int:
    rows = capsule_rows(_store(config))
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no capsules")
        return 0
    print(_table([(r["name"], r["version"][:12], _size(r["raw_size"]) if "raw_size" in r else "?",
                   _size(r["stored_size"]) if "stored_size" in r else "?", r.get("chunks", "?"),
                   r.get("kernel") or r.get("error")) for r in rows],
                 ("NAME", "VERSION", "SIZE", "STORED", "CHUNKS", "KERNEL")))
    return 0


def capsule_show(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    if args.json:
        _print_json(capsule_detail(store, args.capsule, with_chunks=True))
        return 0
    name, vid = store.find_version(args.capsule)
    m = store.load_manifest(vid)
    k = m.kernel
    ratio = m.raw_size / m.stored_size if m.stored_size else 0.0
    print(f"name:        {name or '-'}")
    print(f"version:     {vid}")
    print(f"archive:     {m.meta.get('archive')} ({m.meta.get('entries', '?')} entries)")
    print(f"size:        {_size(m.raw_size)} ({m.raw_size} bytes)")
    print(f"stored:      {_size(m.stored_size)} zstd, ratio {ratio:.2f}")
    print(f"chunks:      {len(m.chunks)} (unique {len({c.sha256 for c in m.chunks})})")
    print(f"kernel:      {k.path + '  ' + k.sha256 + '  ' + _size(k.size) if k else 'none (stage-one kernel)'}")
    return 0


def capsule_verify(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    name, vid = store.find_version(args.capsule)
    m = store.load_manifest(vid)
    with _bar(f"verify {name or vid[:12]}", m.raw_size) as (update, _):
        report = verify_version(store, vid, progress=update)
    if args.json:
        data = report.to_json()
        data["name"] = name
        _print_json(data)
    elif report.ok:
        print(f"{name or vid}: OK, version {vid}, {report.chunks} chunks, {_size(report.checked_bytes)}")
    else:
        for bad in report.bad:
            print(f"BAD {bad['kind']} {bad['sha256']}: {bad['problem']}")
    if not report.ok:
        print(f"bootd: error: capsule {name or vid}: {len(report.bad)} bad object(s) in version {vid}",
              file=sys.stderr)
        return 1
    return 0


def capsule_image(args: argparse.Namespace, config: Config) -> int:
    """Make the version's squashfs image now (nodes in the squashfs root mode otherwise wait for it at the
    version's first boot); an image already made is only shown."""
    store = _store(config)
    name, vid = store.find_version(args.capsule)
    images = ImageStore(store, chunk_size=config.capsule.image_chunk, zstd_level=config.capsule.zstd_level)
    started = time.monotonic()
    image = images.ensure(vid, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    listing = images.load(image)
    raw = store.load_manifest(vid).raw_size
    data = {"name": name, "version": vid, "image": image, "kind": listing.kind, "size": listing.size,
            "chunks": len(listing.chunks), "ratio": round(listing.size / max(raw, 1), 3),
            "seconds": round(time.monotonic() - started, 2)}
    if args.json:
        _print_json(data)
    else:
        print(f"{name or vid[:12]}: squashfs image {image}, {_size(listing.size)} in {len(listing.chunks)} chunks "
              f"({data['ratio']:.2f}x of {_size(raw)})")
    return 0


def capsule_delete(args: argparse.Namespace, config: Config) -> int:
    vid = _store(config).delete(args.name)
    print(f"deleted {args.name} (was {vid}); run 'bootd capsule gc' to free its chunks")
    return 0


def capsule_export(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    name, vid = store.find_version(args.capsule)
    m = store.load_manifest(vid)
    with _bar(f"export {name or vid[:12]}", m.raw_size) as (update, _):
        n = export_version(store, vid, args.dest, progress=update)
    if args.dest != "-":
        print(f"exported {name or vid} ({vid[:12]}) to {args.dest}: {_size(n)}")
    return 0


def capsule_gc(args: argparse.Namespace, config: Config) -> int:
    keep_versions = config.capsule.keep_versions if args.keep_versions is None else args.keep_versions
    report = _store(config).gc(in_use=args.keep or (), keep_versions=keep_versions)
    if args.json:
        _print_json(vars(report))
        return 0
    print(f"removed {report.removed_chunks} chunks, {report.removed_kernels} kernels, "
          f"{report.removed_manifests} manifests, {report.removed_staging} dead imports; "
          f"freed {_size(report.freed_bytes)}; kept {len(report.kept_versions)} versions "
          f"(up to {keep_versions} per capsule)"
          + (f"; {report.live_imports} import(s) in progress left alone" if report.live_imports else ""))
    return 0


def capsule_sync(args: argparse.Namespace, config: Config) -> int:
    """Warm this store from a peer bootd: progress on stderr about once a second, a summary per capsule."""
    last = [0.0]

    def progress(report: SyncReport, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 1.0:
            last[0] = now
            print(f"sync {report.name}: {done}/{total} objects, {report.fetched} fetched "
                  f"({_size(report.fetched_bytes)}), {report.present} already here", file=sys.stderr, flush=True)

    reports = asyncio.run(sync_capsules(config, args.source, list(args.names), progress))
    rows = []
    for r in reports:
        rate = r.fetched_bytes / r.seconds / 1048576 if r.seconds > 0 else 0.0
        state = "published" if r.published else "already current"
        rows.append({"name": r.name, "version": r.version, "chunks": r.chunks, "fetched": r.fetched,
                     "present": r.present, "fetched_bytes": r.fetched_bytes, "seconds": round(r.seconds, 3),
                     "published": r.published})
        if not args.json:
            print(f"synced {r.name} {r.version[:12]} from {args.source}: {r.fetched} object(s) fetched "
                  f"({_size(r.fetched_bytes)}, {rate:.1f} MiB/s), {r.present} already here; {state}")
    if args.json:
        _print_json(rows)
    elif not reports:
        print(f"{args.source} has no capsules; nothing to sync")
    return 0


def add_parser(sub: Any) -> None:
    cap = sub.add_parser("capsule", help="manage VNFS capsules (root filesystems nodes boot)")
    csub = cap.add_subparsers(dest="capsule_command", metavar="SUBCOMMAND", required=True)

    p = csub.add_parser("import", help="import a directory, tar archive (plain/gz/xz/bz2/zst), OCI image "
                        "layout (directory or tar) or docker-save archive as NAME")
    p.add_argument("name")
    p.add_argument("source", help="root tree directory, tar archive, OCI layout or docker-save tar")
    p.add_argument("--kernel", help="kernel image to boot (default: newest /boot/vmlinuz* in the tree)")
    p.add_argument("--no-hygiene", action="store_true",
                   help="keep ssh host keys, machine-id, apt lists/caches and the master's resolv.conf")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=capsule_import)

    p = csub.add_parser("build", help="build NAME from a recipe (TOML) with mmdebstrap and import it")
    p.add_argument("name")
    p.add_argument("--recipe", required=True, metavar="FILE", help="recipe file, e.g. capsules/debian-hpc/recipe.toml")
    p.add_argument("--cache", metavar="DIR", help="package cache (default: capsule.build_cache)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=capsule_build)

    p = csub.add_parser("exec", help="run a command in NAME's tree; exit 0 publishes a new version")
    p.add_argument("name")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(handler=capsule_exec)

    p = csub.add_parser("shell", help="interactive shell in NAME's tree; exit 0 publishes a new version")
    p.add_argument("name")
    p.set_defaults(handler=capsule_shell)

    p = csub.add_parser("history", help="every kept version of NAME: time, id, sizes, what made it")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=capsule_history)

    p = csub.add_parser("rollback", help="make an older version of NAME current (default: the one before)")
    p.add_argument("name")
    p.add_argument("version", nargs="?", help="version id or unique prefix from 'bootd capsule history NAME'")
    p.set_defaults(handler=capsule_rollback)

    p = csub.add_parser("list", help="list capsules")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=capsule_list)

    p = csub.add_parser("show", help="show one capsule (by name, version id or unique id prefix)")
    p.add_argument("capsule", metavar="NAME|VERSION")
    p.add_argument("--json", action="store_true", help="JSON with every chunk")
    p.set_defaults(handler=capsule_show)

    p = csub.add_parser("verify", help="re-hash every chunk; exit 1 and name the bad ones")
    p.add_argument("capsule", metavar="NAME|VERSION")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=capsule_verify)

    p = csub.add_parser("image", help="make NAME's squashfs image now (boot.root = squashfs; else made at the "
                                      "version's first boot in that mode)")
    p.add_argument("capsule", metavar="NAME|VERSION")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=capsule_image)

    p = csub.add_parser("delete", help="remove a capsule name (chunks go with the next gc)")
    p.add_argument("name")
    p.set_defaults(handler=capsule_delete)

    p = csub.add_parser("export", help="write the capsule's tar archive to DEST ('-' for stdout)")
    p.add_argument("capsule", metavar="NAME|VERSION")
    p.add_argument("dest", metavar="DEST.tar")
    p.set_defaults(handler=capsule_export)

    p = csub.add_parser("sync", help="fetch whole capsules (default: all) from a peer bootd and publish them "
                                     "here (resumable; warms a replica before a boot storm)")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="the peer's public URL, e.g. "
                   "http://10.77.0.1:8080")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=capsule_sync)

    p = csub.add_parser("gc", help="remove chunks, kernels and manifests no capsule needs")
    p.add_argument("--keep", action="append", metavar="VERSION", help="also keep this version id")
    p.add_argument("--keep-versions", type=int, metavar="N",
                   help="versions to keep per capsule (default: capsule.keep_versions)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=capsule_gc)
