#!/usr/bin/env python3
"""Render the shipped overlays for N nodes (default 5,000) and print the time and the bytes.

Usage: .venv/bin/python bench/overlay/render.py [--nodes 5000] [--users 50]
Run it alone: flock /tmp/bootd-bench.lock .venv/bin/python bench/overlay/render.py

Each node gets its system set (hostname, machine-id, ssh-host-keys, network, chrony) and its
runtime set (hosts, authorized-keys, users) rendered as the daemon would: one RenderCache per
batch, so templates that read only the cluster view (/etc/hosts of every node) render once.
Host keys are fixed strings of real sizes (ssh-keygen for 5,000 nodes would measure ssh-keygen).
Also prints the uncached time for a sample of nodes, to show what the cache buys.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bootd.overlay import (
    RUNTIME_OVERLAYS,
    SYSTEM_OVERLAYS,
    ClusterNode,
    ClusterView,
    Context,
    GroupInfo,
    HostKey,
    MasterInfo,
    NodeInfo,
    OverlayStore,
    RenderCache,
    User,
    UserGroup,
    render,
)


def contexts(n: int, users: int) -> list[Context]:
    view = ClusterView(tuple(ClusterNode(f"n{i:04d}", f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}", "default")
                             for i in range(n)), domain="cluster")
    master = MasterInfo(name="master", address="10.255.255.254",
                        authorized_keys=tuple(f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:040d} admin{i}@master"
                                              for i in range(3)),
                        users=tuple(User(f"user{i}", 1000 + i, 1000 + i, f"User {i}", f"/home/user{i}", "/bin/bash")
                                    for i in range(users)),
                        groups=tuple(UserGroup(f"user{i}", 1000 + i, (f"user{i}",)) for i in range(users)))
    group = GroupInfo("default", {"site": "bench"})
    out = []
    for i, cn in enumerate(view.nodes):
        keys = {"ed25519": HostKey("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "A" * 340 + f"{i}\n-----END...\n",
                                   f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:043d} root@{cn.name}\n"),
                "rsa": HostKey("-----BEGIN OPENSSH PRIVATE KEY-----\n" + "B" * 2500 + f"{i}\n-----END...\n",
                               "ssh-rsa " + "C" * 540 + f"{i} root@{cn.name}\n")}
        node = NodeInfo(cn.name, f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}", "default",
                        cn.ip, machine_id=f"{i:032x}", host_keys=keys)
        out.append(Context(node, group, view, master))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--sample", type=int, default=100, help="nodes rendered without the cache, for comparison")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = OverlayStore(Path(tmp))
        t0 = time.perf_counter()
        system = store.load_many(SYSTEM_OVERLAYS)
        runtime = store.load_many(RUNTIME_OVERLAYS)
        load_s = time.perf_counter() - t0
    ctxs = contexts(args.nodes, args.users)
    cache = RenderCache()
    sys_bytes: list[int] = []
    run_bytes: list[int] = []
    t0 = time.perf_counter()
    for i, ctx in enumerate(ctxs):
        sys_bytes.append(len(render(system, ctx, cache=cache).data))
        run_bytes.append(len(render(runtime, ctx, cache=cache).data))
        if (i + 1) % 1000 == 0:
            print(f"  {i + 1} nodes, {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    total = time.perf_counter() - t0
    sample = ctxs[: args.sample]
    t1 = time.perf_counter()
    for ctx in sample:
        render(system, ctx)
        render(runtime, ctx)
    uncached = (time.perf_counter() - t1) / max(1, len(sample))
    print(f"overlays loaded and compiled: {load_s * 1000:.0f} ms (shipped set)")
    print(f"rendered {args.nodes} nodes (system + runtime sets, {args.users} users): {total:.2f} s, "
          f"{total / args.nodes * 1e6:.0f} us per node, cache hits {cache.hits}")
    print(f"system tar per node:  median {statistics.median(sys_bytes):.0f} bytes")
    print(f"runtime tar per node: median {statistics.median(run_bytes):.0f} bytes "
          f"(hosts of {args.nodes} nodes, authorized_keys, {args.users} users)")
    print(f"without the cache: {uncached * 1e3:.1f} ms per node (sample of {len(sample)}), "
          f"{uncached * args.nodes:.0f} s for {args.nodes} nodes")


if __name__ == "__main__":
    main()
