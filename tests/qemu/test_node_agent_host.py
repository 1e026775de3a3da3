"""The node agent (node-agent.sh + bootd-fetch -p) and the stage one's hand-over into a capsule, on the
build host against the stand-in server over loopback: seconds each, with the real busybox sh, dash and the
compiled fetcher. The QEMU boot of a Debian capsule (test_debian_boot.py) shows the same under systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bootd.stage1.build import HERE as STAGE1_SRC
from tests.qemu import standin
from tests.qemu.conftest import SampleCapsule, StandinProc, StartStandin, need_host_tools
from tests.qemu.test_agent_host import SHELL, agent_env, fetcher  # noqa: F401  (fixture)

NODE_AGENT = STAGE1_SRC / "node-agent.sh"


def start_node_agent(tmp_path: Path, server: StandinProc, lib: Path, shell: str, *, node: str = "n0042",
                     token: str | None = None, root_ram: Path | None = None) -> subprocess.Popen[str]:
    """The host has no bootd.* words on its kernel command line and no /etc/bootd/node.env, so the agent
    takes the BOOTD_* variables from its environment, as sourcing node.env would set them."""
    env = dict(os.environ, BOOTD_URL=server.base, BOOTD_NODE=node,
               BOOTD_TOKEN=token if token is not None else standin.node_token(b"standin-secret", node),
               BOOTD_HEARTBEAT="1", BOOTD_AGENT_LIB=str(lib), BOOTD_AGENT_STATE=str(tmp_path / "state"),
               BOOTD_ROOT_RAM=str(root_ram or tmp_path / "no-root-ram"))
    return subprocess.Popen([shell, str(NODE_AGENT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return out


@pytest.mark.parametrize("shell", ["busybox sh", "dash"])
def test_node_agent_reports_ready_then_heartbeats_with_usage(
        tmp_path: Path, loopback_standin: StartStandin, fetcher: Path, shell: str) -> None:  # noqa: F811
    need_host_tools()
    argv0 = shell.split()[0]
    if shutil.which(argv0) is None:
        pytest.skip(f"{argv0} missing")
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(fetcher, lib / "bootd-fetch")
    wrapper = tmp_path / "sh"
    wrapper.write_text(f"#!/bin/sh\nexec {shell} \"$@\"\n")
    wrapper.chmod(0o755)
    server = loopback_standin()
    proc = start_node_agent(tmp_path, server, lib, str(wrapper))
    try:
        server.wait_event("ready", timeout=20)
        deadline = time.monotonic() + 20
        while sum(1 for e in server.event_lines() if e["route"] == "heartbeat") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        out = stop(proc)
    lines = server.event_lines()
    ready = [e for e in lines if e.get("event") == "ready"]
    beats = [e for e in lines if e["route"] == "heartbeat"]
    assert len(ready) == 1 and ready[0]["reason"] == "", lines  # no systemd here: running, not degraded
    assert len(beats) >= 2, (lines, out)
    assert all(e["token_ok"] for e in lines), "every report carries the node's own token"
    for e in (ready[0], beats[-1]):
        assert int(e["mem_total_kb"]) > int(e["mem_used_kb"]) > 0
        assert int(e["root_size_kb"]) >= int(e["root_used_kb"]) > 0
        assert int(e["image_ram_kb"]) == 0  # the host's root is no tmpfs and it has no image tmpfs
    assert "BOOTD-READY n0042" in out
    assert re.search(r"BOOTD-AGENT ready node=n0042 hostname=\S+ ip=\S* running", out), out


def test_node_agent_waits_for_a_route_to_bootd_and_says_when_none_came(tmp_path: Path,
                                                                       fetcher: Path) -> None:  # noqa: F811
    """Right after switch_root the capsule's DHCP client may hold the NIC: the agent waits for a route to bootd
    before its first report (bounded), and says so when none came. Here a network namespace of its own, with no
    interface up, so no route exists; the wait is cut to 2 s."""
    need_host_tools()
    if shutil.which("unshare") is None:
        pytest.skip("unshare missing")
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(fetcher, lib / "bootd-fetch")
    env = dict(os.environ, BOOTD_URL="http://10.1.2.3:8080", BOOTD_NODE="n0042", BOOTD_TOKEN="t",
               BOOTD_HEARTBEAT="1", BOOTD_AGENT_LIB=str(lib), BOOTD_AGENT_STATE=str(tmp_path / "state"),
               BOOTD_ROOT_RAM=str(tmp_path / "no-root-ram"), BOOTD_OVERLAY_INTERVAL="0", BOOTD_ROUTE_WAIT="2")
    started = time.monotonic()
    proc = subprocess.Popen(["unshare", "-n", "busybox", "sh", str(NODE_AGENT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(5)
    finally:
        out = stop(proc)
    assert time.monotonic() - started < 20
    lines = [line for line in out.splitlines() if line.startswith("BOOTD-AGENT ")]
    waited = next(i for i, line in enumerate(lines) if "note: no route to 10.1.2.3 after 2s; reporting anyway" in line)
    assert lines[0].startswith("BOOTD-AGENT start node=n0042") and waited == 1, lines
    # Then it tried anyway, and said why it failed.
    assert any("not accepted" in line and "Network is unreachable" in line for line in lines[waited + 1:]), lines


def test_node_agent_without_fetcher_uses_wget_and_says_why_a_report_failed(
        tmp_path: Path, loopback_standin: StartStandin) -> None:
    """No bootd-fetch in the image: busybox wget (the busybox capsule has it) carries the reports. A
    wrong token is refused by bootd; the stand-in records it as not ok."""
    need_host_tools()
    server = loopback_standin()
    wrapper = tmp_path / "sh"
    wrapper.write_text("#!/bin/sh\nexec busybox sh \"$@\"\n")
    wrapper.chmod(0o755)
    proc = start_node_agent(tmp_path, server, tmp_path / "nolib", str(wrapper), node="n0007", token="0" * 32)
    try:
        server.wait_event("ready", timeout=20)
    finally:
        stop(proc)
    assert server.event_lines()[0]["token_ok"] is False


def test_fetcher_post_mode_refuses_bad_use(tmp_path: Path, fetcher: Path) -> None:  # noqa: F811
    """-p needs a node, a token and a known route; a reply that never comes is a clear failure."""
    env = dict(os.environ, BOOTD_TOKEN="t")
    run = lambda *a, inp="{}": subprocess.run([str(fetcher), *a], input=inp, env=env,  # noqa: E731
                                              capture_output=True, text=True, timeout=30)
    bad = run("-p", "nodes", "-u", "http://127.0.0.1:9", "-n", "n1")
    assert bad.returncode == 2 and "events or heartbeat" in bad.stderr
    nonode = run("-p", "events", "-u", "http://127.0.0.1:9")
    assert nonode.returncode == 2 and "-n NODE" in nonode.stderr
    big = run("-p", "events", "-u", "http://127.0.0.1:9", "-n", "n1", inp="x" * 5000)
    assert big.returncode == 2 and "over" in big.stderr
    refused = run("-p", "heartbeat", "-u", "http://127.0.0.1:9", "-n", "n1", "-t", "2")
    assert refused.returncode == 1 and "POST heartbeat" in refused.stderr


def test_stage_one_installs_the_agent_and_hands_over_the_network(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path,  # noqa: F811
) -> None:
    """Host mode with a capsule that looks like a systemd distribution (systemd-journald.service and
    systemd-networkd present): the agent and its unit are installed and enabled, networkd gets a .network
    for the boot NIC by MAC with DHCP, the NIC's name is pinned, and resolv.conf comes from the lease."""
    server = loopback_standin()
    env, target = agent_env(tmp_path, server, sample_capsule.vid, str(fetcher))
    work = Path(env["BOOTD_WORK"])
    work.mkdir(parents=True)
    (work / "lease").write_text("LEASE_IP=10.0.0.5\nLEASE_DNS='10.0.0.1 10.0.0.2'\nLEASE_DOMAIN='cluster'\n")
    env |= {"BOOTD_NODE_AGENT": str(NODE_AGENT), "BOOTD_TEST_IFACE": "eth7"}
    # A systemd-looking tree, unpacked before the capsule (the capsule's own files go on top).
    for f in ("lib/systemd/system/systemd-journald.service", "lib/systemd/system/systemd-networkd.service",
              "lib/systemd/system/systemd-networkd.socket"):
        (target / f).parent.mkdir(parents=True, exist_ok=True)
        (target / f).write_text("[Unit]\n")
    (target / "lib/systemd/systemd-networkd").write_text("#!/bin/sh\n")
    (target / "lib/systemd/systemd-networkd").chmod(0o755)
    (target / "etc/systemd").mkdir(parents=True)
    proc = subprocess.run(["busybox", "sh", str(STAGE1_SRC / "agent.sh")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lib = target / "usr/lib/bootd"
    assert (lib / "node-agent").read_bytes() == NODE_AGENT.read_bytes()
    assert os.access(lib / "node-agent", os.X_OK) and os.access(lib / "bootd-fetch", os.X_OK)
    unit = target / "etc/systemd/system/bootd-agent.service"
    assert "ExecStart=/usr/lib/bootd/node-agent" in unit.read_text()
    wants = target / "etc/systemd/system/multi-user.target.wants"
    assert os.readlink(wants / "bootd-agent.service") == "../bootd-agent.service"
    assert os.readlink(wants / "systemd-networkd.service") == "/lib/systemd/system/systemd-networkd.service"
    network = (target / "etc/systemd/network/10-bootd-boot.network").read_text()
    assert "MACAddress=52:54:00:00:00:01" in network and "DHCP=ipv4" in network
    link = (target / "etc/systemd/network/10-bootd-boot.link").read_text()
    assert "MACAddress=52:54:00:00:00:01" in link and "Name=eth7" in link
    resolv = (target / "etc/resolv.conf").read_text()
    assert "search cluster" in resolv and "nameserver 10.0.0.1\nnameserver 10.0.0.2" in resolv
    assert "bootd-agent.service enabled" in proc.stderr and "handed to systemd-networkd" in proc.stderr


@pytest.mark.parametrize("ifup", ["ifupdown", "busybox-applet"])
def test_stage_one_hands_the_nic_to_ifupdown_only_in_an_ifupdown_image(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path,  # noqa: F811
        ifup: str) -> None:
    """No networkd: Debian's ifupdown (a regular /sbin/ifup and /etc/network/interfaces) gets a DHCP
    stanza for the boot NIC; busybox's ifup applet (a link nothing runs) gets nothing."""
    server = loopback_standin()
    env, target = agent_env(tmp_path, server, sample_capsule.vid, str(fetcher))
    env |= {"BOOTD_NODE_AGENT": str(NODE_AGENT), "BOOTD_TEST_IFACE": "eth3"}
    (target / "etc/network").mkdir(parents=True)
    (target / "etc/network/interfaces").write_text("auto lo\niface lo inet loopback\n")
    # The busybox capsule unpacked on top brings /sbin/ifup -> /bin/busybox; ifupdown's is a regular file.
    if ifup == "ifupdown":
        (target / "usr/sbin").mkdir(parents=True)
        (target / "usr/sbin/ifup").write_text("#!/bin/sh\n")
    proc = subprocess.run(["busybox", "sh", str(STAGE1_SRC / "agent.sh")], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    stanza = target / "etc/network/interfaces.d/bootd-eth3"
    if ifup == "ifupdown":
        assert stanza.read_text().endswith("auto eth3\niface eth3 inet dhcp\n")
        assert "source /etc/network/interfaces.d/*" in (target / "etc/network/interfaces").read_text()
        assert "handed to ifupdown" in proc.stderr
    else:
        assert not stanza.exists()
        assert "keeps the stage one's address" in proc.stderr


def test_node_agent_reports_the_squashfs_image_ram(tmp_path: Path, loopback_standin: StartStandin) -> None:
    """In the squashfs root mode the image RAM is the use of the tmpfs the stage one moved to
    /run/bootd-root: the image file plus the overlay's upper (here a real tmpfs with 3 MiB in it)."""
    need_host_tools()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    ram = tmp_path / "bootd-root"
    ram.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ram)], check=True)
    try:
        (ram / "image.squashfs").write_bytes(os.urandom(2 * 1024 * 1024))
        (ram / "upper").mkdir()
        (ram / "upper" / "written").write_bytes(os.urandom(1024 * 1024))
        server = loopback_standin()
        proc = start_node_agent(tmp_path, server, tmp_path, "/bin/sh", root_ram=ram)
        try:
            ready = server.wait_event("ready", timeout=20)
        finally:
            stop(proc)
    finally:
        subprocess.run(["umount", str(ram)], check=False)
    assert 3 * 1024 <= int(ready["image_ram_kb"]) <= 3 * 1024 + 64, ready
