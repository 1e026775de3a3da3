#!/usr/bin/env python3
"""How big bootd's SQLite WAL gets under sustained DHCP load, and whether it shrinks after.

perfdhcp offers ``--rate`` DORA exchanges/s from ``--clients`` simulated clients for ``--seconds`` (the same
clients again and again once each has registered, as a rack renewing its leases), against bootd in the same
namespaces as bench/dhcp/run.py; the WAL file's size is printed every 5 s and once the load has stopped.
The WAL is bounded by the registry's checkpointer (bootd/store/sqlite.py, ``WAL_LIMIT``).

Usage: sudo .venv/bin/python bench/dhcp/wal.py [--rate 1000] [--clients 10000] [--seconds 60]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.dhcp import run as bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--seconds", type=int, default=60)
    args = ap.parse_args()
    if not 0 < args.seconds <= 600 or not 0 < args.rate <= 20000:
        ap.error("choose --seconds 1..600 and --rate 1..20000 (every load loop is bounded)")
    bench.setup()
    try:
        with tempfile.TemporaryDirectory(prefix="bd-dhcp-wal-") as tmp:
            work = Path(tmp) / "bootd"
            proc = bench.start_server("bootd", work)
            wal = work / "state" / "bootd.sqlite-wal"
            try:
                load = subprocess.Popen(bench.perfdhcp_command(args.rate, args.clients, args.seconds),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                t0, largest = time.monotonic(), 0
                while load.poll() is None and time.monotonic() - t0 < args.seconds + 30:
                    time.sleep(5)
                    size = wal.stat().st_size if wal.exists() else 0
                    largest = max(largest, size)
                    print(f"{time.monotonic() - t0:5.0f} s  WAL {size / 1e6:8.1f} MB", flush=True)
                load.kill()
                out = load.communicate()[0]
                time.sleep(3)
                after = wal.stat().st_size if wal.exists() else 0
                for line in out.splitlines():
                    if line.startswith(("Rate:", "drops:", "avg delay:")):
                        print("perfdhcp", line)
                print(f"largest WAL under load {largest / 1e6:.1f} MB; 3 s after the load {after / 1e6:.1f} MB")
            finally:
                bench.stop_server(proc)
    finally:
        bench.teardown()


if __name__ == "__main__":
    main()
