"""``bootd capsule ...`` as an operator runs it (real subprocess, real config file)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from bootd.capsule.objects import CapsuleStore
from tests.conftest import run_cli, write_config
from tests.unit.capsule.trees import make_tree


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    return write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1"},
        "capsule": {"dir": str(tmp_path / "capsules"), "chunk_min": 16384, "chunk_avg": 65536,
                    "chunk_max": 262144},
    })


def test_capsule_cli_lifecycle(tmp_path: Path, cfg: Path) -> None:
    tree = make_tree(tmp_path / "tree", files=40)
    (tree / "boot").mkdir()
    (tree / "boot" / "vmlinuz-6.1.0-1").write_bytes(b"kernel")

    r = run_cli("capsule", "import", "base", str(tree), "--json", config=cfg, check=True)
    result = json.loads(r.stdout)
    vid = result["version"]
    assert len(vid) == 64 and result["kernel"]["path"] == "/boot/vmlinuz-6.1.0-1"

    r = run_cli("capsule", "import", "base", str(tree), config=cfg, check=True)
    assert vid in r.stdout and "unchanged" in r.stdout

    listing = json.loads(run_cli("capsule", "list", "--json", config=cfg, check=True).stdout)
    assert [(x["name"], x["version"]) for x in listing] == [("base", vid)]
    table = run_cli("capsule", "list", config=cfg, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "VERSION", "SIZE"] and vid[:12] in table

    show = json.loads(run_cli("capsule", "show", "base", "--json", config=cfg, check=True).stdout)
    assert show["version"] == vid and show["chunks"] == len(show["chunk_list"]) > 3
    by_prefix = json.loads(run_cli("capsule", "show", vid[:10], "--json", config=cfg, check=True).stdout)
    assert by_prefix["version"] == vid
    assert "version:" in run_cli("capsule", "show", "base", config=cfg, check=True).stdout

    ok = run_cli("capsule", "verify", "base", config=cfg)
    assert ok.returncode == 0 and "OK" in ok.stdout

    dest = tmp_path / "out.tar"
    run_cli("capsule", "export", "base", str(dest), config=cfg, check=True)
    with tarfile.open(dest) as tf:
        assert "./boot/vmlinuz-6.1.0-1" in tf.getnames()

    # Corrupt one chunk: verify names it and fails.
    store = CapsuleStore(tmp_path / "capsules")
    bad = show["chunk_list"][2]["sha256"]
    p = store.chunk_path(bad)
    p.write_bytes(p.read_bytes()[:-1] + b"\0")
    r = run_cli("capsule", "verify", "base", "--json", config=cfg)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert not report["ok"] and [b["sha256"] for b in report["bad"]] == [bad]
    r = run_cli("capsule", "verify", "base", config=cfg)
    assert r.returncode == 1 and bad in r.stdout and r.stderr.startswith("bootd: error:")

    r = run_cli("capsule", "delete", "base", config=cfg, check=True)
    gc = json.loads(run_cli("capsule", "gc", "--json", config=cfg, check=True).stdout)
    assert gc["removed_manifests"] == 1 and gc["removed_chunks"] == len({c["sha256"] for c in show["chunk_list"]})
    assert json.loads(run_cli("capsule", "list", "--json", config=cfg, check=True).stdout) == []


def test_capsule_cli_errors(tmp_path: Path, cfg: Path) -> None:
    r = run_cli("capsule", "import", "x", str(tmp_path / "missing"), config=cfg)
    assert r.returncode == 1 and r.stderr.startswith("bootd: error:") and "does not exist" in r.stderr
    r = run_cli("capsule", "show", "nope", config=cfg)
    assert r.returncode == 1 and "no capsule named 'nope'" in r.stderr
    r = run_cli("capsule", "delete", "nope", config=cfg)
    assert r.returncode == 1
    r = run_cli("capsule", "import", "x", config=cfg)
    assert r.returncode == 2
