"""A sample capsule root for labs, tests and the demo: static busybox plus an init that reports in.

The init is what any capsule needs to close the loop with bootd: read /etc/bootd/node.env (written by
the stage one), report ``ready``, then heartbeat so bootd can tell a running node from a dead one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

CAPSULE_INIT = r"""#!/bin/sh
# Sample capsule init: report ready, then heartbeat, using what the stage one wrote.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
. /etc/bootd/node.env
hostname "$(cat /etc/hostname)"
echo "BOOTD-CAPSULE up hostname=$(hostname) node=$BOOTD_NODE ip=$BOOTD_IP heartbeat=${BOOTD_HEARTBEAT:-5}"
post() {
    wget -q -O /dev/null --header "X-Bootd-Token: $BOOTD_TOKEN" --header "Content-Type: application/json" \
        --post-data "$2" "$BOOTD_URL/api/v1/nodes/$BOOTD_NODE/$1"
}
n=0
until post events '{"event":"ready","reason":"","done":0,"total":0}'; do
    n=$((n + 1)); [ "$n" -ge 20 ] && break; sleep 1
done
echo "BOOTD-CAPSULE ready node=$BOOTD_NODE"
while :; do
    sleep "${BOOTD_HEARTBEAT:-5}"
    post heartbeat '{}' || echo "BOOTD-CAPSULE heartbeat failed"
done
"""


def make_busybox_root(root: Path, *, filler_bytes: int = 0, seed: bytes = b"bootd-filler") -> Path:
    """A minimal root: static busybox, its applet links, /sbin/init; ``filler_bytes`` of random data
    make the capsule span more chunks (for the restart-while-fetching test)."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    busybox = Path("/bin/busybox")
    (root / "bin/busybox").write_bytes(busybox.read_bytes())
    os.chmod(root / "bin/busybox", 0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet in ("bin/busybox", "linuxrc", "sbin/init"):
            continue
        link = root / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    (root / "sbin/init").write_text(CAPSULE_INIT)
    os.chmod(root / "sbin/init", 0o755)
    if filler_bytes:
        data = hashlib.shake_256(seed).digest(filler_bytes)
        (root / "root/filler.bin").write_bytes(data)
    return root


REPO_ROOT = Path(__file__).resolve().parents[2]
BUSYBOX_BUILD = REPO_ROOT / "capsules" / "busybox" / "build.sh"


def build_busybox_capsule(out: Path, kernel: Path | None = None) -> Path | None:
    """Run the repository's busybox capsule build script (capsules/busybox/build.sh) and return its tarball.

    ``kernel`` is put into the capsule's /boot, so nodes boot the capsule's own kernel through
    /capsules/<vid>/kernel; passing the stage one's kernel keeps the stage one's modules matching.
    None when this is not a source checkout with the script.
    """
    if not BUSYBOX_BUILD.exists():
        return None
    cmd = [str(BUSYBOX_BUILD), str(out)]
    cmd += ["--kernel", str(kernel)] if kernel is not None else ["--no-kernel"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{BUSYBOX_BUILD} failed (exit {proc.returncode}): {proc.stderr.strip()[-1000:]}")
    tarball = out / "busybox.tar"
    if not tarball.exists():
        raise RuntimeError(f"{BUSYBOX_BUILD} did not produce {tarball}")
    return tarball
