"""Property tests (hypothesis) of the TFTP codec and read session under hostile input."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootd.proto.tftp.packet import (
    Ack,
    Data,
    ErrorPacket,
    OAck,
    Request,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    parse_packet,
)
from tests.fuzz import tftp_target

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40)


@FAST
@given(st.binary(max_size=600))
def test_codec_raises_only_protocol_errors(data: bytes) -> None:
    tftp_target.codec(data)


@FAST
@given(st.integers(0, 65535), st.binary(max_size=1500), st.integers(0, 65535), names)
def test_encoders_round_trip(block: int, payload: bytes, code: int, message: str) -> None:
    assert parse_packet(encode_data(block, payload)) == Data(block, payload)
    assert parse_packet(encode_ack(block)) == Ack(block)
    assert parse_packet(encode_error(code, message)) == ErrorPacket(code, message)
    assert parse_packet(encode_oack({"blksize": str(block)})) == OAck({"blksize": str(block)})


def rrq(name: str, mode: str, options: dict[str, str]) -> bytes:
    body = name.encode() + b"\0" + mode.encode() + b"\0"
    for k, v in options.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    return struct.pack("!H", 1) + body


option_values = st.one_of(st.integers(-5, 70000).map(str), st.text(max_size=6))
requests = st.builds(
    rrq, names, st.sampled_from(["octet", "netascii", "OCTET", "mail", ""]),
    st.dictionaries(st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "x"]), option_values),
)
acks = st.integers(0, 70).map(lambda b: struct.pack("!HH", 4, b))
hostile = st.one_of(acks, acks, st.binary(max_size=40),
                    st.builds(lambda c, m: encode_error(c, m), st.integers(0, 9), names))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(0, 40_000), st.lists(hostile, max_size=60),
       st.lists(st.floats(0.0, 3.0), min_size=1, max_size=5))
def test_session_survives_any_sequence_and_always_ends(req: bytes, size: int, datagrams: list[bytes],
                                                       steps: list[float]) -> None:
    tftp_target.session(req, size, datagrams, steps)


def test_requests_strategy_reaches_real_sessions() -> None:
    # Guard against a fuzz test that silently tests nothing: a valid RRQ must build a session.
    assert isinstance(parse_packet(rrq("pxelinux.0", "octet", {"blksize": "1408"})), Request)
