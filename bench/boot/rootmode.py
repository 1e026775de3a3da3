"""bench/boot --root-modes: the Debian capsule (capsules/debian-hpc) booted in each root mode, side by side.

One QEMU node (TCG, the lab's cloud kernel, 1024 MiB) per boot, served by ``bootd serve`` in a private
namespace (bootd.lab.cluster), the modes alternating run by run. Per mode: power-on to ``ready`` (s), and
the image RAM the node agent reports (image_ram_kb: the root tmpfs's use in the tmpfs mode; the in-RAM
squashfs image plus the overlay's upper in the squashfs mode) after boot, idle: from the first heartbeat
that lands ``idle`` seconds after ``ready`` (bootd keeps each node's last heartbeat report, the node's
``usage`` in the admin API; the lab sets the agent's BOOTD_HEARTBEAT to bootd.lab.cluster.HEARTBEAT, 10 s). The figure
sent with ``ready`` (right after systemd's start-up) is printed beside it, and stands in only when no
heartbeat came, with a warning.
The squashfs image is made once before the first boot (its build time is printed, not counted: bootd
makes it at the version's first use and keeps it). Targets: image RAM squashfs/tmpfs <= 0.5, time to
ready squashfs/tmpfs <= 1.1.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bootd.capsule.image import ImageStore
from bootd.capsule.objects import CapsuleStore
from bootd.lab.cluster import LAB_KERNEL, Cluster, _event_field
from bootd.lab.serve import BootdServer
from bootd.stage1.build import build

MODES = ("tmpfs", "squashfs")
IDLE = 60.0  # seconds the node sits idle after `ready` before its image RAM is taken


def heartbeat_usage(bootd: BootdServer, name: str, since: float, wait: float) -> dict[str, float] | None:
    """The node's last heartbeat usage report (the admin API's ``usage``) taken at or after ``since``
    (Unix time), waiting up to ``wait`` seconds for one; None when none came."""
    deadline = time.monotonic() + wait
    while True:
        code, body = bootd.http_get(f"/api/v1/nodes/{name}")
        usage = json.loads(body).get("usage") if code == 200 else None
        if isinstance(usage, dict) and float(usage.get("at", 0)) >= since and "image_ram_kb" in usage:
            return usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(2.0)


def bench_root_modes(work: Path, runs: int, out: Callable[[str], None] = print, timeout: float = 600.0,
                     idle: float = IDLE) -> dict[str, dict[str, list[float]]]:
    """Per mode and run: "ready" seconds, "image_mib" (idle, the table's) and "ready_image_mib" (at ready)."""
    t0 = time.monotonic()

    def say(msg: str) -> None:
        out(f"  [{time.monotonic() - t0:6.1f}s] {msg}")

    s1 = build(work / "stage1-cloud", kernel_package=LAB_KERNEL, log=lambda m: None)
    say(f"stage one: kernel {s1.kernel.kver}, modules {' '.join(s1.load_order)}")
    results: dict[str, dict[str, list[float]]] = {m: {"ready": [], "image_mib": [], "ready_image_mib": []}
                                                  for m in MODES}
    for run in range(runs):
        for mode in MODES if run % 2 == 0 else tuple(reversed(MODES)):
            cl = Cluster(work=work / f"{mode}-{run}", stage1_dir=s1.out_dir, nodes=1, root=mode,
                         say=lambda m: None)
            cl.prepare()
            if mode == "squashfs":
                store = CapsuleStore(cl.cache / "capsules")
                images = ImageStore(store)
                t = time.monotonic()
                image = images.ensure(cl.capsule_vid, progress=say)
                size = images.load(image).size
                raw = store.load_manifest(cl.capsule_vid).raw_size
                say(f"squashfs image {image[:12]}: {size / 2**20:.1f} MiB of a {raw / 2**20:.1f} MiB tree "
                    f"({size / raw:.2f}x), ready in {time.monotonic() - t:.1f}s (built once, then cached)")
            with cl:
                if not cl.wait_ready(timeout):
                    raise RuntimeError(f"{mode}: the node did not reach ready within {timeout:.0f}s "
                                       f"(consoles in {cl.work})")
                assert cl.bootd is not None
                ready_at = time.time()
                name = sorted(cl.hosts)[0]
                ready_kb = 0
                for ev in reversed(cl.bootd.events(name)):
                    if ev.get("state") == "ready" and _event_field(ev, "image_ram_kb"):
                        ready_kb = _event_field(ev, "image_ram_kb")
                        break
                if not ready_kb:
                    raise RuntimeError(f"{mode}: the node agent reported no image_ram_kb with ready")
                say(f"run {run + 1} {mode}: ready {cl.ready_seconds:.1f}s after power-on, image RAM at ready "
                    f"{ready_kb / 1024:.1f} MiB; idle {idle:.0f}s, then the next heartbeat's")
                time.sleep(idle)
                # The agent beats every cl.heartbeat s (BOOTD_HEARTBEAT), late by seconds under TCG: wait for three.
                usage = heartbeat_usage(cl.bootd, name, ready_at + idle, 3 * cl.heartbeat + 10)
            if usage is None:
                image_kb = ready_kb
                say(f"WARNING: {mode} run {run + 1}: no heartbeat usage report landed after the {idle:.0f}s idle "
                    f"wait (old agent? heartbeats failing? see {cl.work}): using the figure sent with ready, "
                    "taken right after start-up, NOT idle")
            else:
                image_kb = int(usage["image_ram_kb"])
            results[mode]["ready"].append(cl.ready_seconds)
            results[mode]["image_mib"].append(image_kb / 1024)
            results[mode]["ready_image_mib"].append(ready_kb / 1024)
            say(f"run {run + 1} {mode}: image RAM idle {image_kb / 1024:.1f} MiB"
                + (f" (heartbeat {usage['at'] - ready_at:.0f}s after ready)" if usage is not None else " (ready's)")
                + f", at ready {ready_kb / 1024:.1f} MiB")
    return results


def rows(results: dict[str, dict[str, list[float]]]) -> list[tuple[str, str, str, str, str]]:
    """The bench table's rows: squashfs in the first column, tmpfs in the second."""
    sq, tm = results["squashfs"], results["tmpfs"]
    mi_sq, mi_tm = statistics.median(sq["image_mib"]), statistics.median(tm["image_mib"])
    r_sq, r_tm = statistics.median(sq["ready"]), statistics.median(tm["ready"])
    a_sq, a_tm = statistics.median(sq["ready_image_mib"]), statistics.median(tm["ready_image_mib"])
    return [
        ("Debian image RAM idle (MiB), squashfs | tmpfs", f"{mi_sq:.1f}", f"{mi_tm:.1f}", f"{mi_sq / mi_tm:.2f}",
         "<= 0.50"),
        ("Debian image RAM at ready (MiB), squashfs | tmpfs", f"{a_sq:.1f}", f"{a_tm:.1f}", f"{a_sq / a_tm:.2f}",
         "-"),
        ("Debian power-on -> ready (s), squashfs | tmpfs", f"{r_sq:.1f}", f"{r_tm:.1f}", f"{r_sq / r_tm:.2f}",
         "<= 1.10"),
    ]
