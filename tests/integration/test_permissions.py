"""Files are private whoever starts bootd: state directory 0700, registry and secrets 0600."""

from __future__ import annotations

import os
import pwd
import shutil
import sqlite3
import stat
import tempfile
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_config


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_creates_private_files_and_takes_over_an_open_state_dir(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    config = write_config(tmp_path / "a.toml", {"server": {"state_dir": str(fresh)}})
    run_cli("node", "add", "n1", "--mac", "52:54:00:00:0b:01", config=config, check=True)
    assert mode(fresh) == 0o700
    assert all(mode(p) == 0o600 for p in fresh.glob("bootd.sqlite*")), [(p, oct(mode(p))) for p in fresh.iterdir()]

    # An older bootd (or one run by hand without a umask) left the directory 0755 and the registry 0644.
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    db = sqlite3.connect(old / "bootd.sqlite")
    db.close()
    (old / "bootd.sqlite").chmod(0o644)
    (old / "admin-token").write_text("x" * 64)
    (old / "admin-token").chmod(0o644)
    config = write_config(tmp_path / "b.toml", {"server": {"state_dir": str(old)}})
    run_cli("node", "add", "n1", "--mac", "52:54:00:00:0b:01", config=config, check=True)
    assert mode(old) == 0o700 and mode(old / "bootd.sqlite") == 0o600 and mode(old / "admin-token") == 0o600


def test_root_cli_keeps_a_dedicated_users_files_that_users(tmp_path: Path) -> None:
    """The unit runs bootd as its own user; an administrator's root CLI must not leave root-owned files."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    nobody = pwd.getpwnam("nobody")
    # Like /var/lib: a parent the daemon's user can traverse (pytest's own tmp dirs are root-only).
    top = Path(tempfile.mkdtemp(prefix="bootd-perm-", dir="/tmp"))
    try:
        top.chmod(0o755)
        state = top / "state"
        state.mkdir(mode=0o700)
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        config = write_config(top / "c.toml", {"server": {"state_dir": str(state)}})
        run_cli("node", "add", "n1", "--mac", "52:54:00:00:0b:02", config=config, check=True)
        owners = {p.name: p.stat().st_uid for p in state.iterdir()}
        assert owners and all(uid == nobody.pw_uid for uid in owners.values()), owners

        tree = top / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "hostname").write_text("n\n")
        run_cli("capsule", "import", "tiny", str(tree), config=config, check=True)
        rooted = [p for p in state.rglob("*") if p.lstat().st_uid == 0]
        assert rooted == [], rooted[:5]
    finally:
        shutil.rmtree(top)
