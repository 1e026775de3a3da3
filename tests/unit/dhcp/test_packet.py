"""Codec: header fields, option framing, RFC 3396 long options, option overload, and refusal reasons."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.errors import RemoteProtocolError
from bootd.proto.dhcp import packet
from bootd.proto.dhcp.packet import (
    BOOTREPLY,
    BOOTREQUEST,
    HEADER,
    MAGIC_COOKIE,
    DhcpPacket,
    encode_option,
    ip_to_bytes,
    ip_to_str,
)

from .conftest import DATA, golden


def raw_packet(options: bytes = b"\x35\x01\x01\xff", *, op: int = 1, hlen: int = 6, sname: bytes = b"",
               file: bytes = b"", cookie: bytes = MAGIC_COOKIE) -> bytes:
    head = HEADER.pack(op, 1, hlen, 0, 0x12345678, 3, 0x8000, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                       bytes([10, 0, 0, 254]), bytes.fromhex("525400aabbcc") + b"\0" * 10, sname, file)
    return head + cookie + options


def reasons(data: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        DhcpPacket.parse(data)
    return info.value.reason


def test_header_fields() -> None:
    pkt = DhcpPacket.parse(raw_packet())
    assert pkt.op == BOOTREQUEST and pkt.xid == 0x12345678 and pkt.secs == 3
    assert pkt.broadcast
    assert pkt.giaddr == "10.0.0.254" and pkt.ciaddr == "0.0.0.0"
    assert pkt.hwaddr == bytes.fromhex("525400aabbcc")
    assert pkt.options == {53: b"\x01"}


def test_pad_and_missing_end_tolerated() -> None:
    # Pads between options and no End at the end of the datagram (seen from old ROMs) still parse.
    pkt = DhcpPacket.parse(raw_packet(b"\x00\x00\x35\x01\x03\x00\x3c\x03abc"))
    assert pkt.options == {53: b"\x03", 60: b"abc"}


def test_options_after_end_are_ignored() -> None:
    pkt = DhcpPacket.parse(raw_packet(b"\x35\x01\x01\xff\x3c\x03abc"))
    assert 60 not in pkt.options


def test_long_option_concatenated_rfc3396() -> None:
    value = bytes(range(256)) * 2  # 512 bytes: must split into 255 + 255 + 2 on the wire
    wire = encode_option(43, value)
    assert wire[:2] == b"\x2b\xff" and wire[257:259] == b"\x2b\xff" and wire[514:516] == b"\x2b\x02"
    pkt = DhcpPacket.parse(raw_packet(b"\x35\x01\x01" + wire + b"\xff"))
    assert pkt.options[43] == value


def test_overload_file_then_sname_order() -> None:
    file = b"\x0c\x03abc\xff".ljust(128, b"\0")
    sname = b"\x0c\x03def\x3c\x02xy\xff".ljust(64, b"\0")
    pkt = DhcpPacket.parse(raw_packet(b"\x35\x01\x01\x34\x01\x03\x0c\x01Z\xff", file=file, sname=sname))
    # RFC 3396 section 5: options field, then file, then sname.
    assert pkt.options[12] == b"Zabcdef"
    assert pkt.options[60] == b"xy"
    assert 52 not in pkt.options
    assert pkt.file == b"" and pkt.sname == b""


def test_overload_file_only_keeps_sname() -> None:
    file = b"\x3c\x02xy\xff".ljust(128, b"\0")
    pkt = DhcpPacket.parse(raw_packet(b"\x35\x01\x01\x34\x01\x01\xff", file=file, sname=b"server1"))
    assert pkt.options[60] == b"xy" and pkt.sname == b"server1"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01" * 100, "short-packet"),
        (raw_packet(op=3), "bad-op"),
        (raw_packet(hlen=17), "bad-hlen"),
        (raw_packet(b"\x35"), "truncated-option"),
        (raw_packet(b"\x35\x05\x01"), "truncated-option"),
        (raw_packet(cookie=b"\x01\x02\x03\x04"), "bad-cookie"),
        (raw_packet(b"\x34\x01\x07\xff"), "bad-option-52"),
        (raw_packet(b"\x34\x01\x01\xff", file=b"\x3c\x02xy".ljust(128, b"\0")), "missing-end"),
        (raw_packet(b"\x34\x01\x01\xff", file=b"\x3c\x7fxy".ljust(128, b"\0")), "truncated-option"),
        (raw_packet(b"\x34\x01\x01\xff", file=b"\x34\x00\xff".ljust(128, b"\0")), "bad-option-52"),
    ],
)
def test_malformed_reasons(data: bytes, reason: str) -> None:
    assert reasons(data) == reason


def test_plain_bootp_has_no_options() -> None:
    data = raw_packet(b"", cookie=b"\0" * 64)
    pkt = DhcpPacket.parse(data)
    assert not pkt.has_cookie and pkt.options == {}


def test_encode_roundtrip_and_padding() -> None:
    pkt = DhcpPacket(op=BOOTREPLY, xid=7, yiaddr="10.0.0.5", siaddr="10.0.0.1",
                     chaddr=bytes.fromhex("525400aabbcc"), file=b"undionly.kpxe",
                     options={54: ip_to_bytes("10.0.0.1"), 53: b"\x02", 43: b"x" * 300})
    wire = pkt.encode()
    assert len(wire) >= 300
    assert wire[240:243] == b"\x35\x01\x02"  # message type first, whatever the dict order
    back = DhcpPacket.parse(wire)
    assert back.yiaddr == "10.0.0.5" and back.siaddr == "10.0.0.1" and back.file == b"undionly.kpxe"
    assert back.options == {53: b"\x02", 54: ip_to_bytes("10.0.0.1"), 43: b"x" * 300}


def test_encode_refuses_oversized_file_field() -> None:
    with pytest.raises(ValueError):
        DhcpPacket(file=b"x" * 129).encode()


def test_ip_helpers() -> None:
    assert ip_to_str(b"\x0a\x00\x00\x01") == "10.0.0.1"
    assert ip_to_bytes("255.255.255.0") == b"\xff\xff\xff\x00"
    for bad in ("10.0.0", "10.0.0.256", "a.b.c.d"):
        with pytest.raises(ValueError):
            ip_to_bytes(bad)
    # Their caches are bounded (cleared when full) and stay right across the clearing; a refused address is not kept.
    for i in range(3 * 4096):
        raw = i.to_bytes(4, "big")
        text = f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
        assert ip_to_str(raw) == text and ip_to_bytes(text) == raw
        assert ip_to_str(raw) == text and ip_to_bytes(text) == raw
    assert len(packet._DOTTED) <= 4096 and len(packet._PACKED) <= 4096
    assert "10.0.0.256" not in packet._PACKED


def test_every_golden_capture_parses_and_reencodes() -> None:
    files = sorted(DATA.glob("*.bin"))
    assert len(files) >= 16
    for path in files:
        pkt = DhcpPacket.parse(path.read_bytes())
        again = DhcpPacket.parse(pkt.encode())
        assert again == pkt, path.name


def test_golden_ipxe_header() -> None:
    pkt = DhcpPacket.parse(golden("ipxe-bios-c2s-discover-ipxe-1"))
    assert pkt.op == BOOTREQUEST and pkt.hwaddr == bytes.fromhex("525400990101")
    assert struct.unpack("!H", pkt.options[57])[0] >= 576


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_fuzz_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    try:
        DhcpPacket.parse(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.binary(max_size=128), st.binary(max_size=64))
def test_fuzz_option_areas_only_raise_protocol_error(opts: bytes, file: bytes, sname: bytes) -> None:
    from bootd.proto.dhcp.pxe import classify

    try:
        pkt = DhcpPacket.parse(raw_packet(opts, file=file.ljust(128, b"\0"), sname=sname.ljust(64, b"\0")))
        classify(pkt)
    except RemoteProtocolError:
        pass
