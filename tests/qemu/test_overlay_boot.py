"""Per-node overlays on a real boot: a QEMU node boots the Debian capsule from ``bootd serve`` with the shipped
overlays and one site overlay, and a test-only unit in the image (bootd-probe) prints what the node has.

One boot covers the node's identity (hostname, machine-id and ssh host key are the ones bootd made for it),
/etc/hosts naming the master and the nodes, root's authorized_keys from the master, and then the runtime
refresh on the RUNNING node: a user added to the master's passwd file and a group variable changed with
`bootd group set --var` arrive within the agent's interval, without a reboot. A second boot of the same
node shows the same host key and machine-id; another registered node's key (made by bootd when that node
asks for its system overlay) differs.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.serve import BootdServer, ServeError
from bootd.overlay import RUNTIME_OVERLAYS, SYSTEM_OVERLAYS
from bootd.stage1.build import BuildResult
from tests.qemu.test_debian_boot import READY_TIMEOUT, debian_tree

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

INTERVAL = 3  # the node agent's runtime refresh (BOOTD_OVERLAY_INTERVAL, a group variable here)
REFRESH_TIMEOUT = 90.0  # INTERVAL plus a TCG node's slowness on a loaded 2-core machine
MAC_A = "52:54:00:77:16:01"
MAC_B = "52:54:00:77:16:02"
FIGURES: dict[str, str] = {}

PROBE = r"""#!/bin/sh
# Test-only: what the node has from its overlays, on the console. Once at start, then every change.
key=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)
hosts=$(awk '/^[0-9]/ { printf "%s=%s,", $2, $1 }' /etc/hosts)
keys=$(grep -c '^ssh-' /root/.ssh/authorized_keys)
mode=$(stat -c %a /root/.ssh/authorized_keys)
echo "BOOTD-PROBE boot hostname=$(cat /proc/sys/kernel/hostname) machine_id=$(cat /etc/machine-id) \
hostkey=$key authkeys=$keys akmode=$mode hosts=$hosts"
last=""
while :; do
    user=$(grep '^probeuser:' /etc/passwd | cut -d: -f1,3,6)
    now="user=$user home=$(stat -c %u:%a /home/probeuser 2>/dev/null) color=$(cat /etc/bootd-test/color 2>/dev/null)"
    [ "$now" != "$last" ] && echo "BOOTD-PROBE state $now" && last=$now
    sleep 1
done
"""
PROBE_UNIT = ("[Unit]\nAfter=bootd-agent.service\n[Service]\nExecStart=/bin/sh /usr/local/sbin/bootd-probe\n"
              "StandardOutput=journal+console\n[Install]\nWantedBy=multi-user.target\n")
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOverlayBootTestKeyOnTheMaster000000000 admin@master"


def write_atomic(path: Path, text: str) -> None:
    """As useradd does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Site:
    lab: Lab
    bootd: BootdServer
    passwd: Path
    group: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, stage1: BuildResult) -> Iterator[Site]:
    reason = lab_available() or qemu_available("bios")
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("overlay-boot")
    tree = debian_tree(work, units={"bootd-probe.service": PROBE_UNIT}, files={"usr/local/sbin/bootd-probe": PROBE})
    passwd, group, keys = work / "passwd", work / "group", work / "authorized_keys"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\nalice:x:2001:2001:Alice:/home/alice:/bin/sh\n")
    group.write_text("root:x:0:\nalice:x:2001:\n")
    keys.write_text(f"# the master's keys\n{ADMIN_KEY}\n")
    with Lab(workdir=work / "lab", prefix="bd-ovl") as lab:
        bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=stage1.out_dir, overrides={
            "registry": {"stale_after": 60.0, "dead_after": 240.0},
            "overlay": {"passwd": str(passwd), "group": str(group), "authorized_keys": str(keys),
                        "uid_min": 2000, "uid_max": 2999}})
        bootd.write_config()
        site_overlay = work / "probe-overlay"
        (site_overlay / "files/etc/bootd-test").mkdir(parents=True)
        (site_overlay / "overlay.json").write_text(json.dumps({"kind": "runtime", "description": "test: a group var"}))
        (site_overlay / "files/etc/bootd-test/color.j2").write_text("{{ vars.color }}\n")
        try:
            bootd.import_capsule("debian", tree)
            bootd.cli("overlay", "import", "probe", str(site_overlay))
            overlays = [a for name in (*SYSTEM_OVERLAYS, *RUNTIME_OVERLAYS, "probe") for a in ("--overlay", name)]
            bootd.cli("group", "set", "default", "--capsule", "debian", *overlays, "--var", "color=red",
                      "--var", f"BOOTD_OVERLAY_INTERVAL={INTERVAL}", "--var", "BOOTD_HEARTBEAT=10")
            bootd.cli("node", "add", "deb-a", "--mac", MAC_A)
            bootd.cli("node", "add", "deb-b", "--mac", MAC_B)
            bootd.start()
        except ServeError as exc:
            pytest.fail(f"bootd could not be set up: {exc}\n{bootd.log_text()[-2000:]}")
        yield Site(lab, bootd, passwd, group)
        if FIGURES:
            print("\noverlay figures: " + ", ".join(f"{k}: {v}" for k, v in FIGURES.items()))


def identity(bootd: BootdServer, mac: str) -> tuple[str, str]:
    d = bootd.state_dir / "node-identity" / mac.replace(":", "-")
    return (d / "machine-id").read_text().strip(), (d / "ssh_host_ed25519_key.pub").read_text().split()[1]


def lease_for(site: Site, mac: str) -> str:
    """A real DHCP client (busybox udhcpc) with deb-b's MAC on the lab network, so bootd records its
    address and /etc/hosts has a second node in it."""
    veth = site.lab.add_veth("ovl-b")
    site.lab.run(["ip", "link", "set", veth, "down"])
    site.lab.run(["ip", "link", "set", veth, "address", mac])
    site.lab.run(["ip", "link", "set", veth, "up"])
    site.lab.run(["busybox", "udhcpc", "-i", veth, "-n", "-q", "-f", "-t", "5", "-T", "2", "-s", "/bin/true"],
                 timeout=40)
    leases = json.loads(site.bootd.cli("lease", "list", "--json").stdout or "[]")
    ips = [x["ip"] for x in leases if x["mac"] == mac]
    assert ips, f"no lease for {mac}: {leases}"
    return str(ips[0])


def boot(site: Site, name: str) -> tuple[QemuNode, re.Match[str]]:
    node = QemuNode(site.lab, name, MAC_A, firmware="bios", memory_mb=1024).start()
    try:
        line = node.wait_for(r"BOOTD-PROBE boot ", timeout=READY_TIMEOUT)
    except BaseException:
        node.stop()
        raise
    m = re.search(r"hostname=(\S*) machine_id=(\S*) hostkey=(\S*) authkeys=(\d+) akmode=(\d+) hosts=(\S*)", line.text)
    assert m, line.text
    return node, m


def figure(node: QemuNode, pattern: str) -> str:
    line = node.first(pattern)
    return line.text.split("BOOTD-", 1)[-1] if line else "(not seen)"


@pytest.mark.timeout(1800)
def test_overlays_on_a_booted_node_and_their_runtime_refresh(site: Site) -> None:
    bootd = site.bootd
    ip_b = lease_for(site, MAC_B)
    node, m = boot(site, "deb-a")
    try:
        applied = node.first(r"BOOTD-STAGE1 overlay system applied")
        assert applied is not None, node.tail()
        FIGURES["stage one system"] = figure(node, r"BOOTD-STAGE1 overlay system applied")
        FIGURES["stage one runtime"] = figure(node, r"BOOTD-STAGE1 overlay runtime applied")
        machine_id, key = identity(bootd, MAC_A)
        hosts = dict(h.split("=") for h in m.group(6).rstrip(",").split(","))
        entry = bootd.node(mac=MAC_A)
        assert entry is not None
        assert m.group(1) == "deb-a", m.group(0)
        assert m.group(2) == machine_id and m.group(3) == key, "machine-id and host key are the ones bootd made"
        assert m.group(4) == "1" and m.group(5) == "600", "root's authorized_keys: the master's one key, 0600"
        assert hosts.get("deb-a") == entry["ip"] and hosts.get("deb-b") == ip_b, hosts
        assert site.lab.server_ip in hosts.values(), f"the master is named too: {hosts}"

        first = node.wait_for(r"BOOTD-PROBE state ", timeout=60)
        assert first.text.endswith("user= home= color=red"), first.text
        # The agent's first refresh after the stage one's: one 304.
        unchanged = node.wait_for(r"BOOTD-AGENT overlay runtime unchanged", timeout=REFRESH_TIMEOUT)
        FIGURES["agent unchanged"] = unchanged.text.split("BOOTD-", 1)[-1]

        # On the master: a user added (useradd renames a new passwd into place) and a group variable.
        write_atomic(site.passwd, site.passwd.read_text() + "probeuser:x:2002:2002:Probe:/home/probeuser:/bin/sh\n")
        write_atomic(site.group, site.group.read_text() + "probeuser:x:2002:\n")
        bootd.cli("group", "set", "default", "--var", "color=blue")
        t0 = time.monotonic() - node.started_at
        changed = node.wait_for(r"BOOTD-PROBE state user=probeuser:2002:/home/probeuser home=2002:700 color=blue",
                                timeout=REFRESH_TIMEOUT)
        applied_rt = node.wait_for(r"BOOTD-AGENT overlay runtime applied", timeout=10)
        FIGURES["agent changed"] = applied_rt.text.split("BOOTD-", 1)[-1]
        FIGURES["change seen on the node after"] = f"{changed.t - t0:.1f}s (interval {INTERVAL}s)"
        assert "BOOTD-AGENT note: overlay runtime" not in node.console()
        events = bootd.events("deb-a")
        assert "failed" not in [e["state"] for e in events]
    finally:
        node.stop()

    # The same node again: the same identity, kept by bootd across reboots.
    node2, m2 = boot(site, "deb-a-reboot")
    node2.stop()
    assert (m2.group(2), m2.group(3)) == (machine_id, key), "machine-id and host key survive a reboot"

    # Another node's identity differs: bootd makes it when that node first asks for its system overlay.
    code, script = bootd.http_get(f"/boot/{MAC_B.replace(':', '-')}.ipxe")
    token = re.search(rb"bootd\.token=(\w+)", script)
    assert code == 200 and token, script[:300]
    res = site.lab.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                        f"X-Bootd-Token: {token.group(1).decode()}",
                        f"{bootd.base_url}/api/v1/nodes/deb-b/overlay/system"])
    assert res.stdout == "200", res
    machine_b, key_b = identity(bootd, MAC_B)
    assert key_b != key and machine_b != machine_id
