#!/usr/bin/env python3
"""Capsule import vs ``tar -cf - DIR | zstd -T0 -3 > /dev/null`` on the same generated tree.

Usage: .venv/bin/python bench/capsule/run.py [--size-mib 1024] [--runs 3] [--cache DIR] [--store DIR]
On a machine shared with other jobs, run it as root under ``nice -n -10`` so both
contenders (the peer inherits the niceness) get the same priority over the rest.

The tree (mixed file sizes, partly compressible) is generated once, deterministically,
into the cache dir and reused. Both sides read it from a warm page cache; bootd also
writes (and fsyncs) its chunk store, which the peer does not have to do. Prints the
medians, the ratio (bootd MB/s / peer MB/s, target >= 0.9), the compression ratio
and the new-bytes share after changing one file.

Every bootd run imports into a new, empty store; the stores are removed after the last
run, not between runs. Why: on ext4 without a journal (this test machine) the inode
allocator skips inodes freed in the last few minutes, scanning past each of them on
every create (perf: recently_deleted under ext4_create). Removing the previous run's
store (~1,100 files) right before an import added 0.1-1 CPU s to it, depending on how
many files earlier runs had removed: a cost of the benchmark's own cleanup, not of the
import. ``--delete-between`` measures that way anyway (how the figures before 2026-11-26
were taken). For the same reason, wait a few minutes after an earlier run's cleanup;
the benchmark warns if it ran less than 6 minutes ago. ``--keep-stores`` skips the
cleanup (for back-to-back runs of different versions; remove them later).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.capsule.chunker import ChunkParams
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore

MiB = 1 << 20
WORDS = [
    "node", "boot", "capsule", "kernel", "chunk", "zstd", "init", "cluster", "stateless", "rack",
    "switch", "daemon", "config", "lib", "usr", "share", "doc", "etc", "var", "log", "systemd",
    "network", "address", "interface", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "=", ":",
    "/", "{", "}", "(", ")", ";", "#", "-", "_", ".", "the", "of", "and", "to", "in", "is", "for",
    "that",
]


def _corpus(rng: random.Random, size: int) -> bytes:
    parts: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + "\n"
        parts.append(line)
        n += len(line)
    return "".join(parts).encode()[:size]


def generate(root: Path, size_mib: int, seed: int = 20261126) -> None:
    """Deterministic tree: ~45% text-like, ~35% random, ~20% half-and-half 'binaries'."""
    done = root / ".complete"
    if done.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    corpus = _corpus(rng, 16 * MiB)
    budget = size_mib * MiB
    total = 0
    i = 0
    while total < budget:
        r = rng.random()
        if r < 0.90:
            size = rng.randint(100, 32 * 1024)  # many small files, as in a root fs
        elif r < 0.997:
            size = rng.randint(32 * 1024, MiB)
        else:
            size = rng.randint(4 * MiB, 32 * MiB)  # a few large ones
        size = min(size, budget - total) or 1
        kind = rng.random()
        if kind < 0.45:
            out = bytearray()
            while len(out) < size:
                off = rng.randrange(0, len(corpus) - 65536)
                out += corpus[off:off + rng.randint(512, 65536)]
            data = bytes(out[:size])
        elif kind < 0.80:
            data = rng.randbytes(size)
        else:
            half = size // 2
            off = rng.randrange(0, len(corpus) - half) if half < len(corpus) else 0
            data = (rng.randbytes(size - half) + corpus[off:off + half])[:size]
            data = data + b"\0" * (size - len(data))
        d = root / f"d{i % 64:02d}" / f"s{(i // 64) % 16:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.bin").write_bytes(data)
        total += size
        i += 1
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), (1_700_000_000, 1_700_000_000))
    done.write_text(f"{i} files {total} bytes\n")


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != ".complete")


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the peer, the worker processes)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_peer(root: Path) -> tuple[float, float, int]:
    t, c = time.perf_counter(), _cpu()
    r = subprocess.run(f"tar -C '{root}' -cf - . | zstd -T0 -3 -c | wc -c", shell=True, check=True,
                       capture_output=True, text=True)
    return time.perf_counter() - t, _cpu() - c, int(r.stdout.strip())


def run_bootd(root: Path, store_dir: Path, durable: bool, processes: bool,
              delete_first: bool, members: bool = True) -> tuple[float, float, int, int]:
    if delete_first:
        shutil.rmtree(store_dir, ignore_errors=True)
    store = CapsuleStore(store_dir)
    t, c = time.perf_counter(), _cpu()
    r = import_capsule(store, "bench", root, options=ImportOptions(chunk=ChunkParams(members=members),
                                                                   durable=durable, processes=processes))
    return time.perf_counter() - t, _cpu() - c, r.raw_size, r.stored_size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("BOOTD_BENCH_CACHE",
                                                                        "/var/tmp/bootd-bench")))
    ap.add_argument("--store", type=Path, default=None, help="store dir (default: under the cache dir)")
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync of staged files (not the default)")
    ap.add_argument("--delete-between", action="store_true",
                    help="one store, removed right before each import (the old way; see above)")
    ap.add_argument("--stream-cuts", action="store_true",
                    help="also import with plain CDC cuts (chunk_cut = stream, before member cuts), interleaved")
    ap.add_argument("--keep-stores", action="store_true",
                    help="leave the stores at the end (for back-to-back runs; remove them later)")
    args = ap.parse_args()

    root = args.cache / f"capsule-tree-{args.size_mib}m-v2"
    cleaned = args.cache / ".stores-removed-at"
    t = time.perf_counter()
    generate(root, args.size_mib)
    gen = time.perf_counter() - t
    stores = args.store or (args.cache / "capsule-stores")
    if stores.exists() and any(stores.iterdir()):
        print(f"note: removing leftover stores in {stores} (an interrupted run?); "
              "freshly freed inodes slow the first imports on ext4 without a journal")
        shutil.rmtree(stores)
        cleaned.write_text(f"{time.time()}\n")
    with contextlib.suppress(OSError, ValueError):
        ago = time.time() - float(cleaned.read_text())
        if ago < 360:
            print(f"warning: stores were removed {ago:.0f} s ago; on ext4 without a journal the "
                  "freed inodes slow bootd's creates for a few minutes (see --help)")
    size = tree_bytes(root)
    print(f"tree {root}: {size / MiB:.0f} MiB ({(root / '.complete').read_text().strip()}), "
          f"ready in {gen:.1f} s; {os.cpu_count()} CPUs")
    # Warm the page cache (through a pipe: GNU tar does not read file data when writing to /dev/null).
    subprocess.run(f"tar -C '{root}' -cf - . | cat > /dev/null", shell=True, check=True)

    peer_t: list[float] = []
    ours_t: list[float] = []
    proc_t: list[float] = []
    stream_t: list[float] = []
    cpu: dict[str, list[float]] = {"peer": [], "threads": [], "processes": [], "stream": []}
    peer_out = raw = stored = 0
    load = [os.getloadavg()[0]]
    def store_for(i: int, mode: str) -> Path:
        return stores / "store" if args.delete_between else stores / f"run{i}-{mode}"

    for i in range(args.runs):  # interleaved, so background load hits every contender alike
        pt, pc, peer_out = run_peer(root)
        peer_t.append(pt)
        cpu["peer"].append(pc)
        store_dir = store_for(i, "threads")
        bt, bc, raw, stored = run_bootd(root, store_dir, durable=not args.no_fsync, processes=False,
                                        delete_first=args.delete_between)
        ours_t.append(bt)
        cpu["threads"].append(bc)
        bt, bc, raw, stored = run_bootd(root, store_for(i, "processes"), durable=not args.no_fsync,
                                        processes=True, delete_first=args.delete_between)
        proc_t.append(bt)
        cpu["processes"].append(bc)
        if args.stream_cuts:
            bt, bc, _, stream_stored = run_bootd(root, store_for(i, "stream"), durable=not args.no_fsync,
                                                 processes=False, delete_first=args.delete_between, members=False)
            stream_t.append(bt)
            cpu["stream"].append(bc)
        load.append(os.getloadavg()[0])
    peer_mbs = size / statistics.median(peer_t) / 1e6
    ours_mbs = size / statistics.median(ours_t) / 1e6
    proc_mbs = size / statistics.median(proc_t) / 1e6

    # One-file change: flip bytes in the middle of one mid-sized file, re-import into the same store.
    victims = sorted(p for p in root.rglob("*.bin") if 256 * 1024 < p.stat().st_size < 2 * MiB)
    victim = victims[len(victims) // 2]
    original = victim.read_bytes()
    st = victim.stat()
    try:
        changed = bytearray(original)
        changed[len(changed) // 2: len(changed) // 2 + 16] = os.urandom(16)
        victim.write_bytes(bytes(changed))
        os.utime(victim, (st.st_atime, st.st_mtime))
        r = import_capsule(CapsuleStore(store_dir), "bench", root, options=ImportOptions(durable=False))
        share = r.new_bytes / r.stored_size
    finally:
        victim.write_bytes(original)
        os.utime(victim, (st.st_atime, st.st_mtime))

    rows = [
        ("tar | zstd -T0 -3", peer_t, peer_mbs, size / peer_out, cpu["peer"]),
        ("bootd import (threads)", ours_t, ours_mbs, raw / stored, cpu["threads"]),
        ("bootd import (processes)", proc_t, proc_mbs, raw / stored, cpu["processes"]),
    ]
    if stream_t:
        rows.append(("bootd, stream cuts (threads)", stream_t, size / statistics.median(stream_t) / 1e6,
                     raw / stream_stored, cpu["stream"]))
    print(f"\n{'tool':<29}{'median s':>10}{'MB/s':>9}{'ratio vs peer':>15}{'best s':>8}{'best ratio':>12}"
          f"{'compression':>13}{'CPU s':>8}")
    for name, times, mbs, comp, c in rows:
        print(f"{name:<29}{statistics.median(times):>10.2f}{mbs:>9.0f}{mbs / peer_mbs:>15.2f}"
              f"{min(times):>8.2f}{min(peer_t) / min(times):>12.2f}{comp:>13.2f}{statistics.median(c):>8.2f}")
    print(f"\nruns (s): peer {[round(x, 2) for x in peer_t]}  threads {[round(x, 2) for x in ours_t]}  "
          f"processes {[round(x, 2) for x in proc_t]}")
    print(f"load average (1 min) during the runs: {[round(x, 1) for x in load]}")
    best = max(ours_mbs, proc_mbs)
    print(f"speed ratio bootd/peer: {best / peer_mbs:.2f}  (best bootd mode; target >= 0.9)")
    print(f"new-bytes share after changing one file ({victim.stat().st_size} B): {share * 100:.2f}% "
          f"({r.new_chunks} new chunks of {r.chunks})")
    if not args.keep_stores:
        shutil.rmtree(stores, ignore_errors=True)
        cleaned.write_text(f"{time.time()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
