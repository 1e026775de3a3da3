"""Typed option getters: absent -> None, malformed -> RemoteProtocolError with a per-option reason."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.errors import RemoteProtocolError
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket

from .conftest import golden_packet


def pkt(**opts: bytes) -> DhcpPacket:
    return DhcpPacket(options={int(k[1:]): v for k, v in opts.items()})


def test_absent_options_are_none() -> None:
    p = DhcpPacket()
    assert o.message_type(p) is None and o.server_id(p) is None and o.requested_ip(p) is None
    assert o.vendor_class(p) is None and o.client_id(p) is None and o.client_guid(p) is None
    assert o.client_arches(p) == [] and o.user_classes(p) == [] and o.ipxe_options(p) is None
    assert o.client_ndi(p) is None and o.max_message_size(p) is None and o.pxe_vendor_options(p) == {}
    assert o.bootfile_name(p) is None and o.tftp_server_name(p) is None and o.hostname(p) is None


def test_values() -> None:
    p = pkt(o53=b"\x03", o54=b"\x0a\x00\x00\x01", o50=b"\x0a\x00\x00\x07", o57=b"\x05\xc0",
            o60=b"PXEClient:Arch:00007:UNDI:003016\x00", o93=b"\x00\x07\x00\x09", o94=b"\x01\x03\x10",
            o97=b"\x00" + bytes(range(1, 17)), o66=b"10.0.0.1", o67=b"undionly.kpxe", o12=b"node-1\x00")
    assert o.message_type(p) is o.MessageType.REQUEST
    assert o.server_id(p) == "10.0.0.1" and o.requested_ip(p) == "10.0.0.7"
    assert o.max_message_size(p) == 1472
    assert o.vendor_class(p) == "PXEClient:Arch:00007:UNDI:003016"  # trailing NUL from some ROMs
    assert o.client_arches(p) == [7, 9]
    assert o.client_ndi(p) == (1, 3, 16)
    assert o.client_guid(p) == "01020304-0506-0708-090a-0b0c0d0e0f10"
    assert o.tftp_server_name(p) == "10.0.0.1" and o.bootfile_name(p) == "undionly.kpxe"
    assert o.hostname(p) == "node-1"


def test_tiny_max_message_size_is_ignored() -> None:
    assert o.max_message_size(pkt(o57=b"\x01\x00")) is None


def test_unset_guid_is_no_identity() -> None:
    assert o.client_guid(pkt(o97=b"\x00" + b"\x00" * 16)) is None
    assert o.client_guid(pkt(o97=b"\x00" + b"\xff" * 16)) is None


def test_user_class_bare_and_rfc3004() -> None:
    assert o.user_classes(pkt(o77=b"iPXE")) == [b"iPXE"]
    assert o.user_classes(pkt(o77=b"\x04iPXE\x03foo")) == [b"iPXE", b"foo"]
    assert o.user_classes(pkt(o77=b"\x09iPXE")) == [b"\x09iPXE"]


def test_suboptions_roundtrip() -> None:
    raw = o.encode_suboptions({6: b"\x08", 71: b"\x80\x00\x00\x00"})
    assert raw == b"\x06\x01\x08\x47\x04\x80\x00\x00\x00\xff"
    assert o.pxe_vendor_options(pkt(o43=raw)) == {6: b"\x08", 71: b"\x80\x00\x00\x00"}
    assert o.ipxe_options(pkt(o175=b"\xb0\x01\x01")) == {176: b"\x01"}


@pytest.mark.parametrize(
    ("code", "value", "getter"),
    [
        (53, b"", o.message_type),
        (53, b"\x01\x02", o.message_type),
        (53, b"\x63", o.message_type),
        (54, b"\x01\x02\x03", o.server_id),
        (50, b"\x01\x02\x03\x04\x05", o.requested_ip),
        (57, b"\x01", o.max_message_size),
        (60, b"\xff\xfe", o.vendor_class),
        (61, b"\x01", o.client_id),
        (93, b"\x00", o.client_arches),
        (93, b"", o.client_arches),
        (94, b"\x01\x02", o.client_ndi),
        (97, b"\x01" + b"\x00" * 16, o.client_guid),
        (97, b"\x00" * 9, o.client_guid),
        (43, b"\x06\x05\x01", o.pxe_vendor_options),
        (175, b"\xb0", o.ipxe_options),
    ],
)
def test_malformed_option_reasons(code: int, value: bytes, getter: object) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        getter(DhcpPacket(options={code: value}))  # type: ignore[operator]
    assert info.value.reason == f"bad-option-{code}"


GETTERS = [o.message_type, o.server_id, o.requested_ip, o.max_message_size, o.vendor_class, o.client_id,
           o.hostname, o.tftp_server_name, o.bootfile_name, o.user_classes, o.client_arches, o.client_ndi,
           o.client_guid, o.pxe_vendor_options, o.ipxe_options, o.parameter_list]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([12, 43, 50, 53, 54, 55, 57, 60, 61, 66, 67, 77, 93, 94, 97, 175]), st.binary(max_size=40))
def test_fuzz_getters_only_raise_protocol_error(code: int, value: bytes) -> None:
    p = DhcpPacket(options={code: value})
    for getter in GETTERS:
        try:
            getter(p)  # type: ignore[operator]
        except RemoteProtocolError:
            pass


def test_golden_ipxe_options() -> None:
    p = golden_packet("ipxe-bios-c2s-discover-ipxe-1")
    ipxe = o.ipxe_options(p)
    assert ipxe is not None and o.IPXE_BUS_ID in ipxe  # iPXE announces features and its bus id
    assert o.user_classes(p) == [b"iPXE"]
    assert o.IPXE_ENCAP in o.parameter_list(p)
    assert o.client_ndi(p) == (1, 2, 1)
