"""Which modules tools/compile.py builds with mypyc, and whether their builds may be used.

A compiled module shadows its source (Python imports an extension before a .py of the same name), so a build
older than its source would run stale code. The stamp records the sources the build was made from (the listed
modules and every bootd module they import); at import, bootd uses the extensions only when all of those still
match and the build is for this Python, else it loads every module from source (never a mix: the compiled modules
call each other natively). ``BOOTD_PURE=1`` asks for the sources whatever the stamp says.

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
from typing import Any

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
    """A module's file: ``x/y.py``, or ``x/y/__init__.py`` for a package."""
    path = package.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def artifacts(package: Path) -> list[Path]:
    """Every compiled file in the package (any Python's, any module's, listed now or not), for a clean.

    A module dropped from MODULES, or a build left behind by a checkout of another commit, must not survive one.
    """
    return sorted(package.rglob("*.so"))


def stamp(package: Path, modules: Sequence[str]) -> dict[str, Any]:
    """What a build depends on: this Python, and the sources of ``modules``.

    tools/compile.py passes the listed modules and every bootd module they import: compiled code checks the
    types it was compiled against (a config class's fields, say) at run time, so a change there makes the build
    stale too.
    """
    return {"suffix": SUFFIX, "python": sys.version.split()[0],
            "sources": {m: _digest(_source(package, m)) for m in sorted(modules)}}


def write_stamp(package: Path, record: dict[str, Any]) -> None:
    """Written last by tools/compile.py, atomically: a build without it is never used."""
    path = package / STAMP
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def recorded(package: Path) -> dict[str, Any] | None:
    """The stamp of the build in the tree, or None (no build, or a stamp that cannot be read)."""
    try:
        got = json.loads((package / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and isinstance(got.get("sources"), dict) else None


def stamp_matches(package: Path) -> bool:
    """The build in the tree is whole, for this Python, and made from the sources as they are now."""
    record = recorded(package)
    if record is None or not set(MODULES) <= set(record["sources"]):
        return False
    try:
        now = stamp(package, list(record["sources"]))
    except OSError:  # a module the build depended on is gone
        return False
    if any(record.get(key) != value for key, value in now.items()):
        return False
    built = [package / (_LIB + SUFFIX), *(_source(package, m).with_suffix(SUFFIX) for m in MODULES)]
    return all(path.exists() for path in built)


class _Sources:
    """A meta path finder that loads bootd's modules from their .py files, ahead of any extension.

    Installed by choose() in every case. Interpreted, it claims every module; compiled, every module but the
    listed ones. So no stray extension (a module dropped from MODULES, a build from another commit) ever
    shadows its source.
    """

    def __init__(self, package: Path, compiled: bool) -> None:
        self.package = package
        self.compiled = compiled

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("bootd.") or (self.compiled and name in MODULES):
            return None
        source = self.package.parent.joinpath(*name.split(".")).with_suffix(".py")
        if not source.is_file():  # a package, the group library, or no such module: the usual finders decide
            return None
        return importlib.util.spec_from_file_location(name, source)


def choose(package: Path) -> bool:
    """Called once by ``import bootd``: True when the compiled modules will be used."""
    compiled = os.environ.get("BOOTD_PURE", "") in ("", "0") and stamp_matches(package)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Sources)]
    sys.meta_path.insert(0, _Sources(package, compiled))
    return compiled
