#!/usr/bin/env python3
"""The floor of a CPython DHCP server on this machine: the least work any Python implementation of bootd's
DHCP answer must do, and nothing else, so bench/dhcp can show what capacity CPython itself allows here.

What it does per exchange, and why each step is unavoidable for bootd: receive the DISCOVER and REQUEST
(recvfrom, read in batches of up to 64 per wake-up, as bootd does), read the few fields a reply needs
(xid, chaddr, giaddr, message type, requested address), send the OFFER and the ACK (sendto), and make the
lease durable before its ACK: one INSERT into a SQLite file in WAL mode with ``synchronous = NORMAL``, one
COMMIT per batch (group commit), exactly bootd's durability. What it leaves out, everything bootd also does:
asyncio, the registry (first-contact registration, names, the lifecycle), address allocation beyond a
counter, option parsing and validation, boot options, metrics, the checks that refuse bad requests. It is
not a server anyone should run: it trusts every packet.

``--memory``: no SQLite at all (the lease kept in a dict), to show what the durable write costs.

``--register``: bootd's durable work as well, in bootd's own schema (bootd.store.sqlite.MIGRATIONS, its tables and
indexes): a new client's node row and its first event, committed before its OFFER; the lease and the node's address
before the ACK; one COMMIT per batch for all of it, in multi-row statements (bootd's _rows). Still no registry checks,
names from a counter, no lifecycle: what is left between it and bootd is bootd's Python, not its writes.

Usage (bench/dhcp/run.py runs it as the server "floor", "floor-mem" or "floor-reg"):
    python bench/dhcp/floor.py --listen 10.80.0.1 --interface eth0 --db /tmp/x/floor.sqlite [--memory | --register]
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sqlite3
import struct
import sys
import time
from pathlib import Path

READ_BATCH = 64
COOKIE = b"\x63\x82\x53\x63"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--interface", default="")
    ap.add_argument("--db", required=True)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--register", action="store_true", help="register every new client as bootd does (see above)")
    ap.add_argument("--pool", default="10.80.1.0", help="first address handed out")
    args = ap.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # bootd's receive buffer (net/dhcp.py RCVBUF): a batch's wait is not a drop for one and a drop for the other.
    sock.setsockopt(socket.SOL_SOCKET, 33, 4 * 1024 * 1024)  # SO_RCVBUFFORCE (root)
    if args.interface:
        sock.setsockopt(socket.SOL_SOCKET, 25, args.interface.encode())  # SO_BINDTODEVICE
    sock.bind((args.listen, 67))
    sock.setblocking(False)
    db: sqlite3.Connection | None = None
    if not args.memory:
        db = sqlite3.connect(args.db, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        if args.register:
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from bootd.store.sqlite import MIGRATIONS, _rows

            for migration in MIGRATIONS:
                db.executescript(migration)
            db.execute("INSERT INTO groups(name) VALUES ('default')")
        else:
            db.execute("CREATE TABLE IF NOT EXISTS leases(ip TEXT PRIMARY KEY, mac TEXT UNIQUE, expires REAL)")
    nodes: dict[bytes, int] = {}  # chaddr -> node id (--register)
    server = socket.inet_aton(args.listen)
    first = struct.unpack("!I", socket.inet_aton(args.pool))[0]
    given: dict[bytes, bytes] = {}  # chaddr -> address (the pool index)
    leases: dict[bytes, bytes] = {}
    common = (b"\x36\x04" + server + b"\x33\x04\x00\x00\x0e\x10\x01\x04\xff\xff\x00\x00"
              b"\x03\x04" + server + b"\xff")
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    while not stop:
        if not poller.poll(0.5):
            continue
        replies: list[tuple[bytes, tuple[str, int]]] = []
        writes: list[tuple[str, str, float]] = []
        new: list[tuple[object, ...]] = []
        now = time.time()
        for _ in range(READ_BATCH):
            try:
                data, _ = recvfrom(4096)
            except BlockingIOError:
                break
            if len(data) < 243 or data[0] != 1 or data[236:240] != COOKIE or data[240] != 53:
                continue
            mtype = data[242]
            chaddr = data[28:44]
            ip = given.get(chaddr)
            if ip is None:
                ip = given[chaddr] = struct.pack("!I", first + len(given))
            if mtype == 1:
                reply_type = b"\x35\x01\x02"
                if args.register and chaddr not in nodes:
                    nid = nodes[chaddr] = len(nodes) + 1
                    mac = chaddr[:6].hex(":")
                    new.append((nid, mac, f"n{nid:05d}", nid, "default", 1, "discovered", now, now, now))
            elif mtype == 3:
                reply_type = b"\x35\x01\x05"
                mac = chaddr[:6].hex(":")
                if db is None:
                    leases[chaddr] = ip
                else:
                    writes.append((socket.inet_ntoa(ip), mac, 3600.0))
            else:
                continue
            giaddr = data[24:28]
            head = b"\x02" + data[1:8] + b"\x00\x00" + data[10:12] + b"\x00\x00\x00\x00" + ip + server + giaddr
            body = head + data[28:236] + COOKIE + reply_type + common
            relayed = giaddr != b"\x00\x00\x00\x00"
            replies.append((body, (socket.inet_ntoa(giaddr), 67) if relayed else ("255.255.255.255", 68)))
        if args.register and (writes or new) and db is not None:
            db.execute("BEGIN IMMEDIATE")
            if new:
                _rows(db, "INSERT INTO nodes(id, mac, name, idx, grp, approved, state, state_since, first_contact,"
                      " last_contact)", 10, new)
                _rows(db, "INSERT INTO events(node_id, ts, state, reason)", 4,
                      [(row[0], now, "discovered", "first contact") for row in new])
            if writes:
                _rows(db, "INSERT INTO leases(ip, mac, expires, hostname)", 4, [(*w, None) for w in writes],
                      "ON CONFLICT(mac) DO UPDATE SET ip = excluded.ip, expires = excluded.expires")
                _rows(db, "UPDATE nodes SET ip = v.column1 FROM (", 2, [(ip, mac) for ip, mac, _ in writes],
                      ") AS v WHERE nodes.mac = v.column2")
            db.execute("COMMIT")  # bootd's first contacts, leases and addresses, before any reply of the batch
        elif writes and db is not None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR REPLACE INTO leases(ip, mac, expires) VALUES (?, ?, ?)", writes)
            db.execute("COMMIT")  # durable as bootd's: in the WAL before any ACK of the batch is sent
        for body, dest in replies:
            try:
                sendto(body, dest)
            except BlockingIOError:
                pass
    if db is not None:
        db.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
