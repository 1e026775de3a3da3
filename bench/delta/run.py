#!/usr/bin/env python3
"""Bytes an update stores: member cuts vs plain CDC cuts vs a full ``tar | zstd`` image, in one run.

Usage (as root, for the chown; under ``flock /tmp/bootd-bench.lock``):
    .venv/bin/python bench/delta/run.py [--runs 3] [--cache DIR]
    .venv/bin/python bench/delta/run.py --real OLD.tar NEW.tar   # two versions of a real tree

The generated tree (48 MiB in 40 files of 16 KiB..6 MiB, half text-like, half random, in 4
directories) is imported into a fresh store with each cutting; then each change is applied
alone, imported into a hard-linked copy of that store, and undone:

  (a) insert a 1 MiB file of random bytes (its directory's mtime changes with it, as in life);
  (b) chmod the middle file (by name) 0644 -> 0755;
  (c) change the mtime of the middle directory;
  (d) chown the middle file to 1000:1000.

"stored" is what the update adds to the store: the new chunks' bytes plus the manifest (a new
version always stores one). Targets (issue 20): (a) <= 1 MiB + 5% of the tree; (b)-(d) <= 64 KiB.
The peers: an administrator who keeps one ``tar | zstd -3`` image per version stores the whole
image per change (the ratio column is members / that); one who keeps binary deltas stores
``zstd --patch-from=OLD.tar NEW.tar`` (a floor: it needs the old image to apply, and a node
cannot verify or fetch it by the piece). Import time of the base tree, both cuttings, is the
median of --runs interleaved imports (fsync on, as the CLI does).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.capsule.chunker import ChunkParams
from bootd.capsule.importer import ImportOptions, ImportResult, import_capsule
from bootd.capsule.objects import CapsuleStore

MiB = 1 << 20
KiB = 1 << 10
WHEN = 1_700_000_000
CUTS = {"stream CDC (before)": ChunkParams(members=False), "member cuts (now)": ChunkParams()}


def generate(root: Path, files: int = 40, total: int = 48 * MiB, seed: int = 20261201) -> None:
    """Deterministic tree: sizes log-uniform in 16 KiB..6 MiB, scaled to ``total``."""
    done = root / ".complete"
    if done.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    raw = [2 ** rng.uniform(14, 22.6) for _ in range(files)]
    sizes = [max(1, int(s * total / sum(raw))) for s in raw]
    sizes[-1] += total - sum(sizes)
    words = b"node boot capsule kernel chunk init cluster lib usr share etc var log = 0 1 \n".split(b" ")
    for i, size in enumerate(sizes):
        d = root / ("bin", "lib", "share", "etc")[i % 4]
        d.mkdir(parents=True, exist_ok=True)
        if i % 2:
            data = bytearray()
            while len(data) < size:
                data += b" ".join(rng.choice(words) for _ in range(64)) + b"\n"
            body = bytes(data[:size])
        else:
            body = rng.randbytes(size)
        (d / f"file{i:02d}").write_bytes(body)
    fix_times(root)
    done.write_text(f"{files} files {sum(sizes)} bytes\n")


def fix_times(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (WHEN, WHEN), follow_symlinks=False)
    os.utime(root, (WHEN, WHEN))


def tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != ".complete")


@dataclass
class Change:
    name: str
    apply: Callable[[], None]
    undo: Callable[[], None]


def changes(root: Path) -> list[Change]:
    files = tree_files(root)
    middle = files[len(files) // 2]
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    mdir = dirs[len(dirs) // 2]
    inserted = mdir / "inserted.bin"
    payload = random.Random(7).randbytes(MiB)

    def insert() -> None:
        inserted.write_bytes(payload)
        os.utime(inserted, (WHEN, WHEN))
        os.utime(mdir, (WHEN + 60, WHEN + 60))

    def uninsert() -> None:
        inserted.unlink()
        os.utime(mdir, (WHEN, WHEN))

    st = middle.stat()
    rel = lambda p: p.relative_to(root)  # noqa: E731
    return [
        Change(f"(a) insert 1 MiB random file {rel(inserted)}", insert, uninsert),
        Change(f"(b) chmod 0755 {rel(middle)} ({st.st_size / KiB:.0f} KiB)",
               lambda: middle.chmod(0o755), lambda: middle.chmod(0o644)),
        Change(f"(c) mtime of directory {rel(mdir)}/", lambda: os.utime(mdir, (WHEN + 3600, WHEN + 3600)),
               lambda: os.utime(mdir, (WHEN, WHEN))),
        Change(f"(d) chown 1000:1000 {rel(middle)}", lambda: os.chown(middle, 1000, 1000),
               lambda: os.chown(middle, st.st_uid, st.st_gid)),
    ]


def clone_store(src: Path, dst: Path) -> CapsuleStore:
    """A copy of a store that shares its files (hard links): each change is measured against the base only."""
    shutil.copytree(src, dst, copy_function=os.link)
    return CapsuleStore(dst)


def stored_bytes(store: CapsuleStore, r: ImportResult) -> int:
    """What an update adds to the store: its new chunks and its manifest."""
    return r.new_bytes + store.manifest_path(r.version).stat().st_size


def tar_to(root: Path, dest: Path) -> None:
    subprocess.run(["tar", "--sort=name", "--numeric-owner", "-C", str(root), "-cf", str(dest),
                    "--exclude=./.complete", "."], check=True)


def zstd_size(tar: Path) -> int:
    r = subprocess.run(f"zstd -3 -T0 -c '{tar}' | wc -c", shell=True, check=True, capture_output=True, text=True)
    return int(r.stdout)


def patch_size(old: Path, new: Path) -> int:
    r = subprocess.run(f"zstd -3 -T0 --long=27 --patch-from='{old}' -c '{new}' | wc -c", shell=True, check=True,
                       capture_output=True, text=True)
    return int(r.stdout)


def fmt(n: int) -> str:
    return f"{n / KiB:,.1f} KiB" if n < MiB else f"{n / MiB:,.2f} MiB"


def timed_import(store: CapsuleStore, source: Path, params: ChunkParams) -> tuple[float, ImportResult]:
    t = time.perf_counter()
    r = import_capsule(store, "t", source, options=ImportOptions(chunk=params))
    return time.perf_counter() - t, r


def synthetic(args: argparse.Namespace, work: Path) -> int:
    root = args.cache / "delta-tree-48m-40f-v1"
    generate(root)
    size = sum(p.stat().st_size for p in tree_files(root))
    print(f"tree {root}: {fmt(size)} in {len(tree_files(root))} files; {os.cpu_count()} CPUs")
    subprocess.run(f"tar -C '{root}' -cf - . | cat > /dev/null", shell=True, check=True)  # warm the cache
    base_tar = work / "base.tar"
    tar_to(root, base_tar)
    timings: dict[str, list[float]] = {k: [] for k in CUTS}
    bases: dict[str, tuple[Path, ImportResult]] = {}
    for i in range(args.runs):  # interleaved, so background load hits both alike
        for label, params in CUTS.items():
            d = work / f"base-{i}-{label.split()[0]}"
            t, r = timed_import(CapsuleStore(d), root, params)
            timings[label].append(t)
            bases.setdefault(label, (d, r))
    print(f"\n{'base import':<22}{'median s':>10}{'MB/s':>8}{'chunks':>8}{'stored':>12}{'manifest':>11}")
    for label in CUTS:
        d, r = bases[label]
        med = statistics.median(timings[label])
        man = CapsuleStore(d).manifest_path(r.version).stat().st_size
        print(f"{label:<22}{med:>10.2f}{size / med / 1e6:>8.0f}{r.chunks:>8}{fmt(r.stored_size):>12}"
              f"{fmt(man):>11}   runs {[round(x, 2) for x in timings[label]]}")
    now_dir, now = bases["member cuts (now)"]
    again = import_capsule(CapsuleStore(now_dir), "t", root,
                           options=ImportOptions(chunk=CUTS["member cuts (now)"], durable=False))
    print(f"re-import of the unchanged tree: same version id: {again.version == now.version}, "
          f"{again.new_bytes} new bytes")

    target_meta = 64 * KiB
    target_insert = MiB + size // 20
    print(f"\n{'change':<48}{'stream CDC':>13}{'member cuts':>13}{'target':>12}{'tar|zstd':>12}"
          f"{'ratio':>8}{'zstd patch':>12}")
    failed = 0
    for n, ch in enumerate(changes(root)):
        ch.apply()
        try:
            got: dict[str, int] = {}
            for label, params in CUTS.items():
                store = clone_store(bases[label][0], work / f"change-{n}-{label.split()[0]}")
                r = import_capsule(store, "t", root, options=ImportOptions(chunk=params, durable=False))
                got[label] = stored_bytes(store, r)
            new_tar = work / "new.tar"
            tar_to(root, new_tar)
            full, patch = zstd_size(new_tar), patch_size(base_tar, new_tar)
        finally:
            ch.undo()
        target = target_insert if n == 0 else target_meta
        ours = got["member cuts (now)"]
        ok = ours <= target
        failed += not ok
        print(f"{ch.name:<48}{fmt(got['stream CDC (before)']):>13}{fmt(ours):>13}{'<= ' + fmt(target):>12}"
              f"{fmt(full):>12}{100 * ours / full:>8.3f}%{fmt(patch):>12}  {'ok' if ok else 'MISSED'}")
    return 1 if failed else 0


def real_changes(root: Path) -> list[Change]:
    """Metadata changes in an unpacked real tree: a large file, a small one, a directory (middle by name)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
    big = [p for p in files if p.stat().st_size >= ChunkParams().solo]
    small = [p for p in files if p.stat().st_size < ChunkParams().solo]
    dirs = [p for p in sorted(root.rglob("*")) if p.is_dir() and not p.is_symlink()]
    out = []
    for what, p in (("large file", big[len(big) // 2]), ("small file", small[len(small) // 2])):
        mode = p.stat().st_mode & 0o7777
        out.append(Change(f"chmod {what} /{p.relative_to(root)} ({p.stat().st_size / KiB:.0f} KiB)",
                          lambda p=p, m=mode: p.chmod(m ^ 0o001), lambda p=p, m=mode: p.chmod(m)))
    d = dirs[len(dirs) // 2]
    t = int(d.stat().st_mtime)
    out.append(Change(f"mtime of directory /{d.relative_to(root)}/", lambda: os.utime(d, (t + 3600, t + 3600)),
                      lambda: os.utime(d, (t, t))))
    return out


def real(args: argparse.Namespace, work: Path) -> int:
    old, new = (Path(p) for p in args.real)
    print(f"real tree: {old} -> {new}")
    print(f"\n{'cutting':<22}{'median s':>9}{'chunks':>8}{'stored':>12}{'manifest':>11}{'update stores':>15}"
          f"{'share':>8}{'chunks new':>12}")
    bases: dict[str, tuple[Path, str]] = {}
    timings: dict[str, list[float]] = {k: [] for k in CUTS}
    subprocess.run(["cat", str(old), str(new)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache
    for i in range(args.runs):  # interleaved, each into a fresh store
        for label, params in CUTS.items():
            store = CapsuleStore(work / f"real-{i}-{label.split()[0]}")
            t, a = timed_import(store, old, params)
            timings[label].append(t)
            bases.setdefault(label, (store.root, a.version))
    for label, params in CUTS.items():
        store = CapsuleStore(bases[label][0])
        a = store.load_manifest(bases[label][1])
        t = statistics.median(timings[label])
        clone = clone_store(store.root, work / f"real-upd-{label.split()[0]}")
        b = import_capsule(clone, "t", new, options=ImportOptions(chunk=params))
        man = clone.manifest_path(b.version).stat().st_size
        upd = stored_bytes(clone, b)
        print(f"{label:<22}{t:>9.2f}{len(a.chunks):>8}{fmt(a.stored_size):>12}{fmt(man):>11}{fmt(upd):>15}"
              f"{100 * upd / b.stored_size:>7.2f}%{b.new_chunks:>6} of {b.chunks}   import runs "
              f"{[round(x, 1) for x in timings[label]]}")
    print(f"tar | zstd -3 of the new tree: {fmt(zstd_size(new))}; zstd --patch-from old: "
          f"{fmt(patch_size(old, new))}")
    tree = work / "tree"
    tree.mkdir()
    subprocess.run(["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", str(old)],
                   check=True)
    print(f"\n{'metadata change in ' + old.name:<64}{'stream CDC':>13}{'member cuts':>13}")
    for n, ch in enumerate(real_changes(tree)):
        ch.apply()
        try:
            got = []
            for label, params in CUTS.items():
                store = clone_store(bases[label][0], work / f"real-meta-{n}-{label.split()[0]}")
                got.append(stored_bytes(store, import_capsule(store, "t", tree,
                                                              options=ImportOptions(chunk=params, durable=False))))
        finally:
            ch.undo()
        print(f"{ch.name:<64}{fmt(got[0]):>13}{fmt(got[1]):>13}")
    for label, params in CUTS.items():  # the unpacked tree archives as the tar did: same id
        store = clone_store(bases[label][0], work / f"real-same-{label.split()[0]}")
        r = import_capsule(store, "t", tree, options=ImportOptions(chunk=params, durable=False))
        print(f"{label}: the unpacked tree gives the same version id as the tar: {r.version == bases[label][1]}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BOOTD_BENCH_CACHE", "/var/tmp/bootd-bench")))
    ap.add_argument("--real", nargs=2, metavar=("OLD", "NEW"), help="two tar archives of versions of a real tree")
    args = ap.parse_args()
    if os.geteuid() != 0 and not args.real:
        print("delta bench: needs root (change (d) is a chown)", file=sys.stderr)
        return 2
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bootd-bench-delta-", dir=args.cache) as tmp:
        return real(args, Path(tmp)) if args.real else synthetic(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
