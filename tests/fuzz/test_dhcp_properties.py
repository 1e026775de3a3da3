"""Property tests (hypothesis) of the DHCP codec and classification under hostile input.

Besides random bytes, the strategies mutate the golden packets captured from
real clients (tests/data/dhcp), which reach far deeper than noise does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import dhcp_target

DATA = Path(__file__).resolve().parents[1] / "data" / "dhcp"
GOLDEN = sorted(p.read_bytes() for p in DATA.glob("*.bin"))
FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(packet: bytes, flips: list[tuple[int, int]], cut: int | None, tail: bytes) -> bytes:
    data = bytearray(packet)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    return bytes(data) + tail


mutated = st.builds(
    mutate,
    st.sampled_from(GOLDEN) if GOLDEN else st.just(b"\x01" * 300),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8),
    st.one_of(st.none(), st.integers(0, 600)),
    st.binary(max_size=64),
)


def test_golden_packets_exist() -> None:
    assert len(GOLDEN) >= 5, "tests/data/dhcp should hold captures of real clients"


@FAST
@given(st.one_of(st.binary(max_size=700), mutated))
def test_codec_round_trips_or_refuses(data: bytes) -> None:
    dhcp_target.codec(data)


@FAST
@given(mutated)
def test_classification_never_crashes(data: bytes) -> None:
    dhcp_target.classify(data)


@pytest.mark.parametrize("index", range(len(GOLDEN)))
def test_every_golden_packet_parses_and_round_trips(index: int) -> None:
    dhcp_target.codec(GOLDEN[index])
