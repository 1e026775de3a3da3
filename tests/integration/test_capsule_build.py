"""``bootd capsule build`` with real mmdebstrap against this machine's Debian mirror.

The package cache is shared across runs (``$BOOTD_BUILD_CACHE``, default /var/tmp/bootd-build-cache),
so only the first run on a machine downloads the packages (about 30 MB for the small recipe). Builds
are the slow part (30-90 s each on 2 busy cores), so one store and one recipe serve the module:
build, rebuild unchanged, add a package, then the failures, which each leave the store as it was.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootd.capsule.export import write_archive
from bootd.capsule.objects import CapsuleStore
from tests.conftest import PYTHON, ROOT, write_config

CACHE = Path(os.environ.get("BOOTD_BUILD_CACHE", "/var/tmp/bootd-build-cache"))
RECIPE = '''# The smallest useful recipe: dpkg's essential set, one file, one command.
suite = "bookworm"
variant = "essential"
packages = [{packages}]
commands = [{commands}]
{extra}
[[files]]
src = "hello.sh"
dest = "/usr/local/bin/hello-bootd"
mode = "0750"
'''

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap root mode needs root")


def cli(cfg: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "bootd", "-c", str(cfg), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@dataclass
class Built:
    cfg: Path
    store: CapsuleStore
    dir: Path
    first: dict[str, object]

    def recipe(self, name: str, packages: str = "", extra: str = "",
               commands: str = '"echo built-by-bootd > /etc/built-by-recipe"') -> Path:
        path = self.dir / f"{name}.toml"
        path.write_text(RECIPE.format(packages=packages, extra=extra, commands=commands))
        return path

    def tree(self, vid: str) -> dict[str, tarfile.TarInfo]:
        buf = io.BytesIO()
        write_archive(self.store, vid, buf)
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tf:
            return {m.name.removeprefix("./"): m for m in tf.getmembers()}

    def read(self, vid: str, path: str) -> bytes:
        buf = io.BytesIO()
        write_archive(self.store, vid, buf)
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tf:
            f = tf.extractfile("./" + path)
            assert f is not None
            return f.read()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    if shutil.which("mmdebstrap") is None:
        pytest.fail("mmdebstrap is not installed; run tools/setup.sh (make test does)")
    d = tmp_path_factory.mktemp("build")
    (d / "hello.sh").write_text("#!/bin/sh\necho hello from a recipe\n")
    cfg = write_config(d / "bootd.toml", {
        "server": {"state_dir": str(d / "state")},
        "capsule": {"dir": str(d / "capsules"), "build_cache": str(CACHE)},
    })
    (d / "state").mkdir()
    b = Built(cfg, CapsuleStore(d / "capsules"), d, {})
    r = cli(cfg, "capsule", "build", "mini", "--recipe", str(b.recipe("mini")), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    b.first = json.loads(r.stdout)
    yield b


def test_recipe_builds_imports_and_is_clean(built: Built) -> None:
    vid = str(built.first["version"])
    assert built.store.resolve("mini") == vid
    tree = built.tree(vid)
    assert tree["usr/local/bin/hello-bootd"].mode == 0o750
    assert built.read(vid, "etc/built-by-recipe") == b"built-by-bootd\n"
    if "etc/machine-id" in tree:  # systemd's (not in the essential set): empty, as Debian ships it
        assert built.read(vid, "etc/machine-id") == b""
    master = Path("/etc/resolv.conf").read_bytes()
    assert "etc/resolv.conf" not in tree or built.read(vid, "etc/resolv.conf") != master
    assert not [n for n in tree if n.startswith("var/lib/apt/lists/") and n != "var/lib/apt/lists/partial"
                and n != "var/lib/apt/lists/lock"]
    assert not [n for n in tree if n.endswith(".deb") or n.endswith("pkgcache.bin")]
    assert "etc/dpkg/dpkg.cfg.d/99mmdebstrap" not in tree
    hygiene = built.first["hygiene"]
    assert isinstance(hygiene, dict)
    assert any(r["path"] == "/etc/resolv.conf" for r in hygiene["removed"])
    hist = json.loads(cli(built.cfg, "capsule", "history", "mini", "--json").stdout)
    assert [(h["version"], h["origin"]) for h in hist] == [(vid, "build")]
    assert hist[0]["detail"].endswith("mini.toml") and hist[0]["new_bytes"] > 0
    # The cache now holds the packages, so the next builds do not download them again.
    assert len(list((CACHE / "archives").glob("*.deb"))) >= 40
    assert list((CACHE / "lists").glob("*_Packages*"))


def test_rebuild_unchanged_gives_the_same_version(built: Built) -> None:
    r = cli(built.cfg, "capsule", "build", "mini", "--recipe", str(built.recipe("mini")), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(r.stdout)
    # SOURCE_DATE_EPOCH (the recipe's epoch) makes mmdebstrap's tar byte-identical for the same
    # mirror state, so the version id is the same and nothing new is stored.
    assert again["version"] == built.first["version"] and again["new_bytes"] == 0
    assert len(built.store.history("mini")) == 1


def test_adding_one_package_stores_only_the_changed_chunks(built: Built) -> None:
    r = cli(built.cfg, "capsule", "build", "mini", "--recipe", str(built.recipe("mini", '"tree"')), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    plus = json.loads(r.stdout)
    assert plus["version"] != built.first["version"]
    assert "usr/bin/tree" in built.tree(plus["version"])
    last = built.store.history("mini")[-1]
    share = last.new_bytes / last.stored_bytes
    print(f"\n+tree: {last.new_bytes} new bytes of {last.stored_bytes} stored ({100 * share:.2f}%), "
          f"{plus['new_chunks']} of {plus['chunks']} chunks")
    assert last.new_bytes > 0 and share < 0.15 and plus["new_chunks"] < plus["chunks"] / 4
    # Back to the first version for the tests that follow.
    assert cli(built.cfg, "capsule", "rollback", "mini", str(built.first["version"])).returncode == 0


@pytest.mark.parametrize(("case", "recipe", "says"), [
    # Found in the cached package lists before mmdebstrap runs (mmdebstrap's own "Unable to locate
    # package" is mapped the same way: tests/unit/capsule/test_recipe.py).
    ("missing-package", {"packages": '"bootd-no-such-package"'},
     "at step 'check packages': package not found: bootd-no-such-package"),
    ("unreachable-mirror", {"extra": 'mirror = "http://127.0.0.1:9/debian"'},
     "mirror unreachable (http://127.0.0.1:9/debian)"),
    ("failing-command", {"commands": '"echo about to fail; exit 7"'},
     "at step 'command 1: echo about to fail; exit 7'"),
])
def test_bad_builds_fail_clearly_and_publish_nothing(built: Built, case: str, recipe: dict[str, str],
                                                     says: str) -> None:
    before = (built.store.names(), built.store.versions(), built.store.history("mini"))
    path = built.recipe(case, **recipe)
    leftovers = set(Path("/var/tmp").glob("bootd-build-*"))
    r = cli(built.cfg, "capsule", "build", "mini", "--recipe", str(path))
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("bootd: error: build of mini failed at step ") and says in err, r.stderr[-2000:]
    assert err.endswith("nothing was published")
    assert (built.store.names(), built.store.versions(), built.store.history("mini")) == before
    assert set(Path("/var/tmp").glob("bootd-build-*")) <= leftovers


def test_malformed_recipe_names_file_key_and_valid_values(built: Built) -> None:
    bad = built.dir / "bad.toml"
    bad.write_text('suite = "bookworm"\nvariant = "huge"\n')
    r = cli(built.cfg, "capsule", "build", "mini", "--recipe", str(bad), timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"bootd: error: {bad}: variant: 'huge' is not valid; expected one of: essential, "
                                "apt, required, minbase, buildd, important, debootstrap, standard")
