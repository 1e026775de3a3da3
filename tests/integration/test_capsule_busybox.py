"""capsules/busybox/build.sh builds, imports deterministically, and its report functions speak the API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from tests.conftest import ROOT

BUILD = ROOT / "capsules" / "busybox" / "build.sh"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static not installed")


def build(out: Path, *extra: str) -> Path:
    subprocess.run([str(BUILD), str(out), "--no-kernel", *extra], check=True, capture_output=True,
                   timeout=120)
    return out


def test_build_script_makes_a_deterministic_runnable_tree(tmp_path: Path) -> None:
    a = build(tmp_path / "a")
    kernel = tmp_path / "vmlinuz-9.9.9-test"
    kernel.write_bytes(b"not really a kernel")
    b = build(tmp_path / "b", "--kernel", str(kernel))
    init = a / "root" / "sbin" / "init"
    assert os.access(init, os.X_OK) and "BOOTD-READY" in init.read_text()
    assert os.readlink(a / "root" / "bin" / "sh") == "busybox"
    subprocess.run([BUSYBOX, "sh", "-n", str(init)], check=True)
    with tarfile.open(a / "busybox.tar") as tf:
        names = tf.getnames()
        assert "./sbin/init" in names and "./bin/busybox" in names
        assert all(m.uid == 0 and m.gid == 0 and m.mtime == 1700000000 for m in tf.getmembers())

    store = CapsuleStore(tmp_path / "store")
    r1 = import_capsule(store, "busybox", a / "busybox.tar")
    r2 = import_capsule(store, "busybox-again", build(tmp_path / "c") / "busybox.tar")
    assert r1.version == r2.version and r1.kernel is None
    rk = import_capsule(store, "busybox-k", b / "busybox.tar")
    assert rk.kernel is not None and rk.kernel.path == "/boot/vmlinuz-9.9.9-test"


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append({"path": self.path, "token": self.headers.get("X-Bootd-Token"),
                          "type": self.headers.get("Content-Type"), "body": json.loads(body or b"{}")})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()
        server.server_close()


def test_report_functions_post_events_and_heartbeats(recorder: tuple[str, list[dict[str, Any]]]) -> None:
    url, seen = recorder
    script = ROOT / "capsules" / "busybox" / "files" / "usr" / "lib" / "bootd" / "report.sh"
    env = {"PATH": "/usr/bin:/bin", "BOOTD_URL": url, "BOOTD_NODE": "n0001", "BOOTD_TOKEN": "t0k3n"}
    subprocess.run([BUSYBOX, "sh", "-c", f'. {script} && bootd_event ready "it \\"works\\"" && bootd_heartbeat'],
                   env=env, check=True, timeout=30)
    assert [s["path"] for s in seen] == ["/api/v1/nodes/n0001/events", "/api/v1/nodes/n0001/heartbeat"]
    assert all(s["token"] == "t0k3n" and s["type"] == "application/json" for s in seen)
    assert seen[0]["body"] == {"event": "ready", "reason": "it works"}
    # Without a URL the functions fail instead of hanging.
    r = subprocess.run([BUSYBOX, "sh", "-c", f". {script} && bootd_heartbeat"], env={"PATH": "/usr/bin:/bin"},
                       timeout=30)
    assert r.returncode != 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (mount, pid and uts namespaces)")
def test_init_reports_ready_then_heartbeats(tmp_path: Path, recorder: tuple[str, list[dict[str, Any]]]) -> None:
    """Run the capsule's real /sbin/init as PID 1 of private mount/pid/uts namespaces, chrooted into the tree.

    The network namespace is shared so it can reach the loopback recorder; BOOTD_DHCP=0 keeps
    udhcpc off the host's interfaces, and the UTS namespace keeps the hostname change private.
    """
    url, seen = recorder
    root = build(tmp_path / "bb") / "root"
    (root / "etc" / "bootd" / "node.env").write_text(
        f"BOOTD_URL='{url}'\nBOOTD_NODE='n0042'\nBOOTD_TOKEN='secret'\nBOOTD_HEARTBEAT='1'\nBOOTD_DHCP='0'\n")
    log = tmp_path / "console.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["unshare", "--mount", "--pid", "--uts", "--fork", "--kill-child",
                                 "--mount-proc", "chroot", str(root), "/sbin/init"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                beats = [s for s in seen if s["path"].endswith("/heartbeat")]
                if len(beats) >= 2 or proc.poll() is not None:
                    break
                time.sleep(0.2)
        finally:
            # unshare blocks SIGTERM while it waits; SIGKILL it and --kill-child (PR_SET_PDEATHSIG)
            # SIGKILLs the namespace's PID 1, which takes every process of the namespace with it.
            proc.kill()
            proc.wait(timeout=30)
    console = log.read_text(errors="replace")
    assert re.search(r"^BOOTD-READY n0042$", console, re.M), console
    assert seen and seen[0]["path"] == "/api/v1/nodes/n0042/events"
    assert seen[0]["body"]["event"] == "ready" and seen[0]["token"] == "secret"
    assert sum(s["path"] == "/api/v1/nodes/n0042/heartbeat" for s in seen) >= 2
    assert (root / "etc" / "hostname").read_text().strip() == "n0042"
