"""Who is asking: firmware kind, iPXE or not, PXE or plain DHCP.

Decided from the packet alone (no configuration), so every real client's
golden capture pins the answer down in a unit test.

Firmware quirks this has to live with (all seen on real hardware or in
iPXE/EDK2/dnsmasq sources):

- Option 93 is the authority for the architecture (RFC 4578, IANA "Processor
  Architecture Types"). x64 UEFI is 7 ("EFI BC") on EDK2 and iPXE, but some
  vendors send 9 ("EFI x86-64" in RFC 4578's original table): both mean x64.
- Some ROMs omit option 93 and only put the arch into the vendor class
  ``PXEClient:Arch:00007:UNDI:003016``; that is the fallback.
- iPXE sends user class "iPXE" *without* RFC 3004 length framing, and also
  option 175; either one marks iPXE (a chainloaded iPXE built without
  the user class still sends 175).
- UEFI HTTP boot announces itself with vendor class ``HTTPClient:...`` and
  expects an http:// URL and option 60 "HTTPClient" echoed in the offer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from bootd.model import Firmware, Machine, normalize_mac
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import BOOTREQUEST, DhcpPacket

ARCH_FIRMWARE: dict[int, Firmware] = {
    0: Firmware.BIOS,
    6: Firmware.UEFI_IA32,
    7: Firmware.UEFI_X64,
    9: Firmware.UEFI_X64,
    11: Firmware.UEFI_ARM64,
    15: Firmware.UEFI_HTTP,  # x86 UEFI HTTP
    16: Firmware.UEFI_HTTP,  # x64 UEFI HTTP
    19: Firmware.UEFI_HTTP,  # arm64 UEFI HTTP
}
ARM64_ARCHES: Final = frozenset({11, 19})


@dataclass(frozen=True, slots=True)
class Ignore:
    """The packet is not one we answer; ``reason`` is the counter label, ``detail`` goes to the log."""

    reason: str
    detail: str = ""


# Not frozen: built per packet, and frozen costs an object.__setattr__ per field. init=False: a hand-written __init__
# compiles (tools/compile.py, mypyc); a dataclass's generated one stays interpreted.
@dataclass(slots=True, init=False)
class Client:
    """A classified request: the ``Machine`` for the registry plus what the reply must mirror."""

    machine: Machine
    msg_type: o.MessageType
    vendor_class: str | None
    pxe: bool  # a network-boot firmware (PXEClient / HTTPClient / option 93) or iPXE
    http: bool  # UEFI HTTP boot

    def __init__(self, machine: Machine, msg_type: o.MessageType, vendor_class: str | None, pxe: bool,
                 http: bool) -> None:
        self.machine = machine
        self.msg_type = msg_type
        self.vendor_class = vendor_class
        self.pxe = pxe
        self.http = http


def _arch_from_vendor_class(vc: str) -> int | None:
    # "PXEClient:Arch:00007:UNDI:003016" / "HTTPClient:Arch:00016:UNDI:003001"
    parts = vc.split(":")
    if len(parts) >= 3 and parts[1] == "Arch" and parts[2].isascii() and parts[2].isdigit():
        return int(parts[2])
    return None


def classify(packet: DhcpPacket) -> Client | Ignore:
    """Classify a client request. Malformed options raise RemoteProtocolError (counted by the caller)."""
    if packet.op != BOOTREQUEST:
        return Ignore("not-request", f"op {packet.op} is a reply")
    if packet.htype != 1 or packet.hlen != 6:
        return Ignore("not-ethernet", f"htype {packet.htype} hlen {packet.hlen}")
    msg_type = o.message_type(packet)
    if msg_type is None:
        return Ignore("bootp", "plain BOOTP (no option 53) is not served")
    raw = packet.chaddr[:6]
    # The C formatter straight away for the usual 6 bytes (normalize_mac's checks cost as much again, per packet).
    mac = raw.hex(":") if len(raw) == 6 else normalize_mac(raw)
    opts = packet.options
    # Each accessor only when its option is there: a plain client (an OS's DHCP client renewing) sends none of them.
    vc = o.vendor_class(packet) if o.VENDOR_CLASS in opts else None
    arches = o.client_arches(packet) if o.CLIENT_ARCH in opts else []
    arch = arches[0] if arches else (_arch_from_vendor_class(vc) if vc else None)
    ipxe = (o.USER_CLASS in opts and b"iPXE" in o.user_classes(packet)) or o.IPXE_ENCAP in opts
    http = bool(vc and vc.startswith("HTTPClient"))
    pxe_vc = bool(vc and vc.startswith("PXEClient"))
    if http:
        firmware = Firmware.UEFI_HTTP
    elif arch is not None:
        firmware = ARCH_FIRMWARE.get(arch, Firmware.UNKNOWN)
    else:
        firmware = Firmware.UNKNOWN
    machine = Machine(mac, arch, firmware, ipxe, o.client_guid(packet) if o.CLIENT_GUID in opts else None)
    pxe = http or pxe_vc or ipxe or bool(arches)
    return Client(machine, msg_type, vc, pxe, http)
