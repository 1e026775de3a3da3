"""dnsmasq inside the lab: an IPv6 router-advertisement sender, or a whole reference boot server.

iPXE configures DHCPv4 and IPv6 together and waits about 16 s for a router advertisement that never
comes on an IPv4-only lab (notes pitfall 1). An RA-only dnsmasq next to bootd answers that in 0.1 s and
does no DHCPv4 at all (it has no IPv4 range), so it cannot compete with bootd's DHCP.

The reference mode (DHCP + TFTP) is what bootd is compared with in bench/boot and what the stage-one
tests used before ``bootd serve`` existed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bootd.lab.netns import Lab, LabProcess


def dnsmasq_available() -> str | None:
    if shutil.which("dnsmasq") is None:
        return "dnsmasq missing (apt-get install dnsmasq-base)"
    return None


def _base(lab: Lab, tag: str) -> list[str]:
    return [
        "dnsmasq", "--keep-in-foreground",
        "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--port=0",
        f"--interface={lab.bridge}", "--bind-interfaces", "--user=root", "--group=root",
        f"--pid-file={lab.workdir / f'dnsmasq-{tag}.pid'}", "--log-facility=-",
    ]


def start_ra_only(lab: Lab) -> LabProcess:
    """Send IPv6 router advertisements on the lab bridge and nothing else."""
    cmd = [*_base(lab, "ra"), "--enable-ra", f"--dhcp-range=::,constructor:{lab.bridge},ra-only"]
    return lab.spawn("dnsmasq-ra", cmd, pidfile=lab.workdir / "dnsmasq-ra.pid")


def start_reference(
    lab: Lab,
    *,
    http_base: str,
    tftp_root: Path = Path("/usr/lib/ipxe"),
    bios_nbp: str = "undionly.kpxe",
    uefi_nbp: str = "snponly.efi",
    pool: tuple[int, int] = (100, 199),
    log_dhcp: bool = False,
    ipxe_boot: str | None = None,
) -> LabProcess:
    """A complete reference boot server: DHCP (with the iPXE quirks handled), TFTP and RAs.

    iPXE clients get ``ipxe_boot`` (default ``<http_base>/boot.ipxe``); that generic script chains to
    ``/boot/<mac>.ipxe`` itself, because dnsmasq cannot put the client's MAC into the boot file name.
    :func:`write_chain_root` makes a TFTP root whose ``chain.ipxe`` does the same for any HTTP server.
    """
    cmd = [
        *_base(lab, "ref"),
        "--no-ping",  # otherwise +3 s per new client (pitfall 3)
        f"--dhcp-range={lab.host_ip(pool[0])},{lab.host_ip(pool[1])},{lab.netmask},1h",
        "--dhcp-authoritative",
        f"--dhcp-leasefile={lab.workdir / 'dnsmasq.leases'}",
        "--enable-tftp", f"--tftp-root={tftp_root}",
        "--enable-ra", f"--dhcp-range=::,constructor:{lab.bridge},ra-only",
        "--dhcp-match=set:ipxe,175", "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:efi64,option:client-arch,7", "--dhcp-match=set:efi64,option:client-arch,9",
        "--dhcp-option=tag:ipxe,encap:175,176,1",  # no ProxyDHCP wait in iPXE (pitfall 2)
        f"--dhcp-boot=tag:ipxe,{ipxe_boot or http_base + '/boot.ipxe'}",
        f"--dhcp-boot=tag:!ipxe,tag:efi64,{uefi_nbp},,{lab.server_ip}",
        f"--dhcp-boot=tag:!ipxe,tag:!efi64,{bios_nbp},,{lab.server_ip}",
    ]
    if log_dhcp:
        cmd.append("--log-dhcp")
    return lab.spawn("dnsmasq-ref", cmd, pidfile=lab.workdir / "dnsmasq-ref.pid")


def write_chain_root(root: Path, http_base: str, nbp_dir: Path = Path("/usr/lib/ipxe")) -> Path:
    """A TFTP root with the NBPs and ``chain.ipxe``, which sends iPXE to ``<http_base>/boot/<mac>.ipxe``."""
    root.mkdir(parents=True, exist_ok=True)
    for nbp in ("undionly.kpxe", "snponly.efi", "ipxe.efi"):
        if (nbp_dir / nbp).exists():
            shutil.copyfile(nbp_dir / nbp, root / nbp)
    (root / "chain.ipxe").write_text(f"#!ipxe\nchain {http_base}/boot/${{mac:hexhyp}}.ipxe\n")
    root.chmod(0o755)  # dnsmasq's TFTP runs as root here, but keep the tree world-readable anyway
    return root
