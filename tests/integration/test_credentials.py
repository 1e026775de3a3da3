"""Node credentials against the attacks of a host on the provisioning LAN (real HTTP on loopback).

bootd runs in lease mode (what full DHCP mode uses): a script request earns a credential only from the
address bootd leased to that MAC.  The leases are written to the real SQLite store, as bootd's DHCP does.
"""

from __future__ import annotations

import asyncio
import re
import time
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
from bootd.net.http.admin import AdminServer
from bootd.net.http.app import HttpServer
from bootd.store.sqlite import SqliteNodeStore

VICTIM = "52:54:00:00:07:01"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Any]:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("x\n")
    state = tmp_path / "state"
    config = from_dict({
        "server": {"state_dir": str(state), "address": "127.0.0.1"},
        "registry": {"evidence": "lease"},
        "http": {"listen": "127.0.0.1", "port": 0},
        "admin": {"port": 0},
        "capsule": {"dir": str(tmp_path / "capsules")},
    })
    await asyncio.to_thread(import_capsule, CapsuleStore(config.capsule.dir), "tiny", root,
                            options=ImportOptions(durable=False, workers=1))
    store = SqliteNodeStore(config.db_path)
    await store.put_group(Group("default", capsule="tiny"))
    _, services = compose.services(config, store=store)
    server = HttpServer(config, services)
    await server.start()
    admin = AdminServer(config, services, server.metrics)
    await admin.start()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
        try:
            yield session, store, config, admin.base_url
        finally:
            await admin.close()
            await server.close()
            await store.close()


async def script(session: aiohttp.ClientSession, mac: str) -> tuple[str | None, str, str]:
    async with session.get(f"/boot/{mac.replace(':', '-')}.ipxe") as r:
        text = await r.text()
    token = re.search(r"bootd\.token=(\w+)", text)
    name = re.search(r"bootd\.node=(\S+)", text)
    return (token.group(1) if token else None), (name.group(1) if name else ""), text


async def post(session: aiohttp.ClientSession, path: str, token: str | None, body: Any = None) -> int:
    headers = {"X-Bootd-Token": token} if token else {}
    async with session.post(path, json=body, headers=headers) as r:
        return r.status


async def test_no_credential_without_evidence_and_none_that_outlives_its_node(served: Any) -> None:
    session, store, config, _ = served
    now = time.time()
    # The victim booted: bootd leased it 10.9.9.9.  An attacker on 127.0.0.1 asks for its script.
    token, _, text = await script(session, VICTIM)
    node = await store.get_node_by_mac(VICTIM)
    assert node is not None
    await store.put_lease(Lease("10.9.9.9", VICTIM, now + 600))
    token, _, text = await script(session, VICTIM)
    assert token is None and "127.0.0.1 is not the address leased to" in text
    assert "bootd.token" not in text
    # Asking cannot revoke the running node's credential either: nothing was issued.
    assert await store.get_credential(node.name) is None

    # The real machine (its lease is 127.0.0.1 now) gets one, and it works.
    await store.put_lease(Lease("127.0.0.1", VICTIM, now + 600))
    first, name, _ = await script(session, VICTIM)
    assert first is not None and len(first) == 32 and name == node.name
    assert await post(session, f"/api/v1/nodes/{name}/events", first, {"event": "stage1"}) == 200
    # Only its digest is stored: the database file never holds the token.
    raw = b"".join(p.read_bytes() for p in config.db_path.parent.glob("bootd.sqlite*"))
    assert first.encode() not in raw

    # A new boot replaces it: the old token stops working at once.
    second, _, _ = await script(session, VICTIM)
    assert second is not None and second != first
    assert await post(session, f"/api/v1/nodes/{name}/heartbeat", first) == 403
    assert await post(session, f"/api/v1/nodes/{name}/heartbeat", second) == 200

    # Deleted: the next new MAC is registered under the same name, and the old token is worthless.
    await store.delete_node(name)
    other = "52:54:00:00:07:02"
    await script(session, other)
    reused = await store.get_node_by_mac(other)
    assert reused is not None and reused.name == name
    assert await post(session, f"/api/v1/nodes/{name}/heartbeat", second) == 403
    assert await post(session, f"/api/v1/nodes/{name}/events", second, {"event": "failed"}) == 403


async def test_disabled_node_gets_nothing_but_the_wait_script(served: Any) -> None:
    session, store, _, _ = served
    await script(session, VICTIM)
    node = await store.get_node_by_mac(VICTIM)
    assert node is not None
    await store.put_lease(Lease("127.0.0.1", VICTIM, time.time() + 600))
    token, name, _ = await script(session, VICTIM)
    assert token is not None
    await store.put_lease(Lease("127.0.0.1", VICTIM, time.time() + 600))
    await store.update_node(name, enabled=False)
    again, _, text = await script(session, VICTIM)
    assert again is None and "is disabled" in text
    async with session.get(f"/api/v1/nodes/{name}/env", headers={"X-Bootd-Token": token}) as r:
        assert r.status == 404 and "disabled" in await r.text()


async def test_bad_json_of_any_shape_is_a_400(served: Any) -> None:
    session, store, config, admin_base = served
    await store.put_lease(Lease("127.0.0.1", VICTIM, time.time() + 600))
    await script(session, VICTIM)
    token, name, _ = await script(session, VICTIM)
    deep = b"[" * 100_000 + b"]" * 100_000
    async with session.post(f"/api/v1/nodes/{name}/events", data=deep,
                            headers={"X-Bootd-Token": token or "", "Content-Type": "application/json"}) as r:
        assert r.status in (400, 413)
    admin = (config.server.state_dir / "admin-token").read_text().strip()
    async with session.post(f"{admin_base}/api/v1/nodes/{name}", data=b"[" * 50_000 + b"]" * 50_000,
                            headers={"Authorization": f"Bearer {admin}"}) as r:
        assert r.status == 400


async def test_symlinks_out_of_a_served_directory_are_refused(served: Any, tmp_path: Path) -> None:
    """HTTP follows a link inside /stage1 or /nbp only while it stays inside (it served /etc/shadow before)."""
    session, _, config, _ = served
    stage1 = config.boot.stage1_dir
    stage1.mkdir(parents=True, exist_ok=True)
    (stage1 / "initramfs.img").write_bytes(b"INITRD")
    (stage1 / "inside").symlink_to("initramfs.img")
    (stage1 / "shadow").symlink_to("/etc/shadow")
    (stage1 / "token").symlink_to(config.server.state_dir / "admin-token")
    (stage1 / "up").symlink_to("..")
    async with session.get("/stage1/inside") as r:
        assert r.status == 200 and await r.read() == b"INITRD"
    for name in ("shadow", "token"):
        async with session.get(f"/stage1/{name}") as r:
            body = await r.text()
            assert r.status == 403 and "leads outside" in body and "root:" not in body
    async with session.get("/metrics") as r:
        assert "bootd_http_outside_root_total 2.0" in await r.text()
