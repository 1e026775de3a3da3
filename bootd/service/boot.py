"""Which boot file a machine gets (the contract's "DHCP boot decisions").

A pure decision over the classified ``Machine`` and its ``Node``: no I/O, so
DHCP (and anything else that needs the answer) can call it per packet.

Per-node overrides live in the node's variables (``bootd node set NAME
var.boot.file=...``) because ``Group`` has no free-form fields yet:

- ``boot.file``      replaces the choice for every non-iPXE stage (TFTP name or URL);
- ``boot.bios_nbp``, ``boot.uefi_nbp``, ``boot.uefi_arm64_nbp`` replace one NBP;
- ``boot.ipxe_url``  replaces the iPXE script URL.
"""

from __future__ import annotations

from dataclasses import dataclass

from bootd.model import BootPlan, Firmware, Machine, Node

ARM64_ARCHES = frozenset({11, 19})


@dataclass(frozen=True, slots=True)
class BootPolicy:
    public_url: str  # base of the HTTP service, e.g. http://10.0.0.1:8080
    next_server: str  # TFTP server address (siaddr)
    bios_nbp: str = "undionly.kpxe"
    uefi_nbp: str = "snponly.efi"
    uefi_arm64_nbp: str = "snponly-arm64.efi"

    def ipxe_url(self, mac: str) -> str:
        return f"{self.public_url.rstrip('/')}/boot/{mac.replace(':', '-')}.ipxe"

    def plan(self, machine: Machine, node: Node | None, *, pxe: bool) -> BootPlan | None:
        """The boot plan, or None when no network boot program fits this firmware.

        ``pxe`` is False for plain DHCP clients (an OS's dhclient, stage one's
        udhcpc); they get the BIOS NBP in the BOOTP ``file`` field, as dnsmasq
        and ISC dhcpd do with a global filename, which they ignore.
        """
        v = node.vars if node is not None else {}
        if machine.ipxe:
            url = v.get("boot.ipxe_url") or self.ipxe_url(machine.mac)
            return BootPlan(url, self.next_server, ipxe_no_proxydhcp=True)
        if "boot.file" in v:
            return BootPlan(v["boot.file"], self.next_server)
        fw = machine.firmware
        if fw is Firmware.UEFI_HTTP:
            arm = machine.arch in ARM64_ARCHES
            nbp = v.get("boot.uefi_arm64_nbp", self.uefi_arm64_nbp) if arm else v.get("boot.uefi_nbp", self.uefi_nbp)
            return BootPlan(f"{self.public_url.rstrip('/')}/nbp/{nbp}", self.next_server)
        if fw is Firmware.BIOS or (fw is Firmware.UNKNOWN and not pxe):
            return BootPlan(v.get("boot.bios_nbp", self.bios_nbp), self.next_server)
        if fw is Firmware.UEFI_X64:
            return BootPlan(v.get("boot.uefi_nbp", self.uefi_nbp), self.next_server)
        if fw is Firmware.UEFI_ARM64:
            return BootPlan(v.get("boot.uefi_arm64_nbp", self.uefi_arm64_nbp), self.next_server)
        # uefi-ia32 (Debian ships no ia32 iPXE) or an architecture we do not know.
        return None
