#!/usr/bin/env python3
"""Compile bootd's DHCP path with mypyc, in place: the same typed sources, run as C extension modules.

Why: at Kea's rate the DHCP path is CPU-bound in the interpreter (bench/dhcp, issue 20); mypyc (part of mypy, which
already checks these sources) turns the typed modules below into C extensions that do the same work in about two
thirds of the CPU. There is no second code base: the .py files stay the truth, and bootd runs them as they are
(`bootd.COMPILED` is False) whenever the extensions are missing, built for another Python, or older than their
sources or the bootd modules those import (bootd/__init__.py checks the stamp this writes). This tool also rebuilds
a build made by another mypy.

Usage: .venv/bin/python tools/compile.py [--force] [--clean] [--check] [--root DIR]
  (tools/setup.sh runs it: `make setup`, `make test`, `make demo` and `make cluster` compile first;
   nothing is rebuilt while the stamp matches the sources. ``--root``: the directory that holds the bootd package
   to compile, e.g. an installed one's site-packages (README "Install"); the checkout's by default.)
"""

from __future__ import annotations

import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
_native: ModuleType  # bootd._native of the package compiled (imported in main, from --root)


def clean(root: Path) -> None:
    """Remove the extensions and the stamp (bootd then runs its sources)."""
    (root / "bootd" / _native.STAMP).unlink(missing_ok=True)  # first: a build without its stamp is never used
    for path in _native.artifacts(root / "bootd"):
        path.unlink()


def depends(root: Path) -> list[str]:
    """The listed modules and every bootd module they import, directly or not (type-only imports too: mypyc
    compiles against those types)."""
    package = root / "bootd"
    seen: set[str] = set()
    todo = list(_native.MODULES)
    while todo:
        name = todo.pop()
        path = _native._source(package, name)
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    base = ".".join(parts + ([base] if base else []))
                todo.append(base)
                todo += [f"{base}.{alias.name}" for alias in node.names]  # submodules, when they are files
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages run on import
    return sorted(m for m in seen if m == "bootd" or m.startswith("bootd."))


def mypy_version() -> str:
    from mypy.version import __version__

    return __version__


def build(root: Path) -> None:
    """Build every listed module in one mypyc group (its shared library is bootd/_native__mypyc*.so)."""
    from mypyc.build import mypycify
    from setuptools import Distribution

    os.chdir(root)
    sources = [str(Path(*m.split(".")).with_suffix(".py")) for m in _native.MODULES]
    with tempfile.TemporaryDirectory(prefix="bootd-mypyc-") as tmp:
        # mypyc writes its C into target_dir; setuptools builds from there. Neither touches the tree but for the .so.
        # The checkout's mypy settings (which libraries have no types), also for a package compiled elsewhere.
        config = ["--config-file", str(ROOT / "pyproject.toml")]
        modules = mypycify(config + sources, opt_level="3", debug_level="1", group_name=_native.GROUP,
                           target_dir=tmp)
        # A bare Distribution: setup() would read pyproject.toml, which this build needs nothing from.
        dist = Distribution({"name": "bootd-native", "ext_modules": modules})
        cmd = dist.get_command_obj("build_ext")
        cmd.inplace = True  # type: ignore[attr-defined]
        cmd.build_temp = os.path.join(tmp, "temp")  # type: ignore[attr-defined]
        cmd.build_lib = os.path.join(tmp, "lib")  # type: ignore[attr-defined]
        dist.run_command("build_ext")


# Run in a child Python once the stamp is written: the build is used only if every listed module imports from it.
CHECK = """
import importlib, sys, bootd
from bootd import _native
assert bootd.COMPILED, "bootd does not take the build"
for name in _native.MODULES:
    module = importlib.import_module(name)
    assert module.__file__.endswith(_native.SUFFIX), f"{name} imported from {module.__file__}"
"""


def check(root: Path) -> str:
    """Why the build in the tree is not used whole by a new Python ('' when it is)."""
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "BOOTD_PURE": ""})
    if not done.returncode:
        return ""
    return done.stderr[-3000:] or f"the check exited {done.returncode}"


def up_to_date(root: Path) -> bool:
    record = _native.recorded(root / "bootd")
    return _native.stamp_matches(root / "bootd") and record is not None and record.get("mypy") == mypy_version()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches the sources")
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules and stop")
    ap.add_argument("--check", action="store_true", help="check that bootd uses the build in the tree, and stop")
    ap.add_argument("--root", type=Path, default=ROOT, help="the directory holding the bootd package to compile")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # the build itself, in a child
    args = ap.parse_args()
    root = args.root.resolve()
    if not (root / "bootd" / "_native.py").is_file():
        print(f"compile: {root} holds no bootd package (bootd/_native.py)", file=sys.stderr)
        return 2
    global _native
    sys.path.insert(0, str(root))
    import bootd._native as native  # the list of modules and the stamp live with the package compiled
    _native = native
    if args.build:
        build(root)
        return 0
    package = root / "bootd"
    if args.check:
        failed = check(root)
        print(f"compile: the build is not used: {failed}" if failed else "compile: the build is used", file=sys.stderr)
        return 1 if failed else 0
    if args.clean:
        clean(root)
        print("compile: removed the compiled modules; bootd runs its sources")
        return 0
    if not args.force and up_to_date(root):
        print(f"compile: up to date ({len(_native.MODULES)} modules)")
        return 0
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        print("compile: no C compiler (gcc): bootd runs its sources, slower on the DHCP path", file=sys.stderr)
        return 1
    print(f"compile: mypyc {len(_native.MODULES)} modules of the DHCP path (about a minute)")
    start = time.monotonic()
    clean(root)  # a half-built set must never be mistaken for a whole one: the stamp is written last
    # Taken before the build: an edit made while it runs must not be stamped as built (checked again after it).
    record = {**_native.stamp(package, depends(root)), "mypy": mypy_version()}
    # mypyc and gcc print a line per step: kept in a log, shown when the build fails.
    with tempfile.NamedTemporaryFile("w+", prefix="bootd-compile-", suffix=".log") as log:
        done = subprocess.run([sys.executable, __file__, "--build", "--root", str(root)], stdout=log,
                              stderr=subprocess.STDOUT)
        if done.returncode:
            log.seek(0)
            sys.stderr.write(log.read()[-6000:])
            clean(root)
            print(f"compile: mypyc failed (exit {done.returncode}, its output above): bootd runs its sources",
                  file=sys.stderr)
            return 1
    if _native.stamp(package, list(record["sources"])) != {k: v for k, v in record.items() if k != "mypy"}:
        clean(root)
        print("compile: sources changed during the build; run it again", file=sys.stderr)
        return 1
    _native.write_stamp(package, record)
    failed = check(root)
    if failed:
        clean(root)
        sys.stderr.write(failed)
        print("compile: the build does not import (above): removed; bootd runs its sources", file=sys.stderr)
        return 1
    print(f"compile: done in {time.monotonic() - start:.0f}s ({len(record['sources'])} sources stamped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
