"""``bootd demo`` / ``make demo``: bootd's main job, end to end, on one machine.

Builds the stage one and the sample capsule, creates a private network namespace, runs ``bootd serve``
in it, powers on QEMU node(s) that PXE-boot from it, shows their progress live (registry state and the
stage one's console lines), prints each node's boot timeline, and tears everything down, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootd.lab.netns import Lab, LabError, lab_available
from bootd.lab.qemu import QemuError, QemuNode, qemu_available
from bootd.lab.sample import build_busybox_capsule, make_busybox_root
from bootd.lab.serve import BootdServer
from bootd.stage1.build import Stage1Error, build

Out = Callable[[str], None]

# Timeline milestones: (label, console regex). Firmware lines differ between iPXE and EDK2, hence the
# alternatives; the first match after power-on counts.
MILESTONES: tuple[tuple[str, str], ...] = (
    ("firmware DHCP", r"^net0: \d+\.\d+\.\d+\.\d+/|Station IP address is"),
    ("NBP (TFTP)", r"NBP file downloaded successfully"),
    ("iPXE script", r"bootd: booting |BOOTD-IPXE"),
    ("kernel+initrd", r"initramfs\.img\.\.\. ok"),
    ("stage one", r"BOOTD-STAGE1 start"),
    ("stage-one DHCP", r"BOOTD-STAGE1 net "),
    ("manifest", r"BOOTD-STAGE1 manifest ok"),
    ("chunks verified", r"BOOTD-STAGE1 verified"),
    ("switch_root", r"BOOTD-STAGE1 booted"),
    ("ready", r"BOOTD-CAPSULE ready|BOOTD-READY "),
)


@dataclass
class DemoResult:
    ok: bool
    timelines: dict[str, list[tuple[str, float]]]


def _mac(i: int) -> str:
    return f"52:54:00:77:10:{i + 1:02x}"


def timeline(node: QemuNode) -> list[tuple[str, float]]:
    out = []
    for label, pattern in MILESTONES:
        line = node.first(pattern)
        if line is not None:
            out.append((label, line.t))
    return out


def node_timelines(bootd: BootdServer, machines: list[QemuNode]) -> dict[str, list[tuple[str, float]]]:
    """Each machine's console milestones, under the node name bootd gave it (the VM's name if none yet)."""
    names = {n.get("mac"): str(n.get("name")) for n in bootd.nodes()}
    return {names.get(m.mac, m.name): timeline(m) for m in machines}


def print_timelines(timelines: dict[str, list[tuple[str, float]]], out: Out) -> None:
    out("")
    out("boot timeline (seconds from power-on):")
    for name, tl in sorted(timelines.items()):
        out(f"  {name}:")
        for label, t in tl:
            out(f"    {t:7.2f}  {label}")
    out("")


def run_demo(*, nodes: int = 1, firmware: str = "bios", workdir: Path | None = None, keep: bool = False,
             timeout: float = 240.0, out: Out = print) -> DemoResult:
    reason = lab_available() or qemu_available(firmware)
    if reason:
        raise LabError(f"bootd demo cannot run here: {reason}")
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="bootd-demo-")) if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        out(f"[{time.monotonic() - t0:6.1f}s] {msg}")

    try:
        say(f"building the stage one into {work / 'stage1'} (kernel .deb cached in ~/.cache/bootd)")
        s1 = build(work / "stage1", log=lambda m: say(f"  {m}"))
        say(f"stage one ready: kernel {s1.kernel.kver}, initramfs {s1.initramfs.stat().st_size // 1024} KiB")
        source = build_busybox_capsule(work / "capsule", kernel=s1.vmlinuz)
        if source is None:  # not a source checkout: the built-in sample root (no kernel of its own)
            source = make_busybox_root(work / "sample-root")
        with Lab(workdir=work / "lab", prefix="bd-demo") as lab:
            say(f"network namespace {lab.name}: bridge {lab.bridge} {lab.server_ip}/24")
            bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=s1.out_dir)
            bootd.write_config()
            vid = bootd.import_capsule("busybox", source)
            bootd.cli("group", "set", "default", "--capsule", "busybox", check=False)
            if bootd.cli("group", "show", "default", check=False).returncode != 0:
                bootd.cli("group", "add", "default", "--capsule", "busybox")
            say(f"capsule busybox imported from {source}: version {vid[:16]}…")
            bootd.start()
            say(f"bootd serve running in the namespace ({bootd.base_url}, DHCP {bootd.dhcp}); config "
                f"{bootd.config_path}")
            machines = [QemuNode(lab, f"node{i}", _mac(i), firmware=firmware) for i in range(nodes)]
            for m in machines:
                m.start()
                say(f"powered on {m.name} ({firmware}, MAC {m.mac})")
            ok = follow(bootd, machines, timeout, say)
            timelines = node_timelines(bootd, machines)
            for m in machines:
                m.stop()
            print_timelines(timelines, out)
            out(bootd.cli("node", "list").stdout.rstrip())
            say("tearing down (VMs, bootd, namespace)")
        say("done" if ok else "FAILED: not every node reached ready")
        return DemoResult(ok=ok, timelines=timelines)
    finally:
        if own_dir and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep:
            out(f"kept {work} (logs: {work / 'lab'})")


def follow(bootd: BootdServer, machines: list[QemuNode], timeout: float, say: Out, *,
           console: bool = True) -> bool:
    """Print registry state changes (and, with ``console``, stage-one progress) until every node is ready
    or failed. A node whose state stays but whose reason changes (systemd still starting) gets a line too."""
    deadline = time.monotonic() + timeout
    seen_lines: dict[str, int] = {m.mac: 0 for m in machines}
    states: dict[str, str] = {}
    done: set[str] = set()
    failed: set[str] = set()
    while time.monotonic() < deadline and len(done | failed) < len(machines):
        for m in machines:
            lines = m.lines[seen_lines[m.mac]:]
            seen_lines[m.mac] += len(lines)
            for line in lines if console else ():
                if re.search(r"BOOTD-(STAGE1|CAPSULE|IPXE|READY)|bootd: booting|bootd capsule init", line.text) and \
                        not re.search(r"fetching \d+/\d+$", line.text):
                    say(f"  {m.name} console: {line.text}")
            for needle, why in m.dead_ends.items():
                if needle in m.console() and m.mac not in failed:
                    failed.add(m.mac)
                    say(f"  {m.name}: dead end: {why}")
        try:
            nodes = {n.get("mac"): n for n in bootd.nodes()}
        except LabError:
            nodes = {}
        for m in machines:
            entry = nodes.get(m.mac)
            if entry is None:
                continue
            state = f"{entry.get('state')}"
            reason = f" ({entry.get('reason')})" if entry.get("reason") else ""
            if states.get(m.mac) != state + reason:
                states[m.mac] = state + reason
                say(f"{entry.get('name')} [{m.mac}] -> {state}{reason}")
            if state == "ready":
                done.add(m.mac)
            elif state == "failed":
                failed.add(m.mac)
        time.sleep(0.5)
    return len(done) == len(machines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootd demo", description=__doc__)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return run_from_args(args)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("-n", "--nodes", type=int, default=1, help="QEMU nodes to boot at once (default 1)")
    ap.add_argument("--firmware", choices=("bios", "uefi", "uefi-pxe"), default="bios",
                    help="bios: SeaBIOS+iPXE ROM; uefi: OVMF+iPXE ROM; uefi-pxe: OVMF's own PXE, then iPXE")
    ap.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, consoles)")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for ready (default 240)")


def run_from_args(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 16:
        print("bootd demo: --nodes must be 1..16 (each node is one TCG core)", file=sys.stderr)
        return 2
    try:
        result = run_demo(nodes=args.nodes, firmware=args.firmware, workdir=args.workdir, keep=args.keep,
                          timeout=args.timeout)
    except (LabError, QemuError, Stage1Error) as exc:
        print(f"bootd demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bootd demo: interrupted; everything was torn down", file=sys.stderr)
        return 130
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
