"""The pure parts of power control: the pace of power-ons, BMC password files, error words."""

from __future__ import annotations

import asyncio
import socket
import stat
import time
from pathlib import Path

import pytest
from pyghmi import exceptions as ipmi_exc

from bootd.service.nodes import Invalid
from bootd.service.power import BmcSecrets, BmcTarget, Pacer, _ipmi_error, check_password, split_target


async def test_pacer_spaces_power_ons_from_the_previous_answer() -> None:
    rate = 50.0  # 20 ms apart
    pacer = Pacer(rate)
    answered: list[float] = []
    granted: list[float] = []

    async def node(delay: float) -> None:
        await pacer.acquire()
        granted.append(time.monotonic())
        await asyncio.sleep(delay)  # the BMC's round trip
        answered.append(time.monotonic())
        pacer.release()

    started = time.monotonic()
    await asyncio.gather(*(node(0.005 * (i % 3)) for i in range(6)))
    assert granted[0] - started < 0.015  # the first goes at once
    for prev_answer, grant in zip(answered, granted[1:], strict=False):
        assert grant - prev_answer >= 1 / rate - 0.002, (answered, granted)


def test_password_files_are_private_atomic_and_the_node_wins(tmp_path: Path) -> None:
    secrets = BmcSecrets(tmp_path / "state")
    secrets.set("group", "rack1", "group-pw")
    assert secrets.lookup("n1", "rack1") == ("group-pw", "group rack1")
    secrets.set("node", "n1", "node-pw")
    assert secrets.lookup("n1", "rack1") == ("node-pw", "node n1")
    assert secrets.lookup("n2", "rack2") is None
    for path in secrets.dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert not path.name.startswith(".")  # no temporary file left behind
    assert stat.S_IMODE(secrets.dir.stat().st_mode) == 0o700
    assert secrets.delete("node", "n1") and not secrets.delete("node", "n1")
    assert secrets.lookup("n1", "rack1") == ("group-pw", "group rack1")
    with pytest.raises(Invalid, match="not a valid node name"):
        secrets.set("node", "../etc", "x")


def test_password_rules_and_targets() -> None:
    for bad, words in (("", "empty"), ("a\nb", "one line"), ("x" * 21, "at most 20")):
        with pytest.raises(Invalid, match=words):
            check_password(bad)
    check_password("x" * 20)
    assert split_target("@rack1") == ("group", "rack1")
    assert split_target("n0001") == ("node", "n0001")


def test_ipmi_errors_in_words() -> None:
    t = BmcTarget("n1", "10.0.0.9", "admin", "pw", 623)
    assert _ipmi_error(t, ipmi_exc.IpmiException("Incorrect password provided")) == \
        "BMC 10.0.0.9:623: wrong password for user 'admin'"
    assert "knows no user 'admin'" in _ipmi_error(t, ipmi_exc.IpmiException("Unauthorized name in RAKP2"))
    assert "no answer" in _ipmi_error(t, ipmi_exc.IpmiException(None))
    assert "does not resolve" in _ipmi_error(t, socket.gaierror(-2, "Name or service not known"))
    assert _ipmi_error(t, ipmi_exc.IpmiException("Node busy")) == "BMC 10.0.0.9:623: Node busy"
    assert "password" not in repr(t) and "pw" not in repr(t).replace("port", "")
