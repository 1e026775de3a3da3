"""Commissioning: what a node's stage one finds (DMI, CPUs, memory, NICs, disks), kept per node.

The stage one reports it once per boot with the node's own credential
(bootd/stage1/inventory.sh); ``bootd node show``, the admin API and the
status page show it, and ``bootd node rename --map`` renames nodes by the
serial number or MAC that racks are labelled with.  A node's report is data
from the wire: it is bounded (size, list lengths, string lengths), only known
keys are kept, and it is stored beside the registry as one private JSON file
per node, written atomically, keyed by MAC so a rename keeps it.  It is not in
the database: it is large, changes once per boot, and nothing decides on it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bootd.durable import replace_private
from bootd.errors import BootdError

MAX_BYTES = 64 * 1024
MAX_ITEMS = 64
MAX_TEXT = 200
DMI_KEYS = ("vendor", "product", "serial", "asset_tag", "board", "bios")
NIC_KEYS = ("name", "mac", "link", "speed_mbps", "driver")
DISK_KEYS = ("name", "size_bytes", "model", "rotational")


class BadInventory(BootdError):
    """A report that is not the shape inventory.sh sends: refused, nothing stored."""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadInventory(f"expected text, got {type(value).__name__}")
    return "".join(c for c in str(value) if c.isprintable())[:MAX_TEXT].strip()


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadInventory("expected a number, got true/false")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise BadInventory(f"expected a number, got {value!r}"[:120]) from None
    if not 0 <= n < 2**63:
        raise BadInventory(f"{n} is out of range")
    return n


def _items(value: Any, keys: tuple[str, ...], numbers: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadInventory(f"{what}: expected a list")
    out = []
    for item in value[:MAX_ITEMS]:
        if not isinstance(item, dict):
            raise BadInventory(f"{what}: expected objects")
        out.append({k: (_int(item.get(k)) if k in numbers else _text(item.get(k))) for k in keys if k in item})
    return out


def clean(report: Any) -> dict[str, Any]:
    """The bounded, known-keys copy of a node's report that bootd keeps."""
    if not isinstance(report, dict):
        raise BadInventory("the inventory must be a JSON object")
    dmi = report.get("dmi") or {}
    if not isinstance(dmi, dict):
        raise BadInventory("dmi: expected an object")
    return {
        "dmi": {k: _text(dmi.get(k)) for k in DMI_KEYS if dmi.get(k) not in (None, "")},
        "cpus": _int(report.get("cpus")),
        "cpu_model": _text(report.get("cpu_model")),
        "memory_kb": _int(report.get("memory_kb")),
        "nics": _items(report.get("nics"), NIC_KEYS, ("speed_mbps",), "nics"),
        "disks": _items(report.get("disks"), DISK_KEYS, ("size_bytes",), "disks"),
        "kernel": _text(report.get("kernel")),
    }


class InventoryStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, mac: str) -> Path:
        return self.root / (mac.replace(":", "-") + ".json")

    def _write(self, mac: str, data: dict[str, Any]) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_private(self._path(mac), json.dumps(data, sort_keys=True).encode())

    async def put(self, mac: str, raw: bytes, now: float) -> dict[str, Any]:
        if len(raw) > MAX_BYTES:
            raise BadInventory(f"the inventory is {len(raw)} bytes; at most {MAX_BYTES}")
        try:
            report = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadInventory("the inventory must be JSON") from None
        data = clean(report) | {"reported": now}
        await asyncio.to_thread(self._write, mac, data)
        return data

    def get_sync(self, mac: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._path(mac).read_text())
            return data
        except (OSError, ValueError):
            return None

    async def get(self, mac: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_sync, mac)
