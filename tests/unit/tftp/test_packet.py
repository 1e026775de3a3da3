"""The TFTP codec and option negotiation (RFC 1350, 2347, 2348, 2349, 7440)."""

from __future__ import annotations

import pytest

from bootd.errors import RemoteProtocolError
from bootd.proto.tftp.packet import (
    MAX_BLKSIZE,
    Ack,
    Data,
    ErrorPacket,
    OAck,
    Opcode,
    Request,
    encode_ack,
    encode_data,
    encode_error,
    encode_oack,
    encode_request,
    negotiate,
    parse_packet,
)


def test_rrq_with_options_is_parsed_case_insensitively() -> None:
    raw = b"\x00\x01/pxelinux.0\x00OCTET\x00BlkSize\x001468\x00TSIZE\x000\x00windowsize\x0016\x00"
    pkt = parse_packet(raw)
    assert pkt == Request(Opcode.RRQ, "/pxelinux.0", "octet", {"blksize": "1468", "tsize": "0", "windowsize": "16"})


def test_request_round_trips() -> None:
    raw = encode_request("boot/x.efi", "netascii", {"tsize": "0"})
    assert parse_packet(raw) == Request(Opcode.RRQ, "boot/x.efi", "netascii", {"tsize": "0"})
    assert parse_packet(encode_request("a", write=True)) == Request(Opcode.WRQ, "a", "octet", {})


def test_padding_nuls_and_a_dangling_option_name_are_tolerated() -> None:
    # Some PXE ROMs pad the request; a name without a value is ignored, not fatal.
    assert parse_packet(b"\x00\x01f\x00octet\x00\x00\x00\x00") == Request(Opcode.RRQ, "f", "octet", {})
    assert parse_packet(b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00") == Request(
        Opcode.RRQ, "f", "octet", {"tsize": "0"}
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x00", "short"),
        (b"\x00\x01abc", "malformed"),
        (b"\x00\x01file\x00octet", "malformed"),
        (b"\x00\x01file\x00", "malformed"),
        (b"\x00\x01\x00octet\x00", "malformed"),
        (b"\x00\x09\x00\x01", "bad_opcode"),
    ],
)
def test_malformed_datagrams_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        parse_packet(raw)
    assert exc.value.reason == reason
    assert str(exc.value)


def test_data_ack_error_oack_round_trip() -> None:
    assert parse_packet(encode_data(70000, b"xyz")) == Data(70000 & 0xFFFF, b"xyz")
    assert parse_packet(encode_ack(65536)) == Ack(0)
    assert parse_packet(encode_ack(7) + b"\0\0") == Ack(7)  # padded ACKs still count
    assert parse_packet(encode_error(2, "no way")) == ErrorPacket(2, "no way")
    assert parse_packet(b"\x00\x05\x00\x01unterminated") == ErrorPacket(1, "unterminated")
    assert parse_packet(encode_oack({"blksize": "1468", "tsize": "9"})) == OAck({"blksize": "1468", "tsize": "9"})
    assert encode_data(1, b"") == b"\x00\x03\x00\x01"


def test_no_options_means_no_oack_and_defaults() -> None:
    n = negotiate({}, size=10, default_timeout=1.5)
    assert (n.blksize, n.windowsize, n.timeout, n.oack) == (512, 1, 1.5, {})


@pytest.mark.parametrize(
    ("value", "max_blksize", "expected"),
    [
        ("8", MAX_BLKSIZE, "8"),
        ("1468", MAX_BLKSIZE, "1468"),
        ("65464", MAX_BLKSIZE, "65464"),
        ("65465", MAX_BLKSIZE, "65464"),  # clamped to the RFC 2348 maximum
        ("99999", 1024, "1024"),  # clamped to the configured maximum
        ("7", MAX_BLKSIZE, None),  # below the RFC range: ignored, default 512
        ("0", MAX_BLKSIZE, None),
        ("-5", MAX_BLKSIZE, None),
        ("abc", MAX_BLKSIZE, None),
        ("\u00b2", MAX_BLKSIZE, None),  # "²": str.isdigit() says yes, int() refuses (found by hypothesis)
        ("\u0661\u0662", MAX_BLKSIZE, None),  # Arabic-Indic digits: ASCII only on the wire
    ],
)
def test_blksize(value: str, max_blksize: int, expected: str | None) -> None:
    n = negotiate({"blksize": value}, size=0, default_timeout=1.0, max_blksize=max_blksize)
    assert n.oack.get("blksize") == expected
    assert n.blksize == (int(expected) if expected else 512)


def test_tsize_reports_the_file_size_unless_unknown() -> None:
    assert negotiate({"tsize": "0"}, size=123456, default_timeout=1).oack == {"tsize": "123456"}
    assert negotiate({"tsize": "0"}, size=None, default_timeout=1).oack == {}


@pytest.mark.parametrize(("value", "accepted"), [("1", True), ("5", True), ("255", True), ("0", False), ("256", False)])
def test_timeout(value: str, accepted: bool) -> None:
    n = negotiate({"timeout": value}, size=0, default_timeout=2.0)
    assert ("timeout" in n.oack) is accepted
    assert n.timeout == (float(value) if accepted else 2.0)


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("16", 16), ("64", 64), ("65535", 64), ("0", None)])
def test_windowsize_is_clamped_to_the_configured_maximum(value: str, expected: int | None) -> None:
    n = negotiate({"windowsize": value}, size=0, default_timeout=1.0, max_windowsize=64)
    assert n.oack.get("windowsize") == (str(expected) if expected else None)
    assert n.windowsize == (expected or 1)


def test_unknown_options_are_ignored_and_order_is_kept() -> None:
    n = negotiate({"multicast": "", "tsize": "0", "blksize": "1024", "rollover": "0"}, size=5, default_timeout=1.0)
    assert list(n.oack.items()) == [("tsize", "5"), ("blksize", "1024")]


@pytest.mark.parametrize(
    ("blksize", "windowsize", "expected"),
    [("8192", "16", "8"), ("65464", "4", "1"), ("1468", "64", "44"), ("512", "16", "16")],
)
def test_window_bytes_cap_keeps_a_burst_within_a_socket_buffer(blksize: str, windowsize: str, expected: str) -> None:
    n = negotiate(
        {"windowsize": windowsize, "blksize": blksize},
        size=0,
        default_timeout=1.0,
        max_windowsize=64,
        max_window_bytes=65536,
    )
    assert n.oack == {"windowsize": expected, "blksize": blksize}  # the client's order is kept
    assert n.windowsize == int(expected)
