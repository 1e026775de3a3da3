"""Hostile input against a running `bootd serve` in a network namespace.

100k+ malformed, truncated, oversized and out-of-order DHCP and TFTP datagrams (crafted with scapy)
and malformed HTTP requests; afterwards bootd must still boot nodes normally, its memory must stay
bounded, every drop must be counted by reason in /metrics, and the registration rate limit must
have kept the flood of forged MACs from filling the registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.storm import run as storm_run
from tests.conftest import ROOT, need_root, need_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]

COUNT = 60_000  # per protocol: 120k datagrams in all


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    assert m, text
    return int(m.group(1))


def metrics(ns: str) -> dict[str, float]:
    out = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", f"http://{storm_run.SERVER_IP}:8080/metrics"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    values: dict[str, float] = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def small_storm(ns: str, nodes: int, seed: int) -> list[dict[str, object]]:
    code = (
        "import asyncio, json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bench.storm.storm import StormConfig, storm\n"
        f"cfg = StormConfig(nodes={nodes}, server={storm_run.SERVER_IP!r}, deadline=60, seed={seed},\n"
        f"                  http_base='http://{storm_run.SERVER_IP}:8080')\n"
        "res, _ = asyncio.run(storm(cfg, cfg.http_base, interface='bdc0'))\n"
        "print(json.dumps([r.__dict__ for r in res]))\n"
    )
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(json.loads(proc.stdout))


def test_flood_of_malformed_traffic_is_counted_and_survived(tmp_path: Path) -> None:
    need_root()
    need_tool("ip", "curl")
    with storm_run.network("bd-hostile") as net:
        config = storm_run.write_config(tmp_path, net)
        limits = "[registry]\nregister_rate = 20\nregister_burst = 50\n"
        config.write_text(config.read_text().replace("[registry]\n", limits))
        storm_run.make_capsule(tmp_path, config, size_mib=1)
        bootd = storm_run.start_bootd(config, net, tmp_path / "bootd.log")
        try:
            # A normal boot first, so the memory baseline includes warm caches.
            assert all(r["ok"] for r in small_storm(net.client_ns, 3, seed=1))
            before = rss_kib(bootd.pid)
            started = time.monotonic()
            flood = subprocess.run(
                ["ip", "netns", "exec", net.client_ns, sys.executable, str(ROOT / "tests/hostile/flood.py"),
                 storm_run.SERVER_IP, str(COUNT), "150"],
                capture_output=True, text=True, timeout=400, cwd=ROOT)
            assert flood.returncode == 0, flood.stderr[-3000:]
            report = json.loads(flood.stdout.strip().splitlines()[-1])
            elapsed = time.monotonic() - started
            assert bootd.poll() is None, "bootd died under the flood:\n" + (tmp_path / "bootd.log").read_text()[-3000:]
            sent = report["sent"]
            assert sent["dhcp"] + sent["tftp"] >= 100_000, sent

            # Still serves a normal boot, end to end.
            after_boot = small_storm(net.client_ns, 3, seed=2)
            assert all(r["ok"] for r in after_boot), [r["error"] for r in after_boot]

            after = rss_kib(bootd.pid)
            assert after < before + 150 * 1024, f"RSS grew from {before} KiB to {after} KiB"

            m = metrics(net.server_ns)
            dropped = {k: v for k, v in m.items() if k.startswith("bootd_dhcp_dropped_total")}
            tftp_errors = {k: v for k, v in m.items() if k.startswith("bootd_tftp_errors_total")
                           or k.startswith("bootd_tftp_transfers_failed_total")}
            assert sum(dropped.values()) > 1000 and len(dropped) >= 3, dropped
            assert sum(tftp_errors.values()) > 1000, tftp_errors
            http = report["http_statuses"]
            assert http.get("500", 0) == 0 and http.get("200", 0) == 0, http
            assert sum(n for status, n in http.items() if status.startswith("4")) >= 40, http

            received = {k: v for k, v in m.items() if k.startswith("bootd_dhcp_received_total")}
            snmp = subprocess.run(["ip", "netns", "exec", net.server_ns, "cat", "/proc/net/snmp"],
                                  capture_output=True, text=True, timeout=30).stdout.splitlines()
            udp = [line.split()[1:] for line in snmp if line.startswith("Udp:")]
            kernel = dict(zip(udp[0], udp[1], strict=True)) if len(udp) == 2 else {}
            nodes = json.loads(storm_run.cli(config, "node", "list", "--json"))
            limit = 50 + 20 * (elapsed + 5) + 10
            assert len(nodes) <= limit, f"{len(nodes)} nodes registered, rate limit allows ~{limit:.0f}"
            print(f"\nhostile: sent={sent} in {elapsed:.1f}s http={http} rss {before}->{after} KiB "
                  f"nodes={len(nodes)}\n  dhcp received: {received}; kernel UDP: "
                  f"RcvbufErrors={kernel.get('RcvbufErrors')} InErrors={kernel.get('InErrors')}\n"
                  f"  dhcp drops: {dropped}\n  tftp: {tftp_errors}")
        finally:
            bootd.terminate()
            bootd.wait(timeout=20)
