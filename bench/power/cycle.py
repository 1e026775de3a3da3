#!/usr/bin/env python3
"""Power-cycle N simulated BMCs (default 100) with the default parallelism and print the time.

Usage: .venv/bin/python bench/power/cycle.py [--bmcs 100] [--runs 3] [--parallel N] [--stagger N]
Run it alone: flock /tmp/bootd-bench.lock .venv/bin/python bench/power/cycle.py

The BMCs are bootd/lab/bmc.py (pyghmi's IPMI 2.0 server, one UDP port each, all in one process);
bootd's power service runs in this process over a real SQLite registry, one worker process per BMC
as in `bootd power`.  Each run is one `power cycle` of every node (the first finds them off and
powers them on; the others cycle them); the BMCs' own log says when the last command arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd import compose
from bootd.config import from_dict
from bootd.lab.bmc import simulator
from bootd.store.sqlite import SqliteNodeStore

PASSWORD = "bench-pw"


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    power = {"parallel": args.parallel} if args.parallel else {}
    config = from_dict({"server": {"state_dir": str(workdir / "state")}, "power": power})
    store = SqliteNodeStore(config.db_path)
    _, services = compose.services(config, store=store)
    failures = 0
    try:
        with simulator(args.bmcs, password=PASSWORD, log=workdir / "bmc.log") as sim:
            await services.nodes.put_group("rack", {"vars": {"bmc.address": "127.0.0.1", "bmc.user": "admin"}},
                                           create=True, who="bench")
            for i, port in enumerate(sim.ports):
                await services.nodes.add(f"n{i:04d}", f"52:54:00:10:{i // 256:02x}:{i % 256:02x}",
                                         {"group": "rack", "vars": {"bmc.port": str(port)}}, who="bench")
            await services.power.set_password("@rack", PASSWORD, who="bench")
            hostlist = f"n[0000-{args.bmcs - 1:04d}]"
            print(f"{args.bmcs} BMCs, parallel {config.power.parallel}, stagger {args.stagger or 0:g}/s")
            times = []
            for run in range(args.runs):
                before = len(sim.records())
                t0 = time.monotonic()
                results = await services.power.run(hostlist, "cycle", who="bench", stagger=args.stagger)
                elapsed = time.monotonic() - t0
                bad = [r for r in results if not r.ok]
                failures += len(bad)
                arrived = [r["ts"] for r in sim.records()[before:] if r["what"] in ("on", "cycle")]
                slowest = max(r.seconds for r in results)
                print(f"run {run + 1}: {elapsed:.2f} s for {len(results)} nodes ({len(bad)} failed), "
                      f"{len(arrived)} power commands over {max(arrived) - min(arrived):.2f} s at the BMCs, "
                      f"slowest node {slowest:.2f} s" + (f"; first failure: {bad[0].message}" if bad else ""))
                times.append(elapsed)
            print(f"median {statistics.median(times):.2f} s, best {min(times):.2f} s")
    finally:
        await store.close()
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bmcs", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, help="default: power.parallel")
    parser.add_argument("--stagger", type=float)
    args = parser.parse_args()
    if not 1 <= args.bmcs <= 1000 or not 1 <= args.runs <= 20:
        parser.error("--bmcs from 1 to 1000, --runs from 1 to 20")
    with tempfile.TemporaryDirectory(prefix="bootd-bench-power-") as tmp:
        return asyncio.run(bench(args, Path(tmp)))


if __name__ == "__main__":
    sys.exit(main())
