"""One fuzz target for the TFTP codec and read session, shared by hypothesis and atheris.

Contract under test: whatever bytes arrive, the codec raises nothing but
RemoteProtocolError, and a session never raises, never sends more than a
window at once, and always ends within its retry budget once time runs on.
"""

from __future__ import annotations

from bootd.errors import RemoteProtocolError
from bootd.proto.tftp.packet import Opcode, Request, parse_packet
from bootd.proto.tftp.session import MemorySource, ReadSession, SessionLimits

LIMITS = SessionLimits(timeout=1.0, retries=3, max_blksize=1468, max_windowsize=8)


def codec(data: bytes) -> None:
    try:
        parse_packet(data)
    except RemoteProtocolError:
        pass


def session(request_bytes: bytes, file_size: int, datagrams: list[bytes], steps: list[float]) -> None:
    try:
        pkt = parse_packet(request_bytes)
    except RemoteProtocolError:
        return
    if not isinstance(pkt, Request) or pkt.opcode != Opcode.RRQ:
        return
    try:
        s = ReadSession(pkt, MemorySource(bytes(range(256)) * (file_size // 256 + 1)), now=0.0, limits=LIMITS)
    except RemoteProtocolError:
        return  # refused modes raise RemoteProtocolError by contract
    now = 0.0
    window = s.windowsize
    for i, data in enumerate(datagrams):
        now += steps[i % len(steps)] if steps else 0.1
        s.receive_datagram(data, now)
        s.handle_timer(now)
        out = s.datagrams_to_send(now)
        assert len(out) <= window + 1, f"{len(out)} datagrams at once with windowsize {window}"
    # With nobody answering, the session must give up within its retry budget.
    for _ in range(LIMITS.retries + 2):
        timer = s.get_timer()
        if timer is None:
            break
        now = max(now, timer)
        s.handle_timer(now)
        s.datagrams_to_send(now)
    assert s.finished, f"session still {s.state} after its retries ran out"
