"""A real `bootd serve` with many nodes registered, for the status page tests (HTTP and browser).

Nodes are put into the registry directly (store API, before the daemon
starts): registering 5,000 through PXE would test the registration, not the
page.  Each node gets a known credential, so the tests drive state changes
through the real node API (POST /api/v1/nodes/NAME/events), as a stage one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bootd import config as bootd_config
from bootd.model import Group
from bootd.service.credentials import digest
from bootd.store.base import Credential
from bootd.store.factory import open_store
from tests.conftest import PYTHON, ROOT, free_port, write_config


def node_name(i: int) -> str:
    return f"n{i:04d}"


def node_token(i: int) -> str:
    return f"{i + 1:032x}"


async def _populate(config: Path, count: int, groups: tuple[str, ...], unapproved: int) -> None:
    cfg = bootd_config.load(config)
    store = await open_store(cfg)
    try:
        now = time.time()
        for group in groups:
            await store.put_group(Group(group))
        for i in range(count):
            name = node_name(i)
            await store.add_node(f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}", name,
                                 group=groups[i % len(groups)], now=now, approved=i >= unapproved)
            await store.put_credential(Credential(name, digest(node_token(i)), now, now + 86400, "test"))
    finally:
        await store.close()


@dataclass
class Daemon:
    config: Path
    public: str  # the node-facing listener
    admin: str  # the admin listener (the status page)
    admin_token: str
    viewer_token: str
    log: Path


@contextlib.contextmanager
def status_daemon(tmp: Path, count: int, *, groups: tuple[str, ...] = ("compute", "gpu"),
                  unapproved: int = 0) -> Iterator[Daemon]:
    port, admin_port = free_port(), free_port()
    state = tmp / "state"
    config = write_config(tmp / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"listen": "127.0.0.1", "port": port},
        "admin": {"port": admin_port},
        "registry": {"stale_after": 3600, "dead_after": 7200},
    })
    asyncio.run(_populate(config, count, groups, unapproved))
    log = tmp / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "bootd", "-c", str(config), "serve"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
    public = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield Daemon(config, public, f"http://127.0.0.1:{admin_port}",
                     (state / "admin-token").read_text().strip(), (state / "viewer-token").read_text().strip(), log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
