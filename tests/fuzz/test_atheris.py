"""Bounded coverage-guided runs (atheris) of each protocol target, seeded with the golden captures.

A crash makes libFuzzer exit non-zero and write the input; the test shows it.
Longer runs: see tests/fuzz/atheris_run.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SECONDS = 20


@pytest.mark.parametrize("target", ["tftp-codec", "tftp-session", "dhcp-codec", "dhcp-classify"])
def test_bounded_fuzz_run_finds_no_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = HERE / "corpus" / target
    if seeds.is_dir():
        for f in seeds.iterdir():
            shutil.copy(f, corpus)
    if target.startswith("dhcp"):
        for f in (ROOT / "tests" / "data" / "dhcp").glob("*.bin"):
            shutil.copy(f, corpus)
    proc = subprocess.run(
        [sys.executable, str(HERE / "atheris_run.py"), target, f"-max_total_time={SECONDS}", "-runs=400000",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=SECONDS * 4, cwd=ROOT,
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, f"fuzzer found a crash in {target}:\n{tail}"
    runs = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
    assert runs, f"fuzzer did not report its run count:\n{tail}"
    executed = int(runs[-1].split()[1])
    assert executed > 1000, f"only {executed} inputs executed: {runs[-1]}"
