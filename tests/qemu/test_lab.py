"""The lab's promise: whatever happens inside, the namespace, its taps and every process are gone
afterwards, and nothing outside the namespace is touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bootd.lab import Lab, lab_available
from bootd.lab.netns import list_namespaces, process_alive, reap_stale

pytestmark = pytest.mark.netns


@pytest.fixture(autouse=True)
def _need_root() -> None:
    reason = lab_available()
    if reason:
        pytest.skip(reason)


def test_teardown_after_an_exception_removes_everything(tmp_path: Path) -> None:
    host_links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    with pytest.raises(RuntimeError, match="boom"), Lab(workdir=tmp_path, prefix="bd-s1t") as lab:
        tap = lab.add_tap()
        lab.add_veth("peer0", "10.77.0.2/24")
        proc = lab.spawn("sleeper", ["sleep", "600"])
        stray = subprocess.Popen(lab.ns_cmd(["sleep", "600"]), start_new_session=True)  # not via spawn
        assert lab.run(["ip", "-br", "link", "show", tap]).returncode == 0
        assert "10.77.0.2/24" in lab.run(["ip", "-br", "addr", "show", "peer0"]).stdout
        name = lab.name
        raise RuntimeError("boom")
    assert name not in list_namespaces()
    assert not process_alive(proc.pid)
    stray.wait(timeout=5)
    assert not process_alive(stray.pid)
    assert subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout == host_links
    assert (tmp_path / "sleeper.pid").read_text().strip() == str(proc.pid)


def test_stale_namespaces_of_dead_runs_are_reaped_and_live_ones_kept(tmp_path: Path) -> None:
    dead = "bd-s1t-999999-0"
    subprocess.run(["ip", "netns", "add", dead], check=True)
    with Lab(workdir=tmp_path, prefix="bd-s1t") as lab:  # up() reaps
        assert dead not in list_namespaces()
        assert reap_stale("bd-s1t") == []  # our own live namespace stays
        assert lab.name in list_namespaces()
