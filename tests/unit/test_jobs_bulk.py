"""Bulk node definitions and the job spool: pure checks, every refusal names why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootd.service.bulk import MAX_NODES, parse_bulk
from bootd.service.checks import Invalid
from bootd.service.jobs import MAX_PENDING, JobQueueFull, JobRefused, JobSpool, check_source


def test_text_lines_become_nodes_with_their_line_numbers() -> None:
    nodes = parse_bulk("# rack 1\n\nn1 52:54:00:00:00:01 ip=10.0.0.1 bmc=10.1.0.1 rack=r1\n"
                       "n2 52-54-00-00-00-02 group=gpu capsule=rocky9  # trailing comment\n", "default")
    assert [(n.line, n.name, n.mac, n.group, n.ip) for n in nodes] == [
        (3, "n1", "52:54:00:00:00:01", "default", "10.0.0.1"), (4, "n2", "52:54:00:00:00:02", "gpu", None)]
    assert nodes[0].vars == {"rack": "r1", "bmc.address": "10.1.0.1"} and nodes[1].capsule == "rocky9"


@pytest.mark.parametrize(("text", "words"), [
    ("n1\n", ["line 1", "NAME MAC"]),
    ("n1 52:54:00:00:00:01 ip=10.0.0.300\n", ["line 1", "ip"]),
    ("ok 52:54:00:00:00:01\nn/2 52:54:00:00:00:02\n", ["line 2", "not a valid name"]),
    ("n1 52:54:00:00:00:01 justaword\n", ["line 1", "KEY=VALUE"]),
    ("n1 52:54:00:00:00:01 9bad=x\n", ["line 1", "variable name"]),
    ("n1 52:54:00:00:00:01\nn2 52:54:00:00:00:01\n", ["line 2", "line 1", "MAC"]),
    ("n1 52:54:00:00:00:01 ip=10.0.0.1\nn2 52:54:00:00:00:02 ip=10.0.0.1\n", ["line 2", "address"]),
    ("", ["no nodes"]),
])
def test_bad_definitions_name_the_line(text: str, words: list[str]) -> None:
    with pytest.raises(Invalid) as err:
        parse_bulk(text, "default")
    for w in words:
        assert w in str(err.value), str(err.value)


def test_json_entries_are_checked_like_lines() -> None:
    with pytest.raises(Invalid, match="line 2: unknown field"):
        parse_bulk([{"name": "a", "mac": "52:54:00:00:00:01"}, {"name": "b", "mac": "52:54:00:00:00:02",
                                                                "colour": "red"}], "default")
    with pytest.raises(Invalid, match=f"at most {MAX_NODES}"):
        parse_bulk([{"name": f"n{i}", "mac": "52:54:00:00:00:01"} for i in range(MAX_NODES + 1)], "default")


def test_spool_bounds_pending_jobs_and_prunes_nothing_unfinished(tmp_path: Path) -> None:
    spool = JobSpool(tmp_path / "jobs")
    jobs = [spool.submit("gc", {}, who="t") for _ in range(MAX_PENDING)]
    with pytest.raises(JobQueueFull, match=f"at most {MAX_PENDING}"):
        spool.submit("gc", {}, who="t")
    with pytest.raises(JobRefused, match="unknown job kind"):
        spool.submit("format-disks", {}, who="t")
    claimed = spool.claim()
    assert claimed is not None and claimed.id == jobs[0].id and claimed.state == "running"
    assert spool.get(jobs[0].id).pid == os.getpid()
    assert (tmp_path / "jobs").stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (tmp_path / "jobs").iterdir())


def test_a_job_left_running_by_a_dead_helper_is_failed_with_the_reason(tmp_path: Path) -> None:
    spool = JobSpool(tmp_path / "jobs")
    job = spool.submit("gc", {}, who="t")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data = json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())
    data.update(state="running", pid=int(dead.stdout))
    (tmp_path / "jobs" / f"{job.id}.json").write_text(json.dumps(data))
    [orphan] = spool.orphans()
    assert spool.get(job.id).state == "failed" and "stopped before it finished" in orphan.error


def test_sources_must_resolve_inside_the_import_directories(tmp_path: Path) -> None:
    allowed = tmp_path / "imports"
    (allowed / "img").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed / "link").symlink_to(tmp_path / "secret")
    assert check_source(str(allowed / "img"), (allowed,)) == (allowed / "img").resolve()
    for bad in (str(tmp_path / "secret"), str(allowed / "link"), str(allowed / ".." / "secret")):
        with pytest.raises(JobRefused, match="outside the import directories"):
            check_source(bad, (allowed,))
    with pytest.raises(JobRefused, match=r"capsule\.import_dirs"):
        check_source(str(allowed / "img"), ())
    with pytest.raises(JobRefused, match="absolute path"):
        check_source("img", (allowed,))
