"""``bootd capsule exec/shell/history/rollback`` and image imports, as an operator runs them.

The capsule is the static busybox root (a second to build), so these tests exercise the
namespaces, mounts, publishing and history, not a distribution.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootd.capsule.export import write_archive
from bootd.capsule.objects import CapsuleStore
from bootd.lab.sample import make_busybox_root
from tests.conftest import PYTHON, ROOT, run_cli, write_config
from tests.unit.capsule.images import EXPECTED, LAYERS, docker_files, oci_files, write_tar

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="exec needs root (namespaces, chroot)")


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "state").mkdir()
    return write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(tmp_path / "state")},
        "capsule": {"dir": str(tmp_path / "capsules"), "keep_versions": 3},
    })


def files_of(store: CapsuleStore, vid: str) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    write_archive(store, vid, buf)
    buf.seek(0)
    with tarfile.open(fileobj=buf) as tf:
        out: dict[str, bytes | None] = {}
        for m in tf.getmembers():
            f = tf.extractfile(m) if m.isreg() or m.islnk() else None
            out[m.name.removeprefix("./")] = f.read() if f is not None else None
        return out


def exec_dirs() -> set[Path]:
    return set(Path("/var/tmp").glob("bootd-exec-*"))


def test_exec_publishes_on_success_only_and_history_and_rollback(tmp_path: Path, cfg: Path) -> None:
    store = CapsuleStore(tmp_path / "capsules")
    run_cli("capsule", "import", "bb", str(make_busybox_root(tmp_path / "tree")), config=cfg, check=True)
    v1 = store.resolve("bb")
    assert v1 is not None
    before_dirs = exec_dirs()

    # The command sees /proc (its own PID namespace: it is a low PID), /dev from the master and
    # the master's resolv.conf; it writes a file and leaves a process behind.
    script = ("echo changed > /etc/motd; cat /etc/resolv.conf > /root/resolv.seen; "
              "test -c /dev/null && cat /proc/1/cmdline > /root/pid1; sleep 300 &")
    r = run_cli("capsule", "exec", "bb", "--", "/bin/sh", "-c", script, config=cfg)
    assert r.returncode == 0, r.stderr
    v2 = store.resolve("bb")
    assert v2 not in (None, v1) and f"published bb: version {v2}" in r.stdout
    files = files_of(store, str(v2))
    assert files["etc/motd"] == b"changed\n"
    assert files["root/resolv.seen"] == Path("/etc/resolv.conf").read_bytes()
    assert b"bootd-exec" in (files["root/pid1"] or b"")  # PID 1 of its PID namespace is exec's own shell
    assert "etc/resolv.conf" not in files  # made for the bind mount, gone again
    assert "usr/sbin/policy-rc.d" not in files
    mounts = Path("/proc/self/mountinfo").read_text()
    assert "bootd-exec" not in mounts
    assert exec_dirs() == before_dirs
    leftover = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "a process left by the command outlived its PID namespace"

    # A command that changes nothing publishes nothing new (the mount points and files exec
    # needs are gone again, with the directories' mtimes).
    r = run_cli("capsule", "exec", "bb", "--", "true", config=cfg, check=True)
    assert "unchanged" in r.stdout and store.resolve("bb") == v2

    # The command cannot change the master: its resolv.conf is a read-only copy, /dev nodes are bound singly.
    r = run_cli("capsule", "exec", "bb", "--", "/bin/sh", "-c",
                "rm -f /dev/null || echo kept-null; echo x >> /etc/resolv.conf || echo kept-resolv", config=cfg)
    assert "kept-null" in r.stdout + r.stderr and "kept-resolv" in r.stdout + r.stderr
    assert Path("/dev/null").is_char_device()

    # A failing command publishes nothing and says so.
    r = run_cli("capsule", "exec", "bb", "--", "/bin/sh", "-c", "echo x > /etc/motd; exit 3", config=cfg)
    assert r.returncode == 1 and "exited with status 3" in r.stderr and "nothing was published" in r.stderr
    assert store.resolve("bb") == v2 and exec_dirs() == before_dirs

    # A shell reads its commands from stdin; exit 0 publishes.
    p = subprocess.run([PYTHON, "-m", "bootd", "-c", str(cfg), "capsule", "shell", "bb"], input="echo s > /s\n",
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    v3 = store.resolve("bb")
    assert v3 not in (v1, v2) and files_of(store, str(v3))["s"] == b"s\n"

    hist = json.loads(run_cli("capsule", "history", "bb", "--json", config=cfg, check=True).stdout)
    assert [(h["version"], h["origin"]) for h in hist] == [(v1, "import"), (v2, "exec"), (v3, "exec")]
    assert hist[1]["detail"].startswith("/bin/sh -c echo changed") and hist[-1]["current"]
    assert all(h["stored_bytes"] > 0 for h in hist) and hist[1]["new_bytes"] < hist[1]["stored_bytes"]
    table = run_cli("capsule", "history", "bb", config=cfg, check=True).stdout
    assert table.splitlines()[0].split() == ["#", "TIME", "VERSION", "MADE", "BY", "STORED", "NEW", "DETAIL"]

    r = run_cli("capsule", "rollback", "bb", config=cfg, check=True)
    assert store.resolve("bb") == v2 and f"rolled back bb to version {v2}" in r.stdout
    run_cli("capsule", "rollback", "bb", str(v1)[:8], config=cfg, check=True)
    assert store.resolve("bb") == v1
    r = run_cli("capsule", "rollback", "bb", "0000000", config=cfg)
    assert r.returncode == 1 and "is not in its history" in r.stderr

    # gc keeps capsule.keep_versions (3) versions: all of them here; with 1, only the current.
    gc = json.loads(run_cli("capsule", "gc", "--json", config=cfg, check=True).stdout)
    assert set(gc["kept_versions"]) == {v1, v2, v3} and gc["removed_manifests"] == 0
    gc = json.loads(run_cli("capsule", "gc", "--keep-versions", "1", "--json", config=cfg, check=True).stdout)
    assert gc["kept_versions"] == [v1] and gc["removed_manifests"] == 2
    r = run_cli("capsule", "rollback", "bb", config=cfg)
    assert r.returncode == 1 and "no older version" in r.stderr


def test_exec_usage_errors(tmp_path: Path, cfg: Path) -> None:
    r = run_cli("capsule", "exec", "nope", "--", "true", config=cfg)
    assert r.returncode == 1 and "no capsule named 'nope'" in r.stderr
    r = run_cli("capsule", "exec", "nope", config=cfg)
    assert r.returncode == 2 and "no command given" in r.stderr


@pytest.mark.parametrize("form", ["oci-archive", "docker-save"])
def test_cli_imports_container_images(tmp_path: Path, cfg: Path, form: str) -> None:
    files = oci_files(LAYERS, compress=("gzip", "none", "zstd")) if form == "oci-archive" else docker_files(LAYERS)
    src = write_tar(files, tmp_path / "image.tar")
    r = run_cli("capsule", "import", "img", str(src), "--json", config=cfg, check=True)
    result = json.loads(r.stdout)
    tree = files_of(CapsuleStore(tmp_path / "capsules"), result["version"])
    assert {k.rstrip("/"): v for k, v in tree.items() if k not in ("", ".")} == EXPECTED
    assert result["hygiene"] == {"removed": [], "emptied": []}
