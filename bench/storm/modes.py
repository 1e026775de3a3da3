"""The scale-out comparison: one storm against one server on SQLite, one on PostgreSQL, two on PostgreSQL.

    flock /tmp/bootd-bench.lock .venv/bin/python bench/storm/modes.py [--nodes 2000] [--modes sqlite,pg,pg2] [--runs 3]

Each mode is a fresh segment (cluster.py) and a fresh registry; PostgreSQL is a private server started for
the run (tests/pgserver.py: initdb into a temporary directory, a Unix socket only).  With two servers, b is
a's replica (capsule.upstream) warmed by `bootd capsule sync` before the storm: a serves one copy of the
capsule to b, then each serves the nodes of its RFC 3074 share.  Printed per mode: the time for every node
to reach `ready`, DHCP exchanges/s (completed DORAs over the time to the last ACK), and the share of the
chunk bytes each server sent to nodes; then the issue's three ratios.  With ``--runs N`` the modes alternate
N times in the one run (a storm's time swings by tens of percent from run to run on a shared machine: its
DHCP retry waves are chaotic) and the ratios are of the medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.storm.cluster import collect, segment  # noqa: E402
from bench.storm.run import POOL_SIZE  # noqa: E402
from tests.pgserver import PgServer  # noqa: E402


@dataclass
class ModeResult:
    mode: str
    nodes: int
    ok: int
    duration: float
    dhcp_per_s: float
    chunk_bytes: dict[str, int] = field(default_factory=dict)  # by server id
    sync_bytes: int = 0  # what the first server sent its replica before the storm (capsule sync)
    capsule_bytes: int = 0  # one copy of the capsule (the sum of its stored chunk sizes)
    errors: list[str] = field(default_factory=list)


def dhcp_rate(results: list[dict[str, Any]]) -> float:
    done = [r["times"]["dhcp"] for r in results if "dhcp" in r["times"]]
    return len(done) / max(done) if done else 0.0


def one_mode(mode: str, nodes: int, deadline: float, workdir: Path, pg: PgServer | None) -> ModeResult:
    from bench.storm.run import make_capsule

    workdir.mkdir(parents=True, exist_ok=True)
    with segment(workdir) as seg:
        url = pg.new_schema_url() if pg is not None else ""
        password = pg.password if pg is not None else ""
        seg.add_server("a", url, password)
        if mode == "pg2":
            seg.add_server("b", url, password, upstream="a")
        make_capsule(workdir, seg.servers["a"].config)
        for ident in seg.servers:
            seg.start(ident)
        synced = False
        if mode == "pg2":
            out = seg.cli("b", "capsule", "sync", "--from", seg.servers["a"].url).strip()
            print(out.splitlines()[-1] if out else "sync: no output", flush=True)
            synced = "0 object(s) fetched" not in out
            seg.wait_live("a", {"a", "b"})
        client = seg.storm(nodes, deadline)
        results, duration = collect(client, deadline + 120)
        by_ip = {s.address: ident for ident, s in seg.servers.items()}
        chunk: dict[str, int] = {}
        for r in results:
            for host, n in r["chunk_bytes"].items():
                key = by_ip.get(host, host)
                chunk[key] = chunk.get(key, 0) + n
        ok = [r for r in results if r["ok"]]
        errors = sorted({r["error"] for r in results if not r["ok"]})[:10]
        # Every node fetches every chunk once: one copy of the capsule is what one node was sent.
        copy = sum(chunk.values()) // max(1, len(ok))
        return ModeResult(mode, nodes, len(ok), duration, dhcp_rate(results), chunk, copy if synced else 0, copy,
                          errors)


def median_result(results: list[ModeResult]) -> ModeResult:
    """The run of median time (the upper one of an even count), so its bytes and rates belong together."""
    ordered = sorted(results, key=lambda r: (r.ok < r.nodes, r.duration))  # a run short of nodes is the slowest
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--modes", default="sqlite,pg,pg2", help="comma-separated: sqlite, pg, pg2")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds each storm may take (bounded)")
    parser.add_argument("--runs", type=int, default=1, help="alternate the modes this many times; medians")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("sqlite", "pg", "pg2")]
    if bad:
        parser.error(f"unknown mode(s) {', '.join(bad)}: choose from sqlite, pg, pg2")
    if not 0 < args.nodes <= POOL_SIZE:
        parser.error(f"--nodes {args.nodes}: choose 1 to {POOL_SIZE} (the segment's address pool)")
    if not 0 < args.runs <= 20:
        parser.error(f"--runs {args.runs}: choose 1 to 20")
    runs: dict[str, list[ModeResult]] = {m: [] for m in modes}
    pg: PgServer | None = None
    with tempfile.TemporaryDirectory(prefix="bootd-modes-") as tmp:
        try:
            if any(m.startswith("pg") for m in modes):
                pg = PgServer()
                pg.init()
            for run, mode in ((r, m) for r in range(args.runs) for m in modes):
                print(f"run {run + 1}/{args.runs} mode {mode}: {args.nodes} nodes ...", flush=True)
                res = one_mode(mode, args.nodes, args.deadline, Path(tmp) / f"{mode}-{run}",
                               pg if mode != "sqlite" else None)
                runs[mode].append(res)
                total = sum(res.chunk_bytes.values()) or 1
                shares = ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(res.chunk_bytes.items()))
                print(f"mode {mode:6} ready {res.ok}/{res.nodes} in {res.duration:.1f} s, "
                      f"DHCP {res.dhcp_per_s:.0f} exchanges/s, chunk bytes {total / 1e6:.0f} MB ({shares})"
                      + (f", sync to replica {res.sync_bytes / 1e6:.1f} MB" if res.sync_bytes else "")
                      + (f", errors {res.errors}" if res.errors else ""), flush=True)
        finally:
            if pg is not None:
                pg.cleanup()
    out = {m: median_result(rs) for m, rs in runs.items() if rs}
    if args.runs > 1:
        for mode, rs in runs.items():
            times = ", ".join(f"{r.duration:.1f}" for r in rs)
            print(f"mode {mode:6} times {times} s: median {out[mode].duration:.1f} s, "
                  f"DHCP {out[mode].dhcp_per_s:.0f} exchanges/s in that run")
    if "sqlite" in out and "pg" in out:
        print(f"pg / sqlite time       {out['pg'].duration / out['sqlite'].duration:.2f}x (target <= 1.25x)")
    if "pg" in out and "pg2" in out:
        print(f"pg2 / pg time          {out['pg2'].duration / out['pg'].duration:.2f}x (target <= 1.15x)")
    if "pg2" in out:
        r = out["pg2"]
        total = sum(r.chunk_bytes.values()) or 1
        first = r.chunk_bytes.get("a", 0)
        limit = 0.55 * total + r.capsule_bytes
        print(f"pg2 first server       {first + r.sync_bytes} bytes (nodes {first / total:.1%} + sync "
              f"{r.sync_bytes}) vs limit 55% + one capsule = {limit:.0f}: "
              f"{'OK' if first + r.sync_bytes <= limit else 'OVER'}")
    if args.json:
        args.json.write_text(json.dumps({k: [asdict(r) for r in rs] for k, rs in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
