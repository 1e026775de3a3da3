#!/usr/bin/env python3
"""Capture golden DHCP packets from real clients (run as root; regenerates tests/data/dhcp/*.bin).

Why this exists: the classifier must be tested against what firmware really sends, not against
what we think it sends. Each scenario gets its own network namespace ``bd-dhcp-<pid>-cap`` with a
veth pair (or a tap for QEMU) that is created inside the namespace, a dnsmasq full-DHCP+TFTP server
so the client gets far enough to send a REQUEST, and an AF_PACKET socket that keeps every UDP
payload on ports 67/68/4011. Everything is deleted afterwards, also on failure.

Usage: capture.py [--out DIR] [scenario ...]   scenarios: udhcpc dhclient ipxe-bios ipxe-uefi edk2-pxe
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent
NS = f"bd-dhcp-{os.getpid()}-cap"
SERVER_IP = "10.99.0.1"
CLIENT_MACS = {"udhcpc": "52:54:00:99:00:3c", "dhclient": "52:54:00:99:00:12"}
MSG = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak", 7: "release", 8: "inform"}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, check=check, capture_output=True)


def nsexec(*args: str) -> list[str]:
    return ["ip", "netns", "exec", NS, *args]


def msgtype(payload: bytes) -> str:
    i = 240
    while i < len(payload):
        code = payload[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= len(payload):
            break
        ln = payload[i + 1]
        if code == 53 and ln == 1:
            return MSG.get(payload[i + 2], "unknown")
        i += 2 + ln
    return "bootp"


_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """os.setns only exists from Python 3.12; the namespace switch is needed to bind AF_PACKET there."""
    if _libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns failed")


def capture(ifname: str, client: list[str], seconds: float, want: set[str]) -> list[tuple[str, bytes]]:
    """Run ``client`` in the namespace while sniffing ``ifname``; stop once ``want`` were all seen."""
    pid_ns = os.open(f"/run/netns/{NS}", os.O_RDONLY)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    setns(pid_ns)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        sock.bind((ifname, 0))
    finally:
        setns(own)
        os.close(pid_ns)
        os.close(own)
    proc = subprocess.Popen(client, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([sock], [], [], 0.2)
            if not r:
                continue
            frame = sock.recv(65535)
            if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            sport, dport = struct.unpack("!HH", frame[udp : udp + 4])
            if {sport, dport} & {67, 68, 4011} and dport in (67, 68, 4011):
                payload = frame[udp + 8 :]
                kind = msgtype(payload)
                direction = "c2s" if payload[0] == 1 else "s2c"
                if direction == "c2s" and b"\x4d\x04iPXE" in payload:
                    kind += "-ipxe"
                seen.append((f"{direction}-{kind}", payload))
                print(f"  {direction} {kind} {len(payload)} bytes {sport}->{dport}", flush=True)
            got = {k for k, _ in seen}
            if want <= got:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        sock.close()
    return seen


def dnsmasq(ifname: str, tftp_root: str, workdir: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(nsexec(
        "dnsmasq", "--keep-in-foreground", "--no-daemon", "--port=0", "--no-resolv", "--no-hosts",
        f"--interface={ifname}", "--bind-interfaces", "--dhcp-range=10.99.0.100,10.99.0.200,255.255.255.0,1h",
        "--no-ping", "--dhcp-authoritative", f"--dhcp-leasefile={workdir}/leases", f"--pid-file={workdir}/pid",
        "--enable-tftp", f"--tftp-root={tftp_root}", "--user=root",
        "--dhcp-match=set:ipxe,175", "--dhcp-userclass=set:ipxe,iPXE",
        "--dhcp-match=set:efi64,option:client-arch,7",
        "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
        "--dhcp-boot=tag:!ipxe,tag:efi64,snponly.efi",
        "--dhcp-boot=tag:ipxe,http://10.99.0.1:9/none.ipxe",
        "--dhcp-option=tag:ipxe,encap:175,176,1",
    ), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def scenario(name: str) -> list[tuple[str, bytes]]:
    work = tempfile.mkdtemp(prefix="bd-dhcp-cap-")
    os.chmod(work, 0o755)
    sh("ip", "netns", "add", NS)
    srv: subprocess.Popen[bytes] | None = None
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        qemu = name.startswith(("ipxe", "edk2"))
        if qemu:
            srv_if = "tap0"
            sh("ip", "-n", NS, "tuntap", "add", "tap0", "mode", "tap")
        else:
            srv_if = "vsrv"
            sh("ip", "-n", NS, "link", "add", "vsrv", "type", "veth", "peer", "name", "vcli")
            mac = CLIENT_MACS[name]  # the unit tests pin these
            sh("ip", "-n", NS, "link", "set", "vcli", "address", mac)
            sh("ip", "-n", NS, "link", "set", "vcli", "up")
        sh("ip", "-n", NS, "addr", "add", f"{SERVER_IP}/24", "dev", srv_if)
        sh("ip", "-n", NS, "link", "set", srv_if, "up")
        tftp = Path(work) / "tftp"
        tftp.mkdir()
        for f in ("undionly.kpxe", "snponly.efi"):
            shutil.copy(f"/usr/lib/ipxe/{f}", tftp / f)
        os.chmod(tftp, 0o755)
        srv = dnsmasq(srv_if, str(tftp), work)
        time.sleep(0.5)
        want = {"c2s-discover", "c2s-request", "s2c-ack"}
        want_ipxe = {"c2s-discover-ipxe", "c2s-request-ipxe", "s2c-ack"}
        if name == "udhcpc":
            client = nsexec("busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-i", "vcli", "-s", "/bin/true",
                            "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")
            return capture(srv_if, client, 20, want)
        if name == "dhclient":
            client = nsexec("dhclient", "-d", "-1", "-v", "-sf", "/bin/true", "-lf", f"{work}/dhclient.leases",
                            "-pf", f"{work}/dhclient.pid", "vcli")
            return capture(srv_if, client, 20, want)
        base = ["timeout", "-k", "5", "120", "ip", "netns", "exec", NS, "qemu-system-x86_64", "-accel", "tcg",
                "-m", "256", "-smp", "1", "-nographic", "-monitor", "none", "-serial", "null", "-no-reboot",
                "-boot", "order=n,reboot-timeout=0", "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]
        if name == "ipxe-bios":
            client = [*base, "-device",
                      "virtio-net-pci,netdev=n0,mac=52:54:00:99:01:01"]  # QEMU's default ROM: iPXE
            return capture(srv_if, client, 60, want_ipxe)
        if name == "ipxe-uefi":
            client = [*base, "-bios", "/usr/share/ovmf/OVMF.fd", "-device",
                      "virtio-net-pci,netdev=n0,mac=52:54:00:99:01:02,romfile=/usr/lib/ipxe/qemu/efi-virtio.rom"]
            return capture(srv_if, client, 90, want_ipxe)
        if name == "edk2-pxe":
            # romfile= (empty): no iPXE ROM, so EDK2's VirtioNetDxe + PxeBcDxe do PXE; after TFTP of
            # snponly.efi, iPXE (EFI, via SNP) asks DHCP again with user class iPXE.
            client = [*base, "-bios", "/usr/share/ovmf/OVMF.fd", "-device",
                      "virtio-net-pci,netdev=n0,mac=52:54:00:99:01:03,romfile="]
            return capture(srv_if, client, 120, want | want_ipxe)
        raise SystemExit(f"unknown scenario {name}")
    finally:
        if srv is not None:
            srv.terminate()
            srv.wait()
        sh("ip", "netns", "del", NS, check=False)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    args = sys.argv[1:]
    out = OUT
    if args[:1] == ["--out"]:
        out, args = Path(args[1]), args[2:]
    names = args or ["udhcpc", "dhclient", "ipxe-bios", "ipxe-uefi", "edk2-pxe"]
    for name in names:
        print(f"== {name}", flush=True)
        packets = scenario(name)
        counts: dict[str, int] = {}
        for kind, payload in packets:
            counts[kind] = counts.get(kind, 0) + 1
            if counts[kind] > 3:
                continue
            (out / f"{name}-{kind}-{counts[kind]}.bin").write_bytes(payload)


if __name__ == "__main__":
    main()
