"""The failover drill: two `bootd serve` on one bridge and one real PostgreSQL, b the replica of a
(capsule.upstream), simulated nodes from the storm client (bench/storm/storm.py) booting through them.

    srv-a 10.78.0.1 ──┐
    srv-b 10.78.0.3 ──┼── lan:br0 ── cli 10.78.0.2 (storm.py: every node does DORA, TFTP, script, manifest,
                                                     verified chunks, events, then heartbeats as the node
                                                     agent does, failing over to the next source)

Run 1 kills b (the replica, still cold: it resolves the capsule's name from a and fetches on a miss) with
SIGKILL mid-storm, run 2 kills a (the primary) after `bootd capsule sync` warmed b, run 3 restarts PostgreSQL
mid-storm.  Each time every node reaches `ready` (through the survivor, which takes the dead server's RFC
3074 share after takeover_after, and the other sources the iPXE script names), the nodes that were ready
through the dead server keep heartbeating through the survivor (so none goes stale), no address is leased
twice, no name used twice, every node's lease is in the database, and the killed server restarts and serves
nodes again.

One real node joins run 2: a QEMU machine (SeaBIOS, iPXE, the real stage one and the busybox capsule with
the node agent) powered on the moment a dies, which must reach `ready` through b alone (BOOTD_DRILL_QEMU=0
leaves it out, for a machine without QEMU).

The three runs share one segment and one registry (each run its own MACs), so the servers start once.
`make test` and `make drill` run the issue's 300 nodes a run (BOOTD_DRILL_NODES for another count).  Every wait
is bounded and says what it waited for; a failure shows the servers' last log lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.storm.cluster import ADDRESSES, Segment, collect, segment
from bench.storm.run import make_capsule
from bench.storm.storm import mac_of, mac_text
from bootd.lab import Lab, QemuNode, qemu_available
from bootd.lab.sample import build_busybox_capsule
from tests.conftest import need_root, need_tool
from tests.pgserver import PgServer
from tests.qemu.conftest import stage1  # noqa: F401  (fixture: not asked for with BOOTD_DRILL_QEMU=0)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(900)]

NODES = int(os.environ.get("BOOTD_DRILL_NODES", "300"))
AGAIN = max(20, NODES // 8)  # the new nodes a restarted server must help boot
DEADLINE = 240.0
HEARTBEAT = 4.0  # the simulated agents' interval once ready (the real one's default is 30 s)
LINGER = 2.5 * HEARTBEAT  # every ready node reports again after the storm's last node, whatever died before
QEMU = os.environ.get("BOOTD_DRILL_QEMU", "1") != "0"
QEMU_MAC = "52:54:00:78:00:01"
QEMU_READY = 420.0  # TCG on a 2-core machine busy with a storm: minutes, not the notes' 7-25 s


@pytest.fixture(scope="module")
def seg(tmp_path_factory: pytest.TempPathFactory, postgres_server: PgServer,
        request: pytest.FixtureRequest) -> Iterator[Segment]:
    """a and b on one fresh schema, b a's replica (cold: nothing synced), the capsule imported on a; with
    QEMU, a stage one on both and the busybox capsule for the real node."""
    need_root()
    need_tool("ip", "curl")
    stage1_dir: Path | None = None
    if QEMU:
        reason = qemu_available("bios")
        if reason:
            pytest.fail(f"the drill's QEMU node: {reason} (BOOTD_DRILL_QEMU=0 leaves it out)")
        stage1_dir = request.getfixturevalue("stage1").out_dir
    tmp = tmp_path_factory.mktemp("drill")
    with segment(tmp) as s:
        url = postgres_server.new_schema_url()
        s.add_server("a", url, postgres_server.password, stage1_dir=stage1_dir)
        s.add_server("b", url, postgres_server.password, upstream="a", stage1_dir=stage1_dir)
        make_capsule(tmp, s.servers["a"].config, size_mib=1, kernel=not QEMU)
        if QEMU:
            tarball = build_busybox_capsule(tmp / "busybox")
            assert tarball is not None, "capsules/busybox/build.sh is missing"
            s.cli("a", "capsule", "import", "busybox", str(tarball))
            s.cli("a", "node", "add", "qnode", "--mac", QEMU_MAC, "--capsule", "busybox",
                  "--var", f"BOOTD_HEARTBEAT={HEARTBEAT:g}")
        s.start("a")
        s.start("b")
        s.wait_live("a", {"a", "b"})
        yield s


@pytest.fixture(autouse=True)
def both_live(seg: Segment, postgres_server: PgServer) -> Iterator[None]:
    """Each run starts with both servers (and PostgreSQL) up, even after an earlier run failed midway."""
    if not postgres_server.running:
        postgres_server.start()
    for ident in ("a", "b"):
        proc = seg.servers[ident].proc
        if proc is None or proc.poll() is not None:
            seg.start(ident)
    seg.wait_live("a", {"a", "b"})
    yield


def logs(seg: Segment) -> str:
    return "".join(f"\n--- bootd {i} (last lines) ---\n" + "\n".join(s.log.read_text().splitlines()[-25:])
                   for i, s in seg.servers.items())


def macs(first_index: int, nodes: int) -> set[str]:
    return {mac_text(mac_of(i)) for i in range(first_index, first_index + nodes)}


def check(seg: Segment, results: list[dict[str, Any]], survivor: str, states: tuple[str, ...] = ("ready",)) -> None:
    """Every node ready; no address and no name twice (in the whole registry); every node's lease in the database."""
    failed = [(r["mac"], r["error"]) for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} node(s) failed, e.g. {failed[:5]}{logs(seg)}"
    names = Counter(r["name"] for r in results)
    ips = Counter(r["ip"] for r in results)
    assert [n for n, c in names.items() if c > 1] == [] and len(names) == len(results)
    assert [ip for ip, c in ips.items() if c > 1] == [] and len(ips) == len(results)
    all_nodes = json.loads(seg.cli(survivor, "node", "list", "--json"))
    assert [n for n, c in Counter(n["name"] for n in all_nodes).items() if c > 1] == []
    nodes = {n["mac"]: n for n in all_nodes}
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


def leased(seg: Segment, ident: str, mine: set[str]) -> int:
    return sum(1 for x in json.loads(seg.cli(ident, "lease", "list", "--json")) if x["mac"] in mine)


def ready(seg: Segment, ident: str, mine: set[str]) -> int:
    return sum(1 for n in json.loads(seg.cli(ident, "node", "list", "--json"))
               if n["mac"] in mine and n["state"] == "ready")


def storm_with(seg: Segment, first_index: int, action: Callable[[], None], watch: str, what: str,
               progress: Callable[[Segment, str, set[str]], int], enough: int) -> list[dict[str, Any]]:
    """A storm of NODES, with ``action()`` once ``progress`` (asked of server ``watch``) counts ``enough``
    of this storm's nodes, while the storm still runs (a fixed delay would land before the first lease on a
    loaded machine, or after the storm on an idle one)."""
    mine = macs(first_index, NODES)
    client = seg.storm(NODES, DEADLINE, first_index=first_index, heartbeat=HEARTBEAT, linger=LINGER)
    try:
        deadline = time.monotonic() + 150
        seen = 0
        while (seen := progress(seg, watch, mine)) < enough:
            assert client.poll() is None, f"the storm ended before {enough} nodes were {what} ({seen}): no drill"
            assert time.monotonic() < deadline, f"only {seen} of {NODES} nodes {what} after 150 s{logs(seg)}"
            time.sleep(0.5)
        assert client.poll() is None, "the storm ended before the fault: not a mid-storm drill"
        action()
        results, took = collect(client, DEADLINE + 120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    print(f"drill: {NODES} nodes in {took:.1f} s, fault after {seen} {what}")
    return results


def power_on(seg: Segment) -> QemuNode:
    """The QEMU node on its own tap on the segment's bridge (in the bridge's namespace)."""
    lab = Lab(workdir=seg.workdir / "qemu", name=seg.lan, bridge="br0")  # not up(): the segment owns it
    lab.workdir.mkdir(exist_ok=True)
    return QemuNode(lab, "qnode", QEMU_MAC, firmware="bios", memory_mb=384).start()


def ready_through(seg: Segment, qnode: QemuNode, survivor: str) -> None:
    """The real node reached `ready` through the survivor: its console, the registry, its lease."""
    try:
        # Powered on as a dies, its DHCP may find a's share unanswered until b takes it over, and b busy with
        # the storm's restarts: iPXE then gives up and SeaBIOS reboots into PXE again, as a real BIOS does.
        qnode.wait_for(r"BOOTD-READY qnode", timeout=QEMU_READY,
                       ignore_dead_ends=("No bootable device", "No more network devices"))
        deadline = time.monotonic() + 60
        while True:
            node = next(n for n in json.loads(seg.cli(survivor, "node", "list", "--json")) if n["mac"] == QEMU_MAC)
            if node["state"] == "ready":
                break
            assert time.monotonic() < deadline, f"the QEMU node is {node['state']} in the registry: {node}"
            time.sleep(1)
        console = qnode.console()
    finally:
        qnode.stop()
    assert f"http://{ADDRESSES[survivor]}:8080/" in console, console[-3000:]
    assert "failed verification" not in console
    leases = {x["mac"]: x["ip"] for x in json.loads(seg.cli(survivor, "lease", "list", "--json"))}
    assert QEMU_MAC in leases, f"the QEMU node's lease is not in the database: {sorted(leases)[:5]}"


def heartbeats_moved(results: list[dict[str, Any]], dead: str, survivor: str) -> None:
    """Nodes that were ready through the dead server went on heartbeating through the survivor."""
    moved = [r for r in results if r["beats"].get(ADDRESSES[dead]) and r["beats"].get(ADDRESSES[survivor])]
    assert moved, (f"no node heartbeated to {dead} and then to {survivor}: "
                   f"{Counter(tuple(sorted(r['beats'])) for r in results)}")


def serves_again(seg: Segment, ident: str, first_index: int) -> None:
    """The killed server restarts, rejoins, and boots the new nodes of its share (DHCP and chunks)."""
    seg.start(ident)
    seg.wait_live("a", {"a", "b"})
    results, _ = collect(seg.storm(AGAIN, 120, first_index=first_index), 240)
    assert all(r["ok"] for r in results), [r["error"] for r in results if not r["ok"]][:5]
    mine = [r for r in results if r["server"] == ADDRESSES[ident]]
    assert mine, f"{ident} answered none of {AGAIN} new nodes after its restart"
    assert sum(r["chunk_bytes"].get(ADDRESSES[ident], 0) for r in mine) > 0


def test_replica_killed_mid_storm(seg: Segment) -> None:
    results = storm_with(seg, 0, lambda: seg.kill("b"), "a", "leased", leased, 30)
    check(seg, results, "a")
    # b was booting part of the storm when it died: those nodes finished through a.
    assert any(ADDRESSES["b"] in r["acked_by"] for r in results), "b leased to no node before it was killed"
    serves_again(seg, "b", first_index=5_000)
    # b was cold (never synced): it named the capsule's version from a's refs for its nodes' scripts, and
    # fetched what they asked for on a miss.
    log = seg.servers["b"].log.read_text()
    assert "event=upstream-resolved name=storm" in log and "event=upstream-fetched kind=chunk" in log
    # Nothing lost, seen from the restarted server too (the storm's nodes stopped their heartbeats when it
    # ended, so they may be stale by now: they were ready above).
    check(seg, results, "b", states=("ready", "stale"))


def test_primary_killed_mid_storm_after_sync(seg: Segment) -> None:
    seg.cli("b", "capsule", "sync", "--from", seg.servers["a"].url)
    out = seg.cli("b", "capsule", "sync", "--from", seg.servers["a"].url)  # again: nothing left to fetch
    assert "0 object(s) fetched" in out, out
    # Killed once some nodes are ready through it: their agents must move their heartbeats to b.  The QEMU
    # node powers on as a dies: everything it boots from must come through b.
    qnode: list[QemuNode] = []

    def kill_a() -> None:
        seg.kill("a")
        if QEMU:
            qnode.append(power_on(seg))

    try:
        results = storm_with(seg, 10_000, kill_a, "b", "ready", ready, max(5, NODES // 20))
        check(seg, results, "b")
        if qnode:
            ready_through(seg, qnode[0], "b")
    finally:
        for q in qnode:
            q.stop()
    # a was booting part of the storm when it died: those nodes finished through b.
    from_a = [r for r in results if ADDRESSES["a"] in r["acked_by"]]
    assert from_a, "a leased to no node before it was killed"
    assert all(set(r["chunk_bytes"]) <= {ADDRESSES["a"], ADDRESSES["b"]} for r in results)
    heartbeats_moved(results, "a", "b")
    log = seg.servers["b"].log.read_text()
    assert "event=cluster-changed live=b was=a,b" in log
    serves_again(seg, "a", first_index=15_000)


def test_postgresql_restart_mid_storm(seg: Segment, postgres_server: PgServer) -> None:
    before = sum(metric(seg, ident, "bootd_store_reconnects_total") for ident in ("a", "b"))

    def restart() -> None:
        postgres_server.stop("fast")
        time.sleep(1.0)
        postgres_server.start()

    results = storm_with(seg, 20_000, restart, "a", "leased", leased, 30)
    check(seg, results, "a")
    # The restart was felt (connections broken mid-storm) and recovered from, not slept through.
    assert sum(metric(seg, ident, "bootd_store_reconnects_total") for ident in ("a", "b")) > before
    for ident in ("a", "b"):
        assert seg.servers[ident].proc is not None and seg.servers[ident].proc.poll() is None, f"{ident} died"
        assert seg.healthy(ident)
