"""The busybox capsule recipe builds, imports deterministically, and its report functions speak the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from bootd.capsule.importer import import_capsule
from bootd.capsule.store import CapsuleStore
from tests.conftest import ROOT

BUILD = ROOT / "capsules" / "busybox" / "build.sh"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

pytestmark = pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="busybox-static not installed")


def build(out: Path, *extra: str) -> Path:
    subprocess.run([str(BUILD), str(out), "--no-kernel", *extra], check=True, capture_output=True,
                   timeout=120)
    return out


def test_recipe_builds_a_deterministic_runnable_tree(tmp_path: Path) -> None:
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
