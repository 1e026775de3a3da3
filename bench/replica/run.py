"""A replica serving a capsule cold (every object fetched from its upstream on first request) vs warm.

    .venv/bin/python bench/replica/run.py [--mib 64] [--nodes 8] [--streams 4] [--reps 3]

Imports one capsule (incompressible data, ~MIB MiB, FastCDC chunks of ~1 MiB) into a primary's store
and runs two real `bootd serve` processes on loopback: the primary, and a replica whose
``capsule.upstream`` is the primary.  A round is NODES simulated nodes, each fetching the manifest and
then every chunk over STREAMS keep-alive connections (as bootd-fetch does), all at once.  Per rep:
the primary directly, the replica cold (a fresh, empty store: its first requests go to the primary),
then the same replica warm.  Prints the median seconds per round, the delivered MiB/s, and what the
replica asked of its upstream (it should be one copy of the capsule, however many nodes ask).
Run it alone: ``flock /tmp/bootd-bench.lock .venv/bin/python bench/replica/run.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bootd.capsule.chunker import ChunkParams  # noqa: E402
from bootd.capsule.importer import ImportOptions, import_capsule  # noqa: E402
from bootd.capsule.objects import CapsuleStore  # noqa: E402
from bootd.lab.netns import kill_pid  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_capsule(store: Path, work: Path, mib: int) -> tuple[str, list[str], int]:
    tree = work / "tree"
    tree.mkdir()
    rnd = random.Random(18)
    for i in range(mib):
        (tree / f"f{i:04d}.bin").write_bytes(rnd.randbytes(1 << 20))
    opts = ImportOptions(chunk=ChunkParams(256 * 1024, 1024 * 1024, 4 * 1024 * 1024), zstd_level=1, durable=False)
    result = import_capsule(CapsuleStore(store), "bench", tree, options=opts)
    manifest = CapsuleStore(store).load_manifest(result.version)
    return result.version, [c.sha256 for c in manifest.chunks], manifest.stored_size


class Serve:
    def __init__(self, work: Path, name: str, store: Path, upstream: str = "") -> None:
        self.port = free_port()
        state = work / name
        state.mkdir(exist_ok=True)
        cfg = work / f"{name}.toml"
        cfg.write_text(
            f'[server]\nstate_dir = "{state}"\naddress = "127.0.0.1"\n'
            f'[http]\nlisten = "127.0.0.1"\nport = {self.port}\nmax_bulk_streams = 256\nbulk_queue = 1024\n'
            f"bulk_per_source = 256\nmax_connections_per_source = 1024\n"
            f'[admin]\nport = {free_port()}\n[capsule]\ndir = "{store}"\n'
            + (f'upstream = "{upstream}"\nupstream_connections = 8\n' if upstream else ""))
        self.log = (work / f"{name}.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bootd", "-c", str(cfg), "serve"], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"bootd serve {name} exited: {(work / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        raise SystemExit(f"bootd serve {name} did not listen")

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:_total)?(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self) -> None:
        kill_pid(self.proc.pid, grace=15)
        self.proc.wait()
        self.log.close()


async def node(session: aiohttp.ClientSession, base: str, vid: str, chunks: list[str], streams: int) -> int:
    """One node: the manifest, then every chunk over ``streams`` connections, each body read whole."""
    async with session.get(f"{base}/capsules/{vid}/manifest") as r:
        r.raise_for_status()
        await r.read()
    todo = list(chunks)
    got = 0

    async def stream() -> None:
        nonlocal got
        while todo:
            h = todo.pop(0)
            for _ in range(50):
                async with session.get(f"{base}/chunks/{h}") as r:
                    if r.status == 503:
                        await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                        continue
                    if r.status != 200:
                        raise SystemExit(f"{base}/chunks/{h}: {r.status} {(await r.read())[:300]!r}")
                    body = await r.read()
                    if len(body) != r.content_length:
                        print(f"short {base} {h[:12]} {len(body)} of {r.content_length}", flush=True)
                    got += len(body)
                    break
            else:
                raise SystemExit(f"{base}/chunks/{h}: still 503 after 50 tries")

    await asyncio.gather(*(stream() for _ in range(streams)))
    return got


async def storm(base: str, vid: str, chunks: list[str], nodes: int, streams: int) -> tuple[float, int]:
    started = time.monotonic()
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams)) for _ in range(nodes)]
    try:
        order = [random.Random(i).sample(chunks, len(chunks)) for i in range(nodes)]
        sizes = await asyncio.gather(*(node(s, base, vid, o, streams) for s, o in zip(sessions, order,
                                                                                      strict=True)))
    finally:
        for s in sessions:
            await s.close()
    return time.monotonic() - started, sum(sizes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bootd-bench-replica-"))
    try:
        store = work / "primary-store"
        vid, chunks, stored = make_capsule(store, work, args.mib)
        print(f"capsule: {len(chunks)} chunks, {stored / 2**20:.1f} MiB stored; {args.nodes} nodes x "
              f"{args.streams} streams; load {os.getloadavg()[0]:.1f}", flush=True)
        primary = Serve(work, "primary", store)
        rows: dict[str, list[float]] = {"primary": [], "replica cold": [], "replica warm": []}
        fetched: list[float] = []
        try:
            for rep in range(args.reps):
                seconds, got = asyncio.run(storm(primary.url, vid, chunks, args.nodes, args.streams))
                assert got == args.nodes * stored, (got, args.nodes * stored)
                rows["primary"].append(seconds)
                replica_store = work / f"replica-store-{rep}"
                replica = Serve(work, f"replica-{rep}", replica_store, upstream=primary.url)
                try:
                    for label in ("replica cold", "replica warm"):
                        seconds, got = asyncio.run(storm(replica.url, vid, chunks, args.nodes, args.streams))
                        assert got == args.nodes * stored, (got, args.nodes * stored)
                        rows[label].append(seconds)
                    fetched.append(replica.metric("bootd_upstream_bytes"))
                finally:
                    replica.stop()
                    shutil.rmtree(replica_store, ignore_errors=True)
                print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items()), flush=True)
        finally:
            primary.stop()
        total = args.nodes * stored / 2**20
        print(f"\n{'server':<14} {'median s':>9} {'MiB/s':>8}   ({args.nodes} nodes x {stored / 2**20:.1f} MiB, "
              f"median of {args.reps})")
        for label, values in rows.items():
            med = statistics.median(values)
            print(f"{label:<14} {med:>9.2f} {total / med:>8.0f}")
        print(f"upstream bytes per cold round: {statistics.median(fetched) / 2**20:.1f} MiB "
              f"(one copy: {stored / 2**20:.1f} MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
