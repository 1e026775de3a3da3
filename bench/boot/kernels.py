"""bench/boot/kernels.py: what the stage one's kernel costs a boot.

Power-on to ``ready`` of one BIOS QEMU node (virtio NIC, the busybox sample capsule) served by
``bootd serve``, with a stage one built from each kernel package named (default: Debian's cloud kernel,
LZ4 and virtio/vmxnet3 only, against the generic kernel, XZ with the real server NIC drivers), runs
alternating so a change in machine load hits both. Printed per kernel: the median and range of the
kernel's start (iPXE loaded the initramfs -> the agent's first line) and of power-on -> ready.

Usage: python bench/boot/kernels.py [--runs 3] [--kernel linux-image-cloud-amd64 --kernel linux-image-amd64]
Runs in a private network namespace; everything is torn down afterwards. TCG only (no KVM here).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.sample import make_busybox_root
from bootd.lab.serve import BootdServer
from bootd.stage1.build import BuildResult, build

DEFAULT_KERNELS = ("linux-image-cloud-amd64", "linux-image-amd64")
TIMEOUT = 300.0


def one_boot(lab: Lab, bootd: BootdServer, name: str, mac: str) -> tuple[float, float]:
    node = QemuNode(lab, name, mac, firmware="bios").start()
    try:
        loaded = node.wait_for(r"initramfs\.img\.\.\. .*ok", timeout=TIMEOUT)
        started = node.wait_for(r"BOOTD-STAGE1 start kernel=", timeout=TIMEOUT)
        ready = node.wait_for(r"BOOTD-CAPSULE ready node=", timeout=TIMEOUT)
        bootd.wait_state(mac, ("ready",), timeout=30)
    finally:
        node.stop()
    return started.t - loaded.t, ready.t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--kernel", action="append", help="linux-image package (repeatable)")
    args = ap.parse_args()
    if not 1 <= args.runs <= 20:
        ap.error("--runs must be 1..20")
    reason = lab_available() or qemu_available("bios")
    if reason:
        print(f"skipped: {reason}")
        return 0
    kernels = tuple(args.kernel or DEFAULT_KERNELS)
    with tempfile.TemporaryDirectory(prefix="bootd-bench-kernels-") as tmp:
        work = Path(tmp)
        stage1s: dict[str, BuildResult] = {}
        for pkg in kernels:
            print(f"building the stage one with {pkg} ...", flush=True)
            stage1s[pkg] = build(work / pkg, kernel_package=pkg, log=lambda m: None)
        results: dict[str, list[tuple[float, float]]] = {pkg: [] for pkg in kernels}
        with Lab(workdir=work / "lab", prefix="bd-bk") as lab:
            bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=work / kernels[0])
            bootd.write_config()
            bootd.import_capsule("busybox", make_busybox_root(work / "busybox"))
            bootd.cli("group", "set", "default", "--capsule", "busybox", check=False)
            bootd.start()
            n = 0
            for run in range(args.runs):
                for pkg in kernels:
                    if bootd.stage1_dir != work / pkg:
                        bootd.stage1_dir = work / pkg
                        bootd.restart()  # writes the config with the other stage one and starts again
                    n += 1
                    mac = f"52:54:00:77:30:{n:02x}"
                    bootd.cli("node", "add", f"b{n}", "--mac", mac, "--capsule", "busybox")
                    kernel_s, ready_s = one_boot(lab, bootd, f"b{n}", mac)
                    results[pkg].append((kernel_s, ready_s))
                    print(f"run {run + 1} {pkg}: kernel start {kernel_s:.1f} s, power-on to ready {ready_s:.1f} s",
                          flush=True)
    for pkg, rows in results.items():
        ks, rs = [r[0] for r in rows], [r[1] for r in rows]
        info = stage1s[pkg].info
        size = (info["initramfs"]["size"], info["vmlinuz"]["size"])  # type: ignore[index]
        print(f"{pkg}: kernel start median {statistics.median(ks):.1f} s ({min(ks):.1f}-{max(ks):.1f}); "
              f"power-on to ready median {statistics.median(rs):.1f} s ({min(rs):.1f}-{max(rs):.1f}); "
              f"initramfs {size[0] / 1e6:.1f} MB, vmlinuz {size[1] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
