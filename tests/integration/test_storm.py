"""Boot storms: 500 simulated nodes at once against one `bootd serve` in a network namespace.

The simulated nodes (bench/storm/storm.py) do DHCP DORA, TFTP of the NBP, the iPXE script, the
manifest and every chunk with verification, lifecycle events and a heartbeat.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.storm import run as storm_run
from tests.conftest import need_root, need_tool

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def check(report: storm_run.Report, nodes: int) -> None:
    assert report.errors == [], report.errors
    assert report.ok == nodes and report.failed == 0
    assert report.distinct_names == nodes and report.distinct_ips == nodes
    assert report.registry_nodes == nodes and report.registry_ready == nodes
    assert report.leases == nodes


def test_storm_of_500_nodes(tmp_path: Path) -> None:
    need_root()
    need_tool("ip", "curl")
    report = storm_run.run(500, tmp_path, deadline=180)
    check(report, 500)
    print(f"\nstorm: {report}")


def test_storm_survives_kill_9_of_bootd(tmp_path: Path) -> None:
    need_root()
    need_tool("ip", "curl")
    report = storm_run.run(500, tmp_path, kill_at=2.0, deadline=180)
    # Nothing registered before the kill changed name, and the storm still completed.
    assert report.lost_after_kill == []
    check(report, 500)
    print(f"\nstorm with kill -9: {report}")
