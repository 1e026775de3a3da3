"""`bootd power` against a BMC with a real machine behind it: the simulator (bootd/lab/bmc.py --qemu) owns a
QEMU node of the lab and drives it over QMP.  `bootd power on` starts it, it boots to `ready` from
`bootd serve`; `bootd power cycle` (the real CLI, over IPMI on the host's loopback) pulls the cord and
powers it again, and it reaches `ready` a second time; `bootd power reset` resets the same QEMU and it
reaches `ready` a third time; ipmitool, a client written by others, reads the
same power state as `bootd power status` throughout.

An unreachable BMC and wrong credentials are covered against the simulator without QEMU in
tests/integration/test_power.py (one line a node, naming why).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.bmc import simulator
from bootd.lab.serve import BootdServer, ServeError
from bootd.stage1.build import BuildResult
from tests.qemu.conftest import SampleCapsule

pytestmark = [pytest.mark.qemu, pytest.mark.netns]

READY_TIMEOUT = 180.0
PASSWORD = "qemu-Bmc-pw1"
MAC = "52:54:00:77:05:01"
NODE = "pw0"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, stage1: BuildResult,
           sample_capsule: SampleCapsule) -> Iterator[BootdServer]:
    reason = lab_available() or qemu_available("bios")
    if reason:
        pytest.skip(reason)
    if shutil.which("ipmitool") is None:
        pytest.skip("ipmitool missing (apt-get install ipmitool)")
    work = tmp_path_factory.mktemp("power")
    with Lab(workdir=work / "lab", prefix="bd-s1") as lab:
        bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=stage1.out_dir)
        bootd.write_config()
        try:
            bootd.import_capsule("busybox", sample_capsule.root)
            bootd.cli("group", "add", "default", "--capsule", "busybox", check=False)
            bootd.cli("group", "set", "default", "--capsule", "busybox")
            bootd.start()
        except ServeError as exc:
            pytest.skip(f"bootd serve is not ready for real boots yet: {exc}")
        yield bootd


def power(bootd: BootdServer, *args: str) -> subprocess.CompletedProcess[str]:
    return bootd.cli("power", *args, check=False, timeout=120)


def ipmitool_status(port: int) -> str:
    proc = subprocess.run(["ipmitool", "-I", "lanplus", "-H", "127.0.0.1", "-p", str(port), "-U", "admin",
                           "-P", PASSWORD, "power", "status"], capture_output=True, text=True, timeout=30)
    return (proc.stdout + proc.stderr).strip()


def states(bootd: BootdServer) -> list[str]:
    return [str(e.get("state")) for e in bootd.events(NODE)]


def test_power_cycle_reboots_a_qemu_node_to_ready_again(served: BootdServer, tmp_path: Path) -> None:
    bootd = served
    # A unix socket path is at most 107 bytes; pytest's tmp_path can be longer.
    qmp_dir = Path(tempfile.mkdtemp(prefix="bd-qmp-"))
    node = QemuNode(bootd.lab, "pwq", MAC, firmware="bios", qmp=qmp_dir / "qmp.sock")
    spec = tmp_path / "machine.json"
    spec.write_text(json.dumps({"argv": node.ns_command(), "qmp": str(node.qmp),
                                "log": str(bootd.lab.workdir / "pwq.qemu.log")}))
    try:
        with simulator(password=PASSWORD, log=tmp_path / "bmc.log", machines=[spec]) as sim:
            port = sim.ports[0]
            bootd.cli("node", "add", NODE, "--mac", MAC, "--var", "bmc.address=127.0.0.1", "--var", "bmc.user=admin",
                      "--var", f"bmc.port={port}")
            subprocess.run([bootd.python, "-m", "bootd", "-c", str(bootd.config_path), "bmc", "set-password", NODE],
                           input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, check=True)
            assert "off" in power(bootd, "status", NODE).stdout
            assert ipmitool_status(port) == "Chassis Power is off"

            node.watch()
            started = time.monotonic()
            on = power(bootd, "on", NODE, "--pxe")
            assert on.returncode == 0 and "powered on; next boot from the network" in on.stdout, on
            first = node.wait_for(r"BOOTD-CAPSULE ready node=pw0", timeout=READY_TIMEOUT)
            bootd.wait_state(MAC, ("ready",), timeout=20)
            booted_before = states(bootd).count("booted")
            assert booted_before >= 1 and "ready" in states(bootd)

            status = power(bootd, "status", NODE)
            assert status.returncode == 0 and f"{NODE}  ok      on " in status.stdout, status
            assert ipmitool_status(port) == "Chassis Power is on"

            cycled_at = time.monotonic()
            cycle = power(bootd, "cycle", NODE)
            assert cycle.returncode == 0 and "power cycled" in cycle.stdout, cycle
            second = node.wait_for(r"BOOTD-CAPSULE ready node=pw0", timeout=READY_TIMEOUT, nth=2)
            assert second.t > cycled_at - started
            # A second boot from the top: firmware, stage one, capsule, all again in the registry.
            assert node.console().count("BOOTD-STAGE1 verified") == 2
            deadline = time.monotonic() + 30
            while states(bootd).count("booted") <= booted_before and time.monotonic() < deadline:
                time.sleep(0.5)
            timeline = states(bootd)
            assert timeline.count("booted") == booted_before + 1, timeline
            assert timeline[-1] == "ready" or bootd.wait_state(MAC, ("ready",), timeout=20)
            launches = sim.records("launch")
            assert len(launches) == 2 and launches[0]["pid"] != launches[1]["pid"], launches
            assert [r["what"] for r in sim.records() if r["what"] in ("on", "cycle", "bootdev")] == \
                ["bootdev", "on", "cycle"]

            status = power(bootd, "status", NODE)
            assert f"{NODE}  ok      on " in status.stdout and ipmitool_status(port) == "Chassis Power is on"

            # A reset is QMP system_reset in the same QEMU (no relaunch): the lab's -no-reboot is lifted
            # for it alone, else QEMU would just exit and the node stay off.
            reset_at = time.monotonic()
            reset = power(bootd, "reset", NODE)
            assert reset.returncode == 0 and "reset" in reset.stdout, reset
            third = node.wait_for(r"BOOTD-CAPSULE ready node=pw0", timeout=READY_TIMEOUT, nth=3)
            assert len(sim.records("launch")) == 2 and sim.records("reset")
            assert ipmitool_status(port) == "Chassis Power is on"

            off = power(bootd, "off", NODE)
            assert off.returncode == 0 and "powered off" in off.stdout, off
            assert "  off " in power(bootd, "status", NODE).stdout
            assert ipmitool_status(port) == "Chassis Power is off"
            print(f"\nready after power on {first.t:.1f} s; after power cycle {second.t - (cycled_at - started):.1f} s;"
                  f" after reset {third.t - (reset_at - started):.1f} s")
    finally:
        node.stop()
        shutil.rmtree(qmp_dir, ignore_errors=True)
