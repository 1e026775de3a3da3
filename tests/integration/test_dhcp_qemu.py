"""Real firmware against bootd's DHCP: OVMF with EDK2's own PXE (no iPXE ROM), then the iPXE it loads.

The chain the contract promises for a non-iPXE UEFI machine: EDK2 PXE DISCOVER (arch 7, no user
class) -> bootd offers ``snponly.efi`` with next-server -> EDK2 fetches it over TFTP (dnsmasq,
TFTP only, in the server namespace) -> iPXE asks DHCP again with user class iPXE -> bootd answers
with the node's iPXE script URL and option 175.176=1 -> iPXE starts fetching that URL. The test
stops QEMU once iPXE prints the URL, then checks the node record and the lease.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bootd.model import State
from tests.conftest import need_tool
from tests.integration.test_dhcp_netns import FULL, Net, net, node_record, sh, start_bootd  # noqa: F401

pytestmark = [pytest.mark.netns, pytest.mark.qemu, pytest.mark.timeout(240)]

MAC = "52:54:00:77:30:01"
URL = "http://10.77.0.1:8080/boot/52-54-00-77-30-01.ipxe"


async def test_edk2_pxe_then_ipxe_full_chain(net: Net) -> None:  # noqa: F811 (fixture)
    need_tool("qemu-system-x86_64", "dnsmasq")
    ovmf = Path("/usr/share/ovmf/OVMF.fd")
    nbp = Path("/usr/lib/ipxe/snponly.efi")
    if not ovmf.exists() or not nbp.exists():
        pytest.fail("needs ovmf and ipxe (Debian packages)")
    srv = net.ns("srv")
    sh("ip", "-n", srv, "tuntap", "add", "tap0", "mode", "tap")
    sh("ip", "-n", srv, "addr", "add", "10.77.0.1/24", "dev", "tap0")
    sh("ip", "-n", srv, "addr", "add", "fd77::1/64", "dev", "tap0", "nodad")
    sh("ip", "-n", srv, "link", "set", "tap0", "up")
    w = net.workdir
    tftp = w / "tftp"
    tftp.mkdir()
    shutil.copy(nbp, tftp / "snponly.efi")
    for p in (w, tftp):
        p.chmod(0o755)
    # TFTP only (no dhcp-range for v4: dnsmasq does no DHCPv4), plus router advertisements so iPXE
    # does not wait 16 s for IPv6 (qemu-boot-notes 7.1).
    net.spawn(srv, ["dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts", "--interface=tap0",
                    "--bind-interfaces", "--enable-tftp", f"--tftp-root={tftp}", "--user=root", "--enable-ra",
                    "--dhcp-range=::,constructor:tap0,ra-only", f"--pid-file={w}/dnsmasq.pid",
                    "--log-facility=-"], "dnsmasq.log")
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="tap0", dhcp=FULL)
    serial = w / "serial.log"
    qemu = net.spawn(srv, [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-monitor", "none",
        "-chardev", f"file,id=ser0,path={serial}", "-serial", "chardev:ser0", "-no-reboot",
        "-boot", "order=n,reboot-timeout=0", "-bios", str(ovmf),
        "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={MAC},romfile=",
    ], "qemu.log")
    deadline = time.monotonic() + 180
    text = ""
    while time.monotonic() < deadline and qemu.poll() is None:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if URL in text:
            break
        time.sleep(0.5)
    assert URL in text, f"iPXE never fetched its script URL; serial tail:\n{text[-3000:]}"
    assert "Start PXE over IPv4" in text  # EDK2's own PXE, not an iPXE ROM, did the first DHCP
    assert "NBP file downloaded successfully" in text
    assert "snponly.efi" in (w / "dnsmasq.log").read_text()
    node, lease = await node_record(cfg, MAC)
    assert node is not None and node.state is State.PXE and node.ip == "10.77.0.100"
    assert lease is not None and lease.ip == "10.77.0.100"
