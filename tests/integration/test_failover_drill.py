"""The failover drill: two `bootd serve` on one bridge and one real PostgreSQL, b the replica of a
(capsule.upstream), 300 simulated nodes from the storm client (bench/storm/storm.py) booting through them.

    srv-a 10.78.0.1 ──┐
    srv-b 10.78.0.3 ──┼── lan:br0 ── cli 10.78.0.2 (storm.py: every node does DORA, TFTP, script, manifest,
                                                     verified chunks, events, heartbeat until `ready`)

Run 1 kills b (the replica) with SIGKILL mid-storm, run 2 kills a (the primary) after `bootd capsule sync`
warmed b, run 3 restarts PostgreSQL mid-storm.  Each time every node reaches `ready` (through the survivor,
which takes the dead server's RFC 3074 share after takeover_after, and the other sources the iPXE script
names), no address is leased twice, no name used twice, every node's lease is in the database, and the
killed server restarts and serves nodes again.  No QEMU node here: the QEMU boots against two servers
are test_dhcp_qemu's territory and would double this drill's time.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.storm.cluster import ADDRESSES, Segment, collect, segment
from bench.storm.run import make_capsule
from tests.conftest import need_root, need_tool
from tests.pgserver import PgServer

# Not yet in `make test` (the Makefile leaves it out): on a loaded 2-core machine a node whose server
# is killed after it booted can go stale (its agent heartbeats to that server only; README "Scaling
# out"), so the drill runs on demand: `make drill`.
pytestmark = [pytest.mark.netns, pytest.mark.timeout(600)]

NODES = 300
DEADLINE = 240.0


@pytest.fixture
def seg(tmp_path: Path, postgres_server: PgServer) -> Iterator[Segment]:
    """a and b on one fresh schema, b a's replica, the capsule imported on a, both live."""
    need_root()
    need_tool("ip", "curl")
    with segment(tmp_path) as s:
        url = postgres_server.new_schema_url()
        s.add_server("a", url, postgres_server.password)
        s.add_server("b", url, postgres_server.password, upstream="a")
        make_capsule(tmp_path, s.servers["a"].config, size_mib=1)
        s.start("a")
        s.start("b")
        s.wait_live("a", {"a", "b"})
        # b resolves capsule names for boot scripts from its own store: a cold replica fetches objects on a
        # miss, but cannot name the version of `storm` until it has synced (README "Scaling out").
        s.cli("b", "capsule", "sync", "--from", s.servers["a"].url)
        yield s


def check(seg: Segment, results: list[dict[str, Any]], survivor: str, states: tuple[str, ...] = ("ready",)) -> None:
    """Every node ready; no address and no name twice; every node's lease in the database."""
    failed = [(r["mac"], r["error"]) for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} node(s) failed, e.g. {failed[:5]}"
    names = Counter(r["name"] for r in results)
    ips = Counter(r["ip"] for r in results)
    assert [n for n, c in names.items() if c > 1] == [] and len(names) == len(results)
    assert [ip for ip, c in ips.items() if c > 1] == [] and len(ips) == len(results)
    nodes = {n["mac"]: n for n in json.loads(seg.cli(survivor, "node", "list", "--json"))}
    leases = json.loads(seg.cli(survivor, "lease", "list", "--json"))
    lease_ips = Counter(x["ip"] for x in leases)
    assert [ip for ip, c in lease_ips.items() if c > 1] == []
    by_mac = {x["mac"]: x["ip"] for x in leases}
    for r in results:
        assert by_mac.get(r["mac"]) == r["ip"], (r["mac"], r["ip"], by_mac.get(r["mac"]))
        node = nodes[r["mac"]]
        assert node["name"] == r["name"] and node["state"] in states, node


def metric(seg: Segment, ident: str, name: str) -> float:
    server = seg.servers[ident]
    text = subprocess.run(["ip", "netns", "exec", server.ns, "curl", "-sf", "-m", "10", f"{server.url}/metrics"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def storm_with(seg: Segment, nodes: int, action: Any, watch: str, leased: int = 30) -> list[dict[str, Any]]:
    """A storm, with ``action()`` once ``leased`` nodes hold a lease (asked of server ``watch``), while the
    storm is still running (a fixed delay would land before the first lease on a loaded machine)."""
    client = seg.storm(nodes, DEADLINE)
    deadline = time.monotonic() + 120
    while len(json.loads(seg.cli(watch, "lease", "list", "--json"))) < leased and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.poll() is None, "the storm ended before the fault: not a mid-storm drill"
    action()
    results, _ = collect(client, DEADLINE + 120)
    return results


def serves_again(seg: Segment, ident: str, first_index: int) -> None:
    """The killed server restarts, rejoins, and boots the new nodes of its share (DHCP and chunks)."""
    seg.start(ident)
    seg.wait_live("a", {"a", "b"})
    results, _ = collect(seg.storm(40, 120, first_index=first_index), 240)
    assert all(r["ok"] for r in results), [r["error"] for r in results if not r["ok"]][:5]
    mine = [r for r in results if r["server"] == ADDRESSES[ident]]
    assert mine, f"{ident} answered none of 40 new nodes after its restart"
    assert sum(r["chunk_bytes"].get(ADDRESSES[ident], 0) for r in mine) > 0


def test_replica_killed_mid_storm(seg: Segment) -> None:
    results = storm_with(seg, NODES, lambda: seg.kill("b"), watch="a")
    check(seg, results, "a")
    # b was booting part of the storm when it died: those nodes finished through a.
    assert any(ADDRESSES["b"] in r["acked_by"] for r in results), "b leased to no node before it was killed"
    serves_again(seg, "b", first_index=10_000)
    # Nothing lost, seen from the restarted server too (by now the storm's nodes, which stopped their
    # heartbeats when it ended, may have gone stale: they were ready above).
    check(seg, results, "b", states=("ready", "stale"))


def test_primary_killed_mid_storm_after_sync(seg: Segment) -> None:
    out = seg.cli("b", "capsule", "sync", "--from", seg.servers["a"].url)  # again: nothing left to fetch
    assert "0 object(s) fetched" in out, out
    results = storm_with(seg, NODES, lambda: seg.kill("a"), watch="b")
    check(seg, results, "b")
    # a was booting part of the storm when it died: those nodes finished through b.
    from_a = [r for r in results if ADDRESSES["a"] in r["acked_by"]]
    assert from_a, "a leased to no node before it was killed"
    assert all(set(r["chunk_bytes"]) <= {ADDRESSES["a"], ADDRESSES["b"]} for r in results)
    log = seg.servers["b"].log.read_text()
    assert "event=cluster-changed live=b was=a,b" in log
    serves_again(seg, "a", first_index=10_000)


def test_postgresql_restart_mid_storm(seg: Segment, postgres_server: PgServer) -> None:
    def restart() -> None:
        postgres_server.stop("fast")
        time.sleep(1.0)
        postgres_server.start()

    results = storm_with(seg, NODES, restart, watch="a")
    check(seg, results, "a")
    # The restart was felt (connections broken mid-storm) and recovered from, not slept through.
    assert sum(metric(seg, ident, "bootd_store_reconnects_total") for ident in ("a", "b")) > 0
    for ident in ("a", "b"):
        assert seg.servers[ident].proc is not None and seg.servers[ident].proc.poll() is None, f"{ident} died"
        assert seg.healthy(ident)
