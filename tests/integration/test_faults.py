"""Faults of the state directory: read-only and full filesystems give clear errors and lose nothing."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import free_port, need_root, run_cli, write_config


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def config_for(tmp_path: Path, state: Path) -> Path:
    return write_config(tmp_path / "bootd.toml", {
        "server": {"state_dir": str(state), "address": "127.0.0.1", "graceful_timeout": 3},
        "http": {"listen": "127.0.0.1", "port": free_port()},
    })


def test_read_only_state_dir_is_refused_clearly_and_nothing_changes(tmp_path: Path) -> None:
    need_root()
    with tmpfs(tmp_path / "state", "size=8m") as state:
        config = config_for(tmp_path, state)
        run_cli("node", "add", "n0000", "--mac", "52:54:00:00:00:01", config=config, check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(state)], check=True, timeout=30)
        proc = run_cli("serve", config=config)
        assert proc.returncode == 1
        assert "read-only" in proc.stderr or "not writable" in proc.stderr, proc.stderr
        assert str(state) in proc.stderr
        add = run_cli("node", "add", "n0001", "--mac", "52:54:00:00:00:02", config=config)
        assert add.returncode == 1 and "read-only" in add.stderr.lower(), add.stderr
        listed = json.loads(run_cli("node", "list", "--json", config=config, check=True).stdout)
        assert [n["name"] for n in listed] == ["n0000"]


def test_full_state_dir_gives_a_clear_error_and_keeps_what_was_written(tmp_path: Path) -> None:
    need_root()
    with tmpfs(tmp_path / "state", "size=1m") as state:
        config = config_for(tmp_path, state)
        run_cli("node", "add", "keep", "--mac", "52:54:00:00:01:01", config=config, check=True)
        with contextlib.suppress(OSError), (state / "filler").open("wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        failed = None
        for i in range(200):
            proc = run_cli("node", "set", "keep", "--var", f"k{i}={'x' * 4000}", config=config)
            if proc.returncode != 0:
                failed = proc
                break
        assert failed is not None, "the registry never reported the full disk"
        assert failed.returncode == 1 and "full" in failed.stderr.lower(), failed.stderr
        (state / "filler").unlink()
        shown = json.loads(run_cli("node", "show", "keep", "--json", config=config, check=True).stdout)
        assert shown[0]["mac"] == "52:54:00:00:01:01"
        assert all(len(v) == 4000 for v in shown[0]["vars"].values())
