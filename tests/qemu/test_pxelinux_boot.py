"""A site's legacy path: a group whose boot program is ``pxelinux.0`` (`bootd group set G --var
boot.file=pxelinux.0`). bootd's DHCP hands the node pxelinux.0, the BIOS PXE ROM loads it over bootd's
TFTP, PXELINUX reads the site's one static pxelinux.cfg/default (TFTP too) and starts bootd's stage one
with only bootd.url and BOOTIF (IPAPPEND 2); the stage one asks bootd for the node's boot line and boots
the busybox capsule to `ready`. QEMU's legacy PXE ROM (pxe-virtio.rom) only runs on a modern-only virtio
NIC (disable-legacy=on); it is iPXE inside, used here as the PXE stack, as on real hardware's ROM.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.serve import BootdServer, ServeError
from bootd.stage1.build import BuildResult
from tests.qemu.conftest import SampleCapsule

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

PXELINUX = Path("/usr/lib/PXELINUX/pxelinux.0")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
PXE_ROM = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")
MAC = "52:54:00:77:16:20"
READY_TIMEOUT = 300.0  # pxelinux fetches the 14 MB kernel over TFTP: seconds more than iPXE over HTTP


def site_tftp_root(root: Path, stage1: BuildResult, url: str) -> None:
    """What a site with PXELINUX has: the loader, its ldlinux.c32, a kernel and initrd, one config."""
    (root / "pxelinux.cfg").mkdir(parents=True, exist_ok=True)
    (root / "bootd").mkdir(exist_ok=True)
    shutil.copy(PXELINUX, root / "pxelinux.0")
    shutil.copy(LDLINUX, root / "ldlinux.c32")
    shutil.copy(stage1.out_dir / "vmlinuz", root / "bootd/vmlinuz")
    shutil.copy(stage1.out_dir / "initramfs.img", root / "bootd/initramfs.img")
    (root / "pxelinux.cfg/default").write_text(
        "SERIAL 0 115200\nDEFAULT bootd\nPROMPT 0\nTIMEOUT 0\n"
        "LABEL bootd\n  KERNEL bootd/vmlinuz\n  INITRD bootd/initramfs.img\n"
        f"  APPEND console=ttyS0 quiet panic=-1 bootd.url={url}\n  IPAPPEND 2\n")


@pytest.fixture(scope="module")
def bootd(tmp_path_factory: pytest.TempPathFactory, stage1: BuildResult,
          sample_capsule: SampleCapsule) -> Iterator[BootdServer]:
    reason = lab_available() or qemu_available("bios")
    if reason:
        pytest.skip(reason)
    for f in (PXELINUX, LDLINUX, PXE_ROM):
        if not f.exists():
            pytest.skip(f"{f} missing (apt-get install pxelinux syslinux-common ipxe-qemu)")
    work = tmp_path_factory.mktemp("pxelinux")
    with Lab(workdir=work / "lab", prefix="bd-pxl") as lab:
        server = BootdServer(lab, state_dir=work / "state", stage1_dir=stage1.out_dir)
        server.write_config()
        site_tftp_root(work / "state/tftp", stage1, server.base_url)
        try:
            server.import_capsule("busybox", sample_capsule.root)
            server.cli("group", "add", "legacy", "--capsule", "busybox", "--var", "boot.file=pxelinux.0")
            server.cli("node", "add", "px0", "--mac", MAC, "--group", "legacy")
            server.start()
        except ServeError as exc:
            pytest.fail(f"bootd could not be set up: {exc}\n{server.log_text()[-2000:]}")
        yield server


@pytest.mark.timeout(900)
def test_a_group_with_pxelinux_boots_through_it_to_ready(bootd: BootdServer) -> None:
    node = QemuNode(bootd.lab, "px0", MAC, firmware="bios",
                    nic=f"virtio-net-pci,disable-legacy=on,romfile={PXE_ROM}").start()
    try:
        banner = node.wait_for(r"PXELINUX \d", timeout=120)
        line = node.wait_for(r"BOOTD-STAGE1 boot line from ", timeout=READY_TIMEOUT)
        ready = node.wait_for(r"BOOTD-CAPSULE ready node=px0", timeout=READY_TIMEOUT)
        entry = bootd.wait_state(MAC, ("ready",), timeout=30)
    finally:
        node.stop()
    print(f"\npxelinux boot: banner at {banner.t:.1f}s, stage one at {line.t:.1f}s, ready at {ready.t:.1f}s")
    assert "node=px0" in line.text and entry["name"] == "px0"
    console = node.console()
    assert "BOOTD-STAGE1 overlay system applied" in console
    states = [e["state"] for e in bootd.events("px0")]
    assert "failed" not in states and states.index("stage1") < states.index("booted") < states.index("ready")
    # The firmware got pxelinux.0 from DHCP (bootd records what it handed out).
    assert "boot file pxelinux.0" in bootd.log_text(), bootd.log_text()[-1500:]
