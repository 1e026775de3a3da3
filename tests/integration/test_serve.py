"""`bootd serve` as systemd runs it: READY over a real NOTIFY_SOCKET, SIGHUP reload, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import PYTHON, ROOT, free_port, recv_until, write_config


def test_serve_notifies_ready_reloads_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 5},
        "http": {"listen": "127.0.0.1", "port": free_port()},
    })
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
    proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = recv_until(sock, "READY=1", timeout=30)
        assert f"MAINPID={proc.pid}" in ready
        assert (state / "bootd.sqlite").exists()

        # SIGHUP with a broken file keeps the running configuration and says why.
        good = config.read_text()
        config.write_text(good.replace('address = "127.0.0.1"', 'address = "not-an-ip"'))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload_failed" not in Path(log.name).read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "server.address" in Path(log.name).read_text()
        config.write_text(good.replace("[registry]", "") + '\n[registry]\nname_pattern = "c{index:03d}"\n')
        proc.send_signal(signal.SIGHUP)
        recv_until(sock, "STATUS=configuration reloaded", timeout=10)
        assert proc.poll() is None

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        recv_until(sock, "STOPPING=1", timeout=10)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5 + 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    text = Path(log.name).read_text()
    assert "event=ready" in text and "event=stopped" in text


def test_serve_refuses_unwritable_state_dir_with_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(blocker / "state"), "address": "127.0.0.1"},
        "http": {"listen": "127.0.0.1", "port": free_port()},
    })
    proc = subprocess.run([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot create state directory" in proc.stderr and str(blocker) in proc.stderr
