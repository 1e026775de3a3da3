"""A model TFTP receiver and a lossy in-memory link for driving ReadSession without sockets.

The receiver follows RFC 1350/7440 as the real clients do: ACK at the end of a
window, at the last (short) block, and on any out-of-order or duplicate block
it re-ACKs the last block it has in order (which is what provokes the
sorcerer's apprentice in naive servers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bootd.proto.tftp.packet import ErrorPacket, OAck, encode_ack, parse_packet
from bootd.proto.tftp.session import ReadSession


class Receiver:
    def __init__(self) -> None:
        self.blksize = 512
        self.windowsize = 1
        self.data = bytearray()
        self.last = 0  # absolute number of the last in-order block
        self.in_window = 0
        self.done = False
        self.oack: dict[str, str] | None = None
        self.error: ErrorPacket | None = None

    def handle(self, dg: bytes) -> list[bytes]:
        op = dg[1]
        if op == 6:
            pkt = parse_packet(dg)
            assert isinstance(pkt, OAck)
            self.oack = pkt.options
            self.blksize = int(pkt.options.get("blksize", 512))
            self.windowsize = int(pkt.options.get("windowsize", 1))
            return [encode_ack(0)]
        if op == 5:
            err = parse_packet(dg)
            assert isinstance(err, ErrorPacket)
            self.error = err
            return []
        assert op == 3, f"unexpected opcode {op}"
        block = (dg[2] << 8) | dg[3]
        if not self.done and block == (self.last + 1) & 0xFFFF:
            payload = dg[4:]
            assert len(payload) <= self.blksize
            self.data += payload
            self.last += 1
            self.in_window += 1
            if len(payload) < self.blksize:
                self.done = True
                return [encode_ack(self.last)]
            if self.in_window >= self.windowsize:
                self.in_window = 0
                return [encode_ack(self.last)]
            return []
        self.in_window = 0
        return [encode_ack(self.last)]


@dataclass
class Trace:
    sent: list[tuple[int, int]] = field(default_factory=list)  # (opcode, wire block or error code)
    now: float = 0.0
    timeouts: int = 0

    def data_blocks(self) -> list[int]:
        return [b for op, b in self.sent if op == 3]


Filter = Callable[[bytes, int], bool]  # (datagram, how many such datagrams seen so far) -> drop?


def drive(
    session: ReadSession,
    rx: Receiver,
    *,
    now: float = 0.0,
    drop_data: Filter | None = None,
    drop_ack: Filter | None = None,
    dup_ack: bool = False,
    max_rounds: int = 10_000_000,
) -> Trace:
    """Run the transfer to its end over a link that may drop DATA or ACKs or duplicate ACKs."""
    trace = Trace(now=now)
    n_data = n_ack = 0
    for _ in range(max_rounds):
        out = session.datagrams_to_send(trace.now)
        if not out:
            if session.finished:
                break
            deadline = session.get_timer()
            assert deadline is not None, "session is stalled: nothing to send and no timer"
            assert deadline > trace.now
            trace.now = deadline
            trace.timeouts += 1
            session.handle_timer(trace.now)
            continue
        for dg in out:
            trace.sent.append((dg[1], (dg[2] << 8) | dg[3]))
            if dg[1] == 3:
                n_data += 1
                if drop_data is not None and drop_data(dg, n_data):
                    continue
            for ack in rx.handle(dg):
                n_ack += 1
                if drop_ack is not None and drop_ack(ack, n_ack):
                    continue
                session.receive_datagram(ack, trace.now)
                if dup_ack:
                    session.receive_datagram(ack, trace.now)
    else:  # pragma: no cover
        raise AssertionError("transfer did not end")
    return trace
