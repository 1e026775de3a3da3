"""Inputs the fuzzers once crashed on, kept so the bug stays fixed.

File names start with the atheris target they belong to (see atheris_run.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import dhcp_target, tftp_target

HERE = Path(__file__).resolve().parent / "regressions"
TARGETS = {"dhcp-codec": dhcp_target.codec, "dhcp-classify": dhcp_target.classify, "tftp-codec": tftp_target.codec}
CASES = sorted(HERE.glob("*.bin"))


def test_regressions_exist() -> None:
    assert CASES, "tests/fuzz/regressions should keep every crash the fuzzers found"


@pytest.mark.parametrize("path", CASES, ids=[p.name for p in CASES])
def test_regression(path: Path) -> None:
    target = next(fn for name, fn in TARGETS.items() if path.name.startswith(name))
    target(path.read_bytes())
