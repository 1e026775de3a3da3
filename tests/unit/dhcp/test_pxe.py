"""Classification of real clients from golden captures, and the quirks we rely on."""

from __future__ import annotations

import pytest

from bootd.model import Firmware
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import DhcpPacket
from bootd.proto.dhcp.pxe import Client, Ignore, classify

from .conftest import golden_packet

CASES = [
    # capture, message, mac, arch, firmware, ipxe, pxe
    ("udhcpc-c2s-discover-1", o.MessageType.DISCOVER, "52:54:00:99:00:3c", 0, Firmware.BIOS, False, True),
    ("udhcpc-c2s-request-1", o.MessageType.REQUEST, "52:54:00:99:00:3c", 0, Firmware.BIOS, False, True),
    ("dhclient-c2s-discover-1", o.MessageType.DISCOVER, "52:54:00:99:00:12", None, Firmware.UNKNOWN, False, False),
    ("dhclient-c2s-request-1", o.MessageType.REQUEST, "52:54:00:99:00:12", None, Firmware.UNKNOWN, False, False),
    ("ipxe-bios-c2s-discover-ipxe-1", o.MessageType.DISCOVER, "52:54:00:99:01:01", 0, Firmware.BIOS, True, True),
    ("ipxe-bios-c2s-request-ipxe-1", o.MessageType.REQUEST, "52:54:00:99:01:01", 0, Firmware.BIOS, True, True),
    ("ipxe-uefi-c2s-discover-ipxe-1", o.MessageType.DISCOVER, "52:54:00:99:01:02", 7, Firmware.UEFI_X64, True,
     True),
    ("ipxe-uefi-c2s-request-ipxe-1", o.MessageType.REQUEST, "52:54:00:99:01:02", 7, Firmware.UEFI_X64, True, True),
    ("edk2-pxe-c2s-discover-1", o.MessageType.DISCOVER, "52:54:00:99:01:03", 7, Firmware.UEFI_X64, False, True),
    ("edk2-pxe-c2s-request-1", o.MessageType.REQUEST, "52:54:00:99:01:03", 7, Firmware.UEFI_X64, False, True),
    # iPXE (snponly.efi) loaded by EDK2 asks again, now as iPXE.
    ("edk2-pxe-c2s-discover-ipxe-1", o.MessageType.DISCOVER, "52:54:00:99:01:03", 7, Firmware.UEFI_X64, True,
     True),
]


@pytest.mark.parametrize(("name", "msg", "mac", "arch", "firmware", "ipxe", "pxe"), CASES)
def test_golden_classification(name: str, msg: o.MessageType, mac: str, arch: int | None, firmware: Firmware,
                               ipxe: bool, pxe: bool) -> None:
    result = classify(golden_packet(name))
    assert isinstance(result, Client), result
    assert result.msg_type is msg
    assert result.machine.mac == mac
    assert result.machine.arch == arch
    assert result.machine.firmware is firmware
    assert result.machine.ipxe is ipxe
    assert result.pxe is pxe
    assert not result.http


def test_edk2_sets_broadcast_flag_ipxe_does_not() -> None:
    # Notes 7.4: EDK2 asks for broadcast replies, iPXE and udhcpc do not; we broadcast anyway.
    assert golden_packet("edk2-pxe-c2s-discover-1").broadcast
    assert not golden_packet("ipxe-bios-c2s-discover-ipxe-1").broadcast
    assert not golden_packet("udhcpc-c2s-discover-1").broadcast


def test_server_replies_are_ignored() -> None:
    result = classify(golden_packet("ipxe-bios-s2c-offer-1"))
    assert isinstance(result, Ignore) and result.reason == "not-request"


def test_bootp_and_non_ethernet_ignored() -> None:
    assert classify(DhcpPacket()) == Ignore("bootp", "plain BOOTP (no option 53) is not served")
    r = classify(DhcpPacket(htype=6, options={53: b"\x01"}))
    assert isinstance(r, Ignore) and r.reason == "not-ethernet"


def mk(**opts: bytes) -> Client:
    p = DhcpPacket(chaddr=bytes.fromhex("525400000001"), options={53: b"\x01",
                                                                  **{int(k[1:]): v for k, v in opts.items()}})
    r = classify(p)
    assert isinstance(r, Client)
    return r


def test_arch_fallback_from_vendor_class() -> None:
    c = mk(o60=b"PXEClient:Arch:00007:UNDI:003016")
    assert c.machine.arch == 7 and c.machine.firmware is Firmware.UEFI_X64 and c.pxe


def test_a_non_ascii_digit_in_the_vendor_class_arch_is_no_arch() -> None:
    from bootd.proto.dhcp.pxe import _arch_from_vendor_class

    # Option 60 must be ASCII (options.vendor_class refuses the rest), and the arch parser holds on its own too:
    # "²".isdigit() is True, int("²") raises.
    assert _arch_from_vendor_class("PXEClient:Arch:\u00b2:UNDI:003016") is None
    assert _arch_from_vendor_class("PXEClient:Arch:00007:UNDI:003016") == 7


def test_arch_9_is_x64_too() -> None:
    assert mk(o93=b"\x00\x09").machine.firmware is Firmware.UEFI_X64


def test_arm64_and_ia32() -> None:
    assert mk(o93=b"\x00\x0b").machine.firmware is Firmware.UEFI_ARM64
    assert mk(o93=b"\x00\x06").machine.firmware is Firmware.UEFI_IA32


def test_http_boot() -> None:
    c = mk(o60=b"HTTPClient:Arch:00016:UNDI:003001", o93=b"\x00\x10")
    assert c.http and c.pxe and c.machine.firmware is Firmware.UEFI_HTTP and c.machine.arch == 16


def test_ipxe_by_option_175_alone() -> None:
    assert mk(o175=b"\xb1\x05\x01\x10\xec\x81\x39").machine.ipxe


def test_unknown_arch_is_unknown_firmware_but_pxe() -> None:
    c = mk(o93=b"\x00\x02")
    assert c.machine.firmware is Firmware.UNKNOWN and c.pxe


def test_guid_is_carried() -> None:
    c = mk(o97=b"\x00" + bytes(range(16)))
    assert c.machine.guid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
