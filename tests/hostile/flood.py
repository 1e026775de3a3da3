"""Hostile traffic for a running bootd: malformed, truncated, oversized and out-of-order datagrams.

    python tests/hostile/flood.py SERVER_IP COUNT SECONDS [SEED]

Sends about COUNT DHCP and COUNT TFTP datagrams (crafted with scapy, then mutated), and a few
hundred malformed HTTP requests, paced and bounded by SECONDS.  Prints one JSON line with what it
sent.  Run it only inside a network namespace that the test created.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.packet import fuzz

MESSAGE_TYPES = ["discover", "offer", "request", "decline", "ack", "nak", "release", "inform"]


def dhcp_templates(rng: random.Random) -> list[bytes]:
    out: list[bytes] = []
    for i in range(400):
        mac = bytes((0x02, 0xBD, rng.randrange(256), rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        opts: list[object] = [("message-type", rng.choice(MESSAGE_TYPES))]
        if rng.random() < 0.5:
            opts.append(("vendor_class_id", rng.choice([b"PXEClient:Arch:00000:UNDI:002001",
                                                        b"PXEClient:Arch:00007:UNDI:003016", b"HTTPClient", b"x" * 200,
                                                        b"PXEClient:Arch:99999:UNDI"])))
        if rng.random() < 0.4:
            opts.append(("requested_addr", f"10.78.{rng.randrange(256)}.{rng.randrange(256)}"))
        if rng.random() < 0.4:
            opts.append(("server_id", rng.choice(["10.78.0.1", "10.78.0.9", "0.0.0.0"])))
        if rng.random() < 0.3:
            opts.append((77, rng.choice([b"iPXE", b"", b"\x00" * 40])))
        if rng.random() < 0.3:
            opts.append((93, rng.randbytes(rng.choice([0, 1, 2, 3]))))
        if rng.random() < 0.3:
            opts.append((175, rng.randbytes(rng.randrange(0, 30))))
        if rng.random() < 0.2:
            opts.append((52, bytes((rng.randrange(0, 5),))))
        opts.append("end")
        pkt = BOOTP(op=rng.choice([1, 1, 1, 2]), chaddr=mac, xid=rng.randrange(1 << 32),
                    giaddr=rng.choice(["0.0.0.0", "0.0.0.0", "10.78.0.7", "192.0.2.1"]),
                    ciaddr=rng.choice(["0.0.0.0", "10.78.1.5"]), hlen=rng.choice([6, 6, 6, 0, 16, 200]),
                    flags=rng.choice([0, 0x8000])) / DHCP(options=opts)
        out.append(bytes(pkt))
        if i % 8 == 0:
            out.append(bytes(fuzz(BOOTP(op=1) / DHCP(options=[("message-type", "discover"), "end"]))))
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    buf = bytearray(data)
    if kind == 0 and buf:  # truncated
        return bytes(buf[: rng.randrange(len(buf))])
    if kind == 1:  # flipped bytes
        for _ in range(rng.randrange(1, 12)):
            if buf:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    if kind == 2:  # oversized: junk tail, sometimes beyond the MTU (fragmented UDP)
        return bytes(buf) + rng.randbytes(rng.choice([100, 1200, 4000, 9000]))
    if kind == 3:  # option lengths that overrun the packet
        if len(buf) > 245:
            buf[241] = 255
        return bytes(buf)
    if kind == 4:  # pure noise
        return rng.randbytes(rng.randrange(0, 600))
    return bytes(buf)  # as crafted


def tftp_packets(rng: random.Random) -> list[bytes]:
    names = [b"undionly.kpxe", b"../../../etc/passwd", b"/etc/shadow", b"..%2f..%2fetc%2fpasswd", b"a" * 3000,
             b"snponly.efi", b"", b"\xff\xfe", b"dir/../../x", b"/proc/self/environ", b"nbp\x00junk"]
    modes = [b"octet", b"netascii", b"mail", b"OCTET", b"", b"x" * 100]
    out: list[bytes] = []
    for _ in range(600):
        op = rng.choice([1, 1, 1, 2, 3, 4, 5, 6, 0, 7, 65535])
        if op in (1, 2):
            body = rng.choice(names) + b"\0" + rng.choice(modes) + b"\0"
            for _ in range(rng.randrange(0, 5)):
                body += rng.choice([b"blksize", b"tsize", b"timeout", b"windowsize", b"x" * 50]) + b"\0"
                body += rng.choice([b"0", b"8", b"65464", b"99999999999", b"-1", b"abc", b""]) + b"\0"
            if rng.random() < 0.2:
                body = body[:-1]  # not NUL-terminated
            out.append(struct.pack("!H", op) + body)
        else:
            out.append(struct.pack("!HH", op, rng.randrange(65536)) + rng.randbytes(rng.randrange(0, 1500)))
    return out


BAD_HTTP = [
    b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /stage1/..%2f..%2fbootd.sqlite HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /stage1/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /nbp/..%252f..%252fetc%252fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /chunks/zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /chunks/" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\nRange: bytes=99999999-1\r\n\r\n",
    b"GET /boot/not-a-mac.ipxe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/v1/nodes/n0000/events HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{{{{{",
    b"POST /api/v1/nodes/n0000/events HTTP/1.1\r\nHost: x\r\nX-Bootd-Token: 00\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /api/v1/nodes/n0000 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"a" * 20000 + b"\r\n\r\n",
    b"BREW /pot HTCPCP/1.0\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,
    b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


def http_probe(server: str, rng: random.Random, count: int) -> dict[str, int]:
    statuses: dict[str, int] = {}
    for i in range(count):
        payload = BAD_HTTP[i % len(BAD_HTTP)] if i < len(BAD_HTTP) * 4 else rng.randbytes(rng.randrange(1, 400))
        try:
            with socket.create_connection((server, 8080), timeout=5) as s:
                s.sendall(payload)
                reply = s.recv(64)
        except OSError:
            reply = b""
        key = reply[9:12].decode(errors="replace") if reply.startswith(b"HTTP/") else "closed"
        statuses[key] = statuses.get(key, 0) + 1
    return statuses


def main() -> None:
    server, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    rng = random.Random(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    until = time.monotonic() + seconds
    dhcp = dhcp_templates(rng)
    tftp = tftp_packets(rng)
    sent = {"dhcp": 0, "tftp": 0, "tftp_out_of_order": 0, "bytes": 0}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # A real transfer to poke with out-of-order ACKs, errors and junk on its own TID.
    transfer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    transfer.settimeout(0.5)
    tid: tuple[str, int] | None = None
    i = 0
    while (sent["dhcp"] < count or sent["tftp"] < count) and time.monotonic() < until:
        for _ in range(50):
            if sent["dhcp"] < count:
                data = mutate(rng.choice(dhcp), rng)
                dest = (server if rng.random() < 0.8 else "255.255.255.255", 67)
                try:
                    udp.sendto(data, dest)
                    sent["dhcp"] += 1
                    sent["bytes"] += len(data)
                except OSError:
                    pass
            if sent["tftp"] < count:
                data = mutate(rng.choice(tftp), rng) if rng.random() < 0.3 else rng.choice(tftp)
                try:
                    udp.sendto(data, (server, 69))
                    sent["tftp"] += 1
                    sent["bytes"] += len(data)
                except OSError:
                    pass
        i += 1
        if i % 40 == 0:
            if tid is None:
                transfer.sendto(b"\0\x01undionly.kpxe\0octet\0blksize\x001024\0", (server, 69))
                try:
                    _, tid = transfer.recvfrom(70000)
                except OSError:
                    tid = None
            else:
                for _ in range(20):
                    block = rng.randrange(65536)
                    kind = rng.random()
                    data = (struct.pack("!HH", 4, block) if kind < 0.7 else
                            struct.pack("!HH", 5, 0) + b"x\0" if kind < 0.75 else rng.randbytes(rng.randrange(1, 60)))
                    transfer.sendto(data, tid)
                    sent["tftp_out_of_order"] += 1
                if rng.random() < 0.1:
                    tid = None
        time.sleep(0.002)
    udp.close()
    transfer.close()
    sent["http"] = len(BAD_HTTP) * 4 + 200
    statuses = http_probe(server, rng, sent["http"])
    print(json.dumps({"sent": sent, "http_statuses": statuses}))


if __name__ == "__main__":
    main()
