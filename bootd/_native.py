"""Which modules tools/compile.py builds with mypyc, and whether their builds may be used.

A compiled module shadows its source (Python imports an extension before a .py of the same name), so a build
older than its source would run stale code. The stamp records the sources the build was made from; at import,
bootd uses the extensions only when every listed source still matches and the build is for this Python, else it
loads all of them from source (never a mix: the compiled modules call each other natively). ``BOOTD_PURE=1``
asks for the sources whatever the stamp says.

Nothing here may import more than the standard library: it runs in ``import bootd``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The DHCP path, what bench/dhcp's profile spends its time in, and what compiles without changes of meaning.
MODULES = (
    "bootd.model",
    "bootd.proto.dhcp.client_state",
    "bootd.proto.dhcp.leases",
    "bootd.proto.dhcp.loadbalance",
    "bootd.proto.dhcp.options",
    "bootd.proto.dhcp.packet",
    "bootd.proto.dhcp.pxe",
    "bootd.proto.dhcp.reply",
    "bootd.service.dhcp",
    "bootd.net.dhcp",
    "bootd.service.registry",
    "bootd.store.sqlite",
)
GROUP = "bootd._native"  # mypyc's shared library for the group: bootd/_native__mypyc<EXT_SUFFIX>
_LIB = GROUP.rsplit(".", 1)[1] + "__mypyc"
STAMP = "_native.json"
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _source(package: Path, module: str) -> Path:
    return package.parent.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(package: Path) -> list[Path]:
    """The compiled files now in the tree (any Python's), for a clean."""
    found = list(package.glob(f"{_LIB}.*.so"))
    for module in MODULES:
        src = _source(package, module)
        found += src.parent.glob(f"{src.stem}.*.so")
    return found


def stamp(package: Path) -> dict[str, object]:
    return {"suffix": SUFFIX, "python": sys.version.split()[0],
            "sources": {m: _digest(_source(package, m)) for m in MODULES}}


def write_stamp(package: Path) -> None:
    """Written last by tools/compile.py, atomically: a build without it is never used."""
    path = package / STAMP
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(stamp(package), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def stamp_matches(package: Path) -> bool:
    """The build in the tree is whole, for this Python, and made from the sources as they are now."""
    try:
        if json.loads((package / STAMP).read_text()) != stamp(package):
            return False
    except (OSError, ValueError):
        return False
    built = [package / (_LIB + SUFFIX), *(_source(package, m).with_suffix(SUFFIX) for m in MODULES)]
    return all(path.exists() for path in built)


class _Sources:
    """A meta path finder that loads the listed modules from their .py files, ahead of any extension."""

    def __init__(self, package: Path) -> None:
        self.package = package

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in MODULES:
            return None
        return importlib.util.spec_from_file_location(name, _source(self.package, name))


def choose(package: Path) -> bool:
    """Called once by ``import bootd``: True when the compiled modules will be used."""
    if os.environ.get("BOOTD_PURE", "") not in ("", "0") or not stamp_matches(package):
        if not any(isinstance(f, _Sources) for f in sys.meta_path):
            sys.meta_path.insert(0, _Sources(package))
        return False
    return True
