"""The whole daemon as an administrator runs it (`bootd serve`), every service on loopback ports."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, ROOT, free_port, need_tool, recv_until, write_config


@dataclass
class Served:
    config: Path
    state: Path
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]

    def log_text(self) -> str:
        return self.log.read_text()


def start_serve(tmp_path: Path, extra: dict[str, dict[str, Any]] | None = None) -> Served:
    state = tmp_path / "state"
    ports = {"http": free_port(), "tftp": free_port(socket.SOCK_DGRAM)}
    sections: dict[str, dict[str, Any]] = {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 5},
        "http": {"listen": "127.0.0.1", "port": ports["http"]},
        "tftp": {"enabled": True, "listen": "127.0.0.1", "port": ports["tftp"]},
    }
    for key, values in (extra or {}).items():
        sections.setdefault(key, {}).update(values)
    config = write_config(tmp_path / "bootd.toml", sections)
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        recv_until(sock, "READY=1", timeout=30)
    except AssertionError:
        proc.kill()
        raise AssertionError("bootd serve never became ready:\n" + log.read_text()) from None
    finally:
        sock.close()
    return Served(config, state, proc, log, ports)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = start_serve(tmp_path)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()


def test_serve_hands_out_the_ipxe_nbp_over_tftp(served: Served, tmp_path: Path) -> None:
    need_tool("tftp")
    nbp = Path("/usr/lib/ipxe/undionly.kpxe")
    if not nbp.exists():
        pytest.fail("Debian's ipxe package is missing; tools/setup.sh installs it")
    out = tmp_path / "got.kpxe"
    proc = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(served.ports["tftp"]), "-c", "get",
                           "undionly.kpxe", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(nbp.read_bytes()).hexdigest()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=15) == 0
    assert "component=tftp" in served.log_text()
