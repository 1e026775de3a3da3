"""``bootd overlay ...`` as an operator runs it: a real config file, registry, editor and tar.

Most calls go through ``bootd.cli.main`` in this process (the same parser and handlers, ten
times faster than a new interpreter per call on a loaded machine); the first runs ``python -m
bootd`` as a subprocess to show the installed entry point works end to end.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootd.cli import main
from bootd.store.sqlite import SqliteRepo
from tests.conftest import run_cli as run_subprocess
from tests.conftest import write_config


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    def run(*args: str, config: Path, check: bool = False, env: dict[str, str] | None = None) -> Result:
        capsys.readouterr()
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            rc = main(["-c", str(config), *args])
        out = capsys.readouterr()
        if check and rc != 0:
            raise AssertionError(f"bootd {' '.join(args)} failed ({rc}):\n{out.out}\n{out.err}")
        return Result(rc, out.out, out.err)

    return run


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    keys = tmp_path / "authorized_keys"
    keys.write_text("# master keys\nssh-ed25519 AAAAC3NzaTEST admin@master\n")
    return write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "10.9.0.1"},
        "overlay": {"authorized_keys": str(keys), "uid_min": 0, "uid_max": 0},
    })


def editor(tmp_path: Path, content: str) -> dict[str, str]:
    """A scripted $EDITOR: writes ``content`` into the file it is given."""
    script = tmp_path / "editor.py"
    script.write_text("import sys, os\nopen(sys.argv[1], 'w').write(os.environ['NEW_TEXT'])\n")
    return {"EDITOR": f"{sys.executable} {script}", "VISUAL": "", "NEW_TEXT": content}


def test_create_edit_export_import_delete(tmp_path: Path, cfg: Path, run_cli: Callable[..., Result]) -> None:
    r = run_subprocess("overlay", "create", "motd", "--kind", "runtime", "--description", "login banner",
                       config=cfg, check=True)
    assert "created overlay motd (runtime)" in r.stdout
    assert run_cli("overlay", "create", "motd", config=cfg).returncode == 1

    env = editor(tmp_path, "Welcome to {{ node.name }} in {{ vars.site }}\n")
    r = run_cli("overlay", "edit", "motd", "etc/motd.j2", config=cfg, env=env, check=True)
    assert "saved overlay motd (1 files)" in r.stdout
    assert run_cli("overlay", "show", "motd", "etc/motd.j2", config=cfg, check=True).stdout.startswith("Welcome to")

    # A broken edit is refused with file and line; the old template stays, the edit is kept for the admin.
    r = run_cli("overlay", "edit", "motd", "etc/motd.j2", config=cfg,
                env=editor(tmp_path, "line one\n{% for x in %}\n"))
    assert r.returncode == 1 and "overlay motd:etc/motd.j2:2: syntax error" in r.stderr, r.stderr
    assert "your edit is kept in" in r.stderr
    kept = Path(r.stderr.split("your edit is kept in ")[1].strip())
    assert kept.read_text() == "line one\n{% for x in %}\n"
    assert run_cli("overlay", "show", "motd", "etc/motd.j2", config=cfg, check=True).stdout.startswith("Welcome")
    r = run_cli("overlay", "edit", "motd", config=cfg, env=editor(tmp_path, '{"kind": "weekly"}'))
    assert r.returncode == 1 and "kind 'weekly' is not valid" in r.stderr

    shown = json.loads(run_cli("overlay", "show", "motd", "--json", config=cfg, check=True).stdout)
    assert shown["kind"] == "runtime" and shown["entries"][0]["path"] == "/etc/motd"

    dest = tmp_path / "motd.tar"
    run_cli("overlay", "export", "motd", str(dest), config=cfg, check=True)
    with tarfile.open(dest) as tf:
        assert sorted(tf.getnames()) == ["files/etc/motd.j2", "overlay.json"]
    assert dest.stat().st_mode & 0o777 == 0o600
    run_cli("overlay", "import", "motd2", str(dest), config=cfg, check=True)
    again = json.loads(run_cli("overlay", "show", "motd2", "--json", config=cfg, check=True).stdout)
    assert again["digest"] == shown["digest"]

    listing = json.loads(run_cli("overlay", "list", "--json", config=cfg, check=True).stdout)
    by_name = {x["name"]: x for x in listing}
    assert by_name["motd"]["source"] == "site" and by_name["hosts"]["source"] == "builtin"
    table = run_cli("overlay", "list", config=cfg, check=True).stdout
    assert table.splitlines()[0].split() == ["NAME", "KIND", "SECRET", "SOURCE", "FILES", "DESCRIPTION"]

    run_cli("overlay", "delete", "motd2", config=cfg, check=True)
    r = run_cli("overlay", "delete", "hosts", config=cfg)
    assert r.returncode == 1 and "shipped with bootd" in r.stderr
    r = run_cli("overlay", "show", "motd2", config=cfg)
    assert r.returncode == 1 and "no overlay 'motd2'" in r.stderr


def test_edit_of_a_shipped_overlay_makes_a_site_copy(tmp_path: Path, cfg: Path,
                                                    run_cli: Callable[..., Result]) -> None:
    env = editor(tmp_path, "{{ node.name }}.example.org\n")
    run_cli("overlay", "edit", "hostname", "etc/hostname.j2", config=cfg, env=env, check=True)
    listing = {x["name"]: x for x in json.loads(run_cli("overlay", "list", "--json", config=cfg, check=True).stdout)}
    assert listing["hostname"]["source"] == "site"
    overlays = Path(json.loads(run_cli("check-config", "--json", config=cfg, check=True).stdout)["overlay"]["dir"])
    assert overlays.stat().st_mode & 0o777 == 0o700
    assert not [p for p in overlays.iterdir() if p.name.startswith("edit-")]  # work copy removed


def test_render_a_node_from_the_registry(tmp_path: Path, cfg: Path, run_cli: Callable[..., Result]) -> None:
    state = tmp_path / "state"
    repo = SqliteRepo(state / "bootd.sqlite")
    now = time.time()
    repo.add_node("52:54:00:aa:00:01", "n0001", group="default", now=now, ip="10.9.0.11")
    repo.add_node("52:54:00:aa:00:02", "n0002", group="default", now=now, ip="10.9.0.12")
    repo.set_vars("n0001", {"site": "lab"})
    repo.close()
    env = editor(tmp_path, "site={{ vars.site }}\n")
    run_cli("overlay", "create", "site", config=cfg, check=True)
    run_cli("overlay", "edit", "site", "etc/site.j2", config=cfg, env=env, check=True)

    r = run_cli("overlay", "render", "n0001", "--contents", config=cfg, check=True)
    assert "10.9.0.12\tn0002" in r.stdout and "/etc/ssh/ssh_host_ed25519_key" in r.stdout
    assert "ssh-ed25519 AAAAC3NzaTEST admin@master" in r.stdout
    assert "(secret: made per node by bootd serve)" in r.stdout  # no secret reaches the admin's terminal

    data = json.loads(run_cli("overlay", "render", "n0001", "hostname", "site", "--json", config=cfg,
                              check=True).stdout)
    assert [f["path"] for f in data["files"]] == ["/etc/hostname", "/etc/site"] and data["secret"] is False
    out = tmp_path / "n0001.tar"
    r = run_cli("overlay", "render", "n0001", "--kind", "runtime", "--out", str(out), config=cfg, check=True)
    with tarfile.open(fileobj=io.BytesIO(out.read_bytes())) as tf:
        assert "etc/hosts" in tf.getnames() and "etc/hostname" not in tf.getnames()
    other = json.loads(run_cli("overlay", "render", "n0002", "hostname", "--json", config=cfg, check=True).stdout)
    assert other["etag"] != data["etag"] and other["files"][0]["size"] == len("n0002\n")

    r = run_cli("overlay", "render", "n0002", "site", config=cfg)  # n0002 has no "site" variable
    assert r.returncode == 1 and "node n0002: overlay site:etc/site.j2:1: undefined" in r.stderr, r.stderr
    assert "'site'" in r.stderr
    r = run_cli("overlay", "render", "n0404", config=cfg)
    assert r.returncode == 1 and "no node 'n0404'" in r.stderr
    assert os.path.exists(state / "bootd.sqlite")
