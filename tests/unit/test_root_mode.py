"""The root mode in the iPXE script: boot.root from the config, the group and the node; the squashfs image
built at first use in the background (the node waits, then gets bootd.image=), and refusals that say why."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from bootd.capsule.imagelist import decode_image_list
from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.config import BootConfig, CapsuleConfig, Config, ServerConfig, load
from bootd.errors import ConfigError
from bootd.model import Group
from bootd.store.memory import memory_store

MAC = "52:54:00:00:00:01"


def test_config_root_mode_is_checked(tmp_path: Path) -> None:
    conf = tmp_path / "bootd.toml"
    conf.write_text('[boot]\nroot = "ramdisk"\n')
    with pytest.raises(ConfigError) as info:
        load(conf)
    text = str(info.value)
    assert str(conf) in text and "boot.root" in text and "tmpfs, squashfs" in text


@pytest.mark.skipif(shutil.which("mksquashfs") is None or os.geteuid() != 0, reason="needs squashfs-tools and root")
async def test_squashfs_node_waits_for_the_build_then_gets_the_image(tmp_path: Path) -> None:
    from bootd.compose import services

    tree = tmp_path / "tree"
    (tree / "sbin").mkdir(parents=True)
    (tree / "sbin" / "init").write_bytes(os.urandom(200_000))
    config = Config(server=ServerConfig(state_dir=tmp_path), boot=BootConfig(root="tmpfs"),
                    capsule=CapsuleConfig(dir=tmp_path / "capsules", image_chunk=64 * 1024))
    vid = import_capsule(CapsuleStore(config.capsule.dir), "c", tree).version
    store, svc = services(config, store=memory_store())
    svc.credentials.load()
    await store.put_group(Group("default", "c", "", "", {"boot.root": "squashfs"}))
    await store.add_node(MAC, "n1", group="default", now=1.0)
    await store.add_node("52:54:00:00:00:02", "n2", group="default", now=1.0)
    await store.set_vars("n2", {"boot.root": "tmpfs"})  # the node's own value wins over its group's

    first = await svc.boot.script(MAC, "http://b:8080", 2.0)
    assert "building the squashfs image of capsule" in first.text and "bootd.capsule=" not in first.text
    plain = await svc.boot.script("52:54:00:00:00:02", "http://b:8080", 2.0)
    assert f"bootd.capsule={vid}" in plain.text and "bootd.root" not in plain.text
    for _ in range(600):
        if not svc.boot._image_builds:
            break
        await asyncio.sleep(0.05)
    again = await svc.boot.script(MAC, "http://b:8080", 3.0)
    image = svc.boot.images.cached(vid)  # type: ignore[union-attr]
    assert image is not None
    assert f"bootd.capsule={vid}" in again.text and f"bootd.root=squashfs bootd.image={image}" in again.text
    listing = decode_image_list(CapsuleStore(config.capsule.dir).chunk_path(image).read_bytes(), image)
    assert listing.version == vid

    await store.set_vars("n2", {"boot.root": "zram"})
    bad = await svc.boot.script("52:54:00:00:00:02", "http://b:8080", 4.0)
    assert "boot.root='zram'" in bad.text and "tmpfs, squashfs" in bad.text and "bootd.capsule" not in bad.text


def test_boot_root_variable_is_checked_when_set() -> None:
    """A node's or group's boot.root (both go through NodeChange) and a bulk file's are refused at once."""
    from bootd.service.bulk import parse_bulk
    from bootd.service.checks import Invalid
    from bootd.service.nodes import NodeChange

    assert NodeChange.parse({"vars": {"boot.root": "squashfs"}}).values == {"boot.root": "squashfs"}
    with pytest.raises(Invalid, match=r"boot\.root='zram' is not a root mode; expected one of: tmpfs, squashfs"):
        NodeChange.parse({"vars": {"boot.root": "zram"}})
    with pytest.raises(Invalid, match=r"boot\.root='ram'"):
        parse_bulk([{"name": "n1", "mac": "52:54:00:00:00:09", "vars": {"boot.root": "ram"}}], "default")
