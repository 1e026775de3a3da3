"""Overlays over HTTP: rendered per node, for the node's own credential, 304 when nothing changed."""

from __future__ import annotations

import asyncio
import io
import re
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bootd import compose
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.config import from_dict
from bootd.model import Group, Lease
from bootd.net.http.app import HttpServer
from bootd.store.sqlite import SqliteNodeStore


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Any]:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    state = tmp_path / "state"
    keys = tmp_path / "authorized_keys"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG2bootdtestkey admin@master\n")
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nann:x:1400:1400::/home/ann:/bin/sh\n")
    (tmp_path / "group").write_text("root:x:0:\nann:x:1400:\n")
    config = from_dict({
        "server": {"state_dir": str(state), "address": "127.0.0.1"},
        "http": {"listen": "127.0.0.1", "port": 0},
        "capsule": {"dir": str(tmp_path / "capsules")},
        "overlay": {"authorized_keys": str(keys), "passwd": str(tmp_path / "passwd"), "group": str(tmp_path / "group")},
    })
    await asyncio.to_thread(import_capsule, CapsuleStore(config.capsule.dir), "tiny", root,
                            options=ImportOptions(durable=False, workers=1))
    store = SqliteNodeStore(config.db_path)
    await store.put_group(Group("default", capsule="tiny"))
    _, services = compose.services(config, store=store)
    server = HttpServer(config, services)
    await server.start()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
        try:
            yield session, store
        finally:
            await server.close()
            await store.close()


async def boot(session: aiohttp.ClientSession, mac: str) -> tuple[str, str]:
    async with session.get(f"/boot/{mac}.ipxe") as r:
        text = await r.text()
    return re.search(r"bootd\.node=(\S+)", text).group(1), re.search(r"bootd\.token=(\w+)", text).group(1)  # type: ignore[union-attr]


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_system_and_runtime_overlays_per_node(served: Any) -> None:
    session, store = served
    a, token_a = await boot(session, "52-54-00-00-0c-01")
    b, token_b = await boot(session, "52-54-00-00-0c-02")
    for i, mac in ((1, "52:54:00:00:0c:01"), (2, "52:54:00:00:0c:02")):
        await store.put_lease(Lease(f"10.9.0.{i}", mac, 2e9))  # their addresses, as DHCP would record
    url = f"/api/v1/nodes/{a}/overlay/system"
    async with session.get(url) as r:
        assert r.status == 403
    async with session.get(url, headers={"X-Bootd-Token": token_b}) as r:
        assert r.status == 403  # another node's credential: the host keys are a's secret
    async with session.get(url, headers={"X-Bootd-Token": token_a}) as r:
        assert r.status == 200 and r.content_type == "application/x-tar"
        etag, system_a = r.headers["ETag"], members(await r.read())
    assert system_a["etc/hostname"].strip() == a.encode()
    assert re.fullmatch(rb"[0-9a-f]{32}\n", system_a["etc/machine-id"])
    key_a = system_a["etc/ssh/ssh_host_ed25519_key.pub"]
    # Stable across reboots (same keys and id on the next boot), different from another node's.
    _, token_a2 = await boot(session, "52-54-00-00-0c-01")
    async with session.get(url, headers={"X-Bootd-Token": token_a2}) as r:
        assert r.headers["ETag"] == etag and members(await r.read())["etc/ssh/ssh_host_ed25519_key.pub"] == key_a
    async with session.get(f"/api/v1/nodes/{b}/overlay/system", headers={"X-Bootd-Token": token_b}) as r:
        system_b = members(await r.read())
    assert system_b["etc/ssh/ssh_host_ed25519_key.pub"] != key_a
    assert system_b["etc/machine-id"] != system_a["etc/machine-id"]

    # Runtime: /etc/hosts names every node, root's keys come from the master; unchanged costs a 304.
    rurl = f"/api/v1/nodes/{a}/overlay/runtime"
    async with session.get(rurl, headers={"X-Bootd-Token": token_a2}) as r:
        runtime = members(await r.read())
        rtag = r.headers["ETag"]
    hosts = runtime["etc/hosts"].decode()
    assert f"10.9.0.1\t{a}" in hosts and f"10.9.0.2\t{b}" in hosts
    assert b"bootdtestkey" in runtime["root/.ssh/authorized_keys"]
    async with session.get(rurl, headers={"X-Bootd-Token": token_a2, "If-None-Match": rtag}) as r:
        assert r.status == 304 and await r.read() == b""


async def test_a_user_added_on_the_master_changes_the_runtime_overlay(served: Any, tmp_path: Path) -> None:
    """The master's passwd (overlay.passwd) is read again when it changes, as useradd replaces it: the next
    conditional request gets the new tar; until then, and after, a 304."""
    session, _ = served
    name, token = await boot(session, "52-54-00-00-0c-07")
    url, auth = f"/api/v1/nodes/{name}/overlay/runtime", {"X-Bootd-Token": token}
    async with session.get(url, headers=auth) as r:
        etag, before = r.headers["ETag"], members(await r.read())
    assert "ann:x:1400:1400" in before["etc/bootd/users/passwd"].decode() and "home/ann" in before
    new = tmp_path / "passwd.new"
    new.write_text((tmp_path / "passwd").read_text() + "bob:x:1401:1400:Bob:/home/bob:/bin/sh\n")
    new.replace(tmp_path / "passwd")
    await asyncio.sleep(1.1)  # the service looks at the files at most once a second
    async with session.get(url, headers={**auth, "If-None-Match": etag}) as r:
        assert r.status == 200
        after, etag2 = members(await r.read()), r.headers["ETag"]
    assert etag2 != etag and "bob:x:1401:1400:Bob:/home/bob:/bin/sh" in after["etc/bootd/users/passwd"].decode()
    assert "home/bob" in after
    async with session.get(url, headers={**auth, "If-None-Match": etag2}) as r:
        assert r.status == 304
