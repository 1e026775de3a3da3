"""Golden captures of real clients (see tests/data/dhcp/capture.py for how they were made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootd.proto.dhcp.packet import DhcpPacket

DATA = Path(__file__).resolve().parents[2] / "data" / "dhcp"


def golden(name: str) -> bytes:
    return (DATA / f"{name}.bin").read_bytes()


def golden_packet(name: str) -> DhcpPacket:
    return DhcpPacket.parse(golden(name))


@pytest.fixture
def data_dir() -> Path:
    return DATA
