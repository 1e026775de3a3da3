"""The compiled DHCP path (tools/compile.py): used only while it matches its sources, never mixed with them.

These run a copy of the package in a child Python, so that changing a source or the stamp there touches nothing the
rest of the suite imports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bootd
from bootd import _native

PACKAGE = Path(bootd.__file__).resolve().parent
TOOLS = PACKAGE.parent / "tools"
PROBE = """
import json, bootd, bootd.service.dhcp, bootd.proto.dhcp.packet, bootd.net.dhcp
print(json.dumps({"compiled": bootd.COMPILED, "package": bootd.__file__,
                  "files": [m.__file__ for m in (bootd.service.dhcp, bootd.proto.dhcp.packet, bootd.net.dhcp)]}))
"""


def probe(root: Path, **env: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BOOTD_PURE": "", **env}, check=True)
    got: dict[str, object] = json.loads(done.stdout)
    assert str(got["package"]).startswith(str(root)), got  # the copy was imported, not the tree under test
    return got


def compiled(got: dict[str, object]) -> bool:
    files = [str(f) for f in got["files"]]  # type: ignore[attr-defined]
    kinds = {f.endswith(_native.SUFFIX) for f in files}
    assert len(kinds) == 1, f"a mix of compiled and source modules: {files}"
    assert got["compiled"] is kinds.pop(), got
    return bool(got["compiled"])


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    if not _native.stamp_matches(PACKAGE):  # a build to copy; this Python may run the sources (BOOTD_PURE=1)
        pytest.skip("bootd's DHCP path is not compiled here (run `make compile`, tools/compile.py)")
    shutil.copytree(PACKAGE, tmp_path / "bootd", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_build_runs_while_it_matches_its_sources(copy: Path) -> None:
    assert compiled(probe(copy))
    assert not compiled(probe(copy, BOOTD_PURE="1"))  # asked for the sources


def test_a_changed_source_runs_every_listed_module_from_source(copy: Path) -> None:
    src = copy / "bootd" / "proto" / "dhcp" / "packet.py"
    src.write_text(src.read_text() + "\n# changed after the build\n")
    assert not compiled(probe(copy))  # the unchanged service/dhcp.py and net/dhcp.py too: never a mix


def test_a_changed_module_the_build_was_checked_against_runs_sources(copy: Path) -> None:
    """config.py is not compiled, but the compiled service reads its classes with the types it had at build."""
    assert "bootd.config" in json.loads((copy / "bootd" / _native.STAMP).read_text())["sources"]
    src = copy / "bootd" / "config.py"
    src.write_text(src.read_text() + "\n# changed after the build\n")
    assert not compiled(probe(copy))


def test_a_stray_extension_never_shadows_its_source(copy: Path) -> None:
    """A module dropped from the list, or a build left by a checkout of another commit: its .so stays unused."""
    stray = copy / "bootd" / f"errors{_native.SUFFIX}"
    stray.write_bytes(b"not an extension")  # loading it would fail the import
    errors = "import bootd.errors as e; print(e.__file__)"
    for env in ({}, {"BOOTD_PURE": "1"}):
        done = subprocess.run([sys.executable, "-c", errors], cwd=copy, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "BOOTD_PURE": "", **env}, check=True)
        assert done.stdout.strip() == str(copy / "bootd" / "errors.py")
    assert compiled(probe(copy))
    # A clean removes it with the rest of the build.
    subprocess.run([sys.executable, str(TOOLS / "compile.py"), "--clean", "--root", str(copy)], check=True,
                   capture_output=True, timeout=120)
    assert not list((copy / "bootd").rglob("*.so")) and not (copy / "bootd" / _native.STAMP).exists()
    assert not compiled(probe(copy))


def test_a_build_for_another_python_or_half_a_build_is_not_used(copy: Path) -> None:
    stamp = copy / "bootd" / _native.STAMP
    recorded = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**recorded, "python": "3.0.0"}))
    assert not compiled(probe(copy))
    stamp.write_text(json.dumps(recorded))
    assert compiled(probe(copy))
    next((copy / "bootd" / "net").glob(f"dhcp{_native.SUFFIX}")).unlink()  # one extension missing
    assert not compiled(probe(copy))
    stamp.unlink()
    assert not _native.stamp_matches(copy / "bootd")


def test_no_build_means_sources(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "bootd", ignore=shutil.ignore_patterns("__pycache__", "*.so", _native.STAMP))
    assert not _native.stamp_matches(tmp_path / "bootd")
    assert not compiled(probe(tmp_path))


def test_a_build_that_does_not_import_is_caught(copy: Path) -> None:
    """tools/compile.py stamps a build only after this check passes, and removes it if not."""
    run = [sys.executable, str(TOOLS / "compile.py"), "--check", "--root", str(copy)]
    assert subprocess.run(run, capture_output=True, timeout=120).returncode == 0
    # The group's library (the code of every listed module) broken: the stamp still matches, only importing tells.
    (copy / "bootd" / f"_native__mypyc{_native.SUFFIX}").write_bytes(b"not an extension")
    done = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "not used" in done.stderr, done.stderr
