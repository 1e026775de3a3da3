"""Commissioning: the stage one's inventory.sh (run by busybox sh over a fake /sys) reports to a real
HTTP server with the node's credential; `node show` gets it; `node rename --map` renames by serial."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bootd import compose
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.cli.node import hardware_lines
from bootd.config import from_dict
from bootd.model import Group
from bootd.net.http.app import HttpServer
from bootd.service.checks import Invalid
from bootd.store.sqlite import SqliteNodeStore
from tests.integration.test_overlay_routes import boot

SCRIPT = Path(__file__).resolve().parents[2] / "bootd" / "stage1" / "inventory.sh"


def fake_sys(root: Path, serial: str, mac: str) -> Path:
    dmi = root / "class" / "dmi" / "id"
    dmi.mkdir(parents=True)
    for name, value in (("sys_vendor", "Supermicro"), ("product_name", "SYS-1029P"), ("product_serial", serial),
                        ("chassis_asset_tag", f"AT-{serial}"), ("board_name", "X11DPU"), ("bios_version", "3.4")):
        (dmi / name).write_text(value + "\n")
    nic = root / "class" / "net" / "eno1"
    (nic / "device").mkdir(parents=True)
    (nic / "address").write_text(mac + "\n")
    (nic / "operstate").write_text("up\n")
    (nic / "speed").write_text("25000\n")
    bridge = root / "class" / "net" / "br0"  # not a device: not reported
    bridge.mkdir(parents=True)
    (bridge / "address").write_text("02:00:00:00:00:99\n")
    disk = root / "block" / "nvme0n1"
    (disk / "device").mkdir(parents=True)
    (disk / "queue").mkdir()
    (disk / "size").write_text("3750748848\n")
    (disk / "device" / "model").write_text('Samsung "PM983"\\x\n')
    (disk / "queue" / "rotational").write_text("0\n")
    (root / "block" / "loop0").mkdir()
    return root


def run_inventory(sys_root: Path) -> bytes:
    sh = shutil.which("busybox")
    cmd = [sh, "sh", str(SCRIPT)] if sh else ["sh", str(SCRIPT)]
    return subprocess.run(cmd, env={"BOOTD_SYS": str(sys_root), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          check=True, timeout=30).stdout


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Any]:
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    config = from_dict({
        "server": {"state_dir": str(tmp_path / "state"), "address": "127.0.0.1"},
        "http": {"listen": "127.0.0.1", "port": 0},
        "capsule": {"dir": str(tmp_path / "capsules")},
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
            yield session, services, tmp_path
        finally:
            await server.close()
            await store.close()


async def test_inventory_reported_shown_and_used_to_rename(served: Any) -> None:
    session, services, tmp = served
    a, token_a = await boot(session, "52-54-00-00-0d-01")
    b, token_b = await boot(session, "52-54-00-00-0d-02")
    for name, serial, mac in ((a, "S123A", "52:54:00:00:0d:01"), (b, "S456B", "52:54:00:00:0d:02")):
        report = run_inventory(fake_sys(tmp / f"sys-{name}", serial, mac))
        token = token_a if name == a else token_b
        async with session.post(f"/api/v1/nodes/{name}/inventory", data=report,
                                headers={"X-Bootd-Token": token, "Content-Type": "application/json"}) as r:
            assert r.status == 200, await r.text()
            assert await r.json() == {"node": name, "nics": 1, "disks": 1}
    # Another node's credential, no credential, junk and an oversized body are all refused.
    async with session.post(f"/api/v1/nodes/{a}/inventory", data=b"{}", headers={"X-Bootd-Token": token_b}) as r:
        assert r.status == 403
    async with session.post(f"/api/v1/nodes/{a}/inventory", data=b"[1, 2]", headers={"X-Bootd-Token": token_a}) as r:
        assert r.status == 400 and "JSON object" in await r.text()
    async with session.post(f"/api/v1/nodes/{a}/inventory", data=b"{" + b" " * 70_000 + b"}",
                            headers={"X-Bootd-Token": token_a}) as r:
        assert r.status == 400 and "at most" in await r.text()

    view = await services.nodes.show(a)
    inv = view.inventory
    assert inv["dmi"] == {"vendor": "Supermicro", "product": "SYS-1029P", "serial": "S123A",
                          "asset_tag": "AT-S123A", "board": "X11DPU", "bios": "3.4"}
    assert inv["nics"] == [{"name": "eno1", "mac": "52:54:00:00:0d:01", "link": "up", "speed_mbps": 25000,
                            "driver": ""}]
    assert inv["disks"][0]["size_bytes"] == 3750748848 * 512 and inv["disks"][0]["model"] == 'Samsung "PM983"\\x'
    lines = "\n".join(hardware_lines(inv))
    assert "serial=S123A" in lines and "eno1 52:54:00:00:0d:01 link=up 25000 Mb/s" in lines

    # Rename by serial, by asset tag and by MAC: all checked first, then applied.
    with pytest.raises(Invalid, match="line 2: no node"):
        await services.nodes.rename_map("S123A rack1-u01\nNOPE rack1-u02\n", who="t")
    assert (await services.nodes.show(a)).node.name == a  # nothing applied
    with pytest.raises(Invalid, match="already on line 1"):
        await services.nodes.rename_map("S123A r1\nAT-S456B r1\n", who="t")
    with pytest.raises(Invalid, match="already exists"):
        await services.nodes.rename_map(f"S123A {b}\n", who="t")
    plan = await services.nodes.rename_map("# rack 1\nS123A rack1-u01\nAT-S456B rack1-u02\n", who="t")
    assert plan == [(a, "rack1-u01"), (b, "rack1-u02")]
    renamed = await services.nodes.show("rack1-u01")
    assert renamed.node.mac == "52:54:00:00:0d:01" and renamed.inventory["dmi"]["serial"] == "S123A"
    # The node's credential still works under its new name (it is the node's, not the name's).
    async with session.get("/api/v1/nodes/rack1-u01/env", headers={"X-Bootd-Token": token_a}) as r:
        assert r.status == 200
    assert await services.nodes.rename_map("52:54:00:00:0d:01 rack1-u01\n", who="t") == []
