"""Proof of the stage one on its own: a BIOS QEMU node boots through the iPXE ROM from a reference
dnsmasq (DHCP + RA) and the stand-in HTTP server, fetches and verifies the sample capsule, switches root
and the capsule's init reports ready. No bootd code serves anything here, so a failure points at the
lab or the stage one, not at the daemon."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from bootd.lab import Lab, QemuNode
from bootd.lab.dnsmasq import dnsmasq_available, start_reference
from bootd.stage1.build import BuildResult
from tests.qemu import standin
from tests.qemu.conftest import STANDIN, SampleCapsule

pytestmark = [pytest.mark.qemu, pytest.mark.netns]


def test_bios_node_boots_sample_capsule_from_standins(lab: Lab, stage1: BuildResult,
                                                      sample_capsule: SampleCapsule) -> None:
    if dnsmasq_available():
        pytest.skip(str(dnsmasq_available()))
    port = 8080
    base = f"http://{lab.server_ip}:{port}"
    events = lab.workdir / "events.jsonl"
    http = lab.spawn("standin", [sys.executable, str(STANDIN), "serve", "--bind", lab.server_ip, "--port",
                                 str(port), "--store", str(sample_capsule.store), "--stage1", str(stage1.out_dir),
                                 "--events", str(events)])
    lab.wait_listening(port, proc=http)
    dns = start_reference(lab, http_base=base)
    lab.wait_listening(67, proto="udp", proc=dns)

    node = QemuNode(lab, "bios", "52:54:00:77:01:10", firmware="bios").start()
    try:
        node.wait_for(r"BOOTD-IPXE node=n0110 platform=pcbios", timeout=120)
        # The whole line (wait_for may return a line before its end has arrived): the stage one names its kernel.
        start = node.wait_for(rf"BOOTD-STAGE1 start kernel={re.escape(stage1.kernel.kver)} ", timeout=120)
        assert stage1.kernel.kver in start.text
        node.wait_for(r"BOOTD-STAGE1 net eth0 ip=10\.77\.", timeout=90)
        count = len(standin.chunk_hashes(sample_capsule.store, sample_capsule.vid))
        node.wait_for(rf"BOOTD-STAGE1 verified {count}/{count} chunks", timeout=120)
        node.wait_for(r"BOOTD-STAGE1 booted switch_root", timeout=60)
        node.wait_for(r"BOOTD-CAPSULE up hostname=n0110 node=n0110", timeout=60)
        ready = node.wait_for(r"BOOTD-CAPSULE ready node=n0110", timeout=90)
    finally:
        node.stop()
    assert "failed verification" not in node.console()
    got = [e for e in standin_events(events) if e["node"] == "n0110"]
    assert [e["event"] for e in got if e["event"] != "fetching"] == ["stage1", "verified", "booted", "ready"]
    assert all(e["token_ok"] for e in got)
    print(f"BIOS iPXE boot to ready (stand-ins): {ready.t:.1f}s")


def standin_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
