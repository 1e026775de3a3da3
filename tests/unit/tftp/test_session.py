"""ReadSession driven with no sockets: options, sizes, loss, duplication, reordering, timers."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd.errors import LocalProtocolError, RemoteProtocolError
from bootd.proto.tftp.packet import ErrorPacket, OAck, Opcode, Request, encode_ack, encode_error, parse_packet
from bootd.proto.tftp.session import MemorySource, ReadSession, SessionLimits, SessionState

from .helpers import Receiver, drive


def rrq(options: dict[str, str] | None = None, mode: str = "octet", name: str = "f") -> Request:
    return Request(Opcode.RRQ, name, mode, options or {})


def blob(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def session(
    data: bytes, options: dict[str, str] | None = None, *, mode: str = "octet", now: float = 0.0, **limits: Any
) -> ReadSession:
    return ReadSession(rrq(options, mode), MemorySource(data), now=now, limits=SessionLimits(**limits))


# ---------------------------------------------------------------- sizes and options


@pytest.mark.parametrize("blksize", [512, 1468, 8192])
@pytest.mark.parametrize("windowsize", [1, 4, 16])
@pytest.mark.parametrize("size_of", ["0", "b-1", "b", "b+1", "3b", "3b+7", "17b"])
def test_file_sizes_arrive_intact_with_no_retransmission(blksize: int, windowsize: int, size_of: str) -> None:
    b = blksize
    size = {"0": 0, "b-1": b - 1, "b": b, "b+1": b + 1, "3b": 3 * b, "3b+7": 3 * b + 7, "17b": 17 * b}[size_of]
    data = blob(size)
    opts = {"blksize": str(blksize), "windowsize": str(windowsize)}
    s = session(data, opts)
    rx = Receiver()
    trace = drive(s, rx)
    assert s.state is SessionState.COMPLETE and s.ok and s.finished
    assert hashlib.sha256(rx.data).digest() == hashlib.sha256(data).digest()
    nblocks = size // blksize + 1  # a multiple of blksize ends with an empty block
    assert trace.data_blocks() == list(range(1, nblocks + 1))
    assert trace.timeouts == 0 and s.retransmits == 0
    assert s.bytes_sent == size and s.blocks_sent == nblocks
    assert s.get_timer() is None


def test_without_options_there_is_no_oack_and_data_starts_at_block_1() -> None:
    s = session(b"hello")
    out = s.datagrams_to_send(0.0)
    assert out == [b"\x00\x03\x00\x01hello"]
    assert s.state is SessionState.SENDING
    s.receive_datagram(encode_ack(1), 0.1)
    assert s.finished and s.ok and s.datagrams_to_send(0.1) == []


def test_oack_carries_negotiated_values_and_ack_0_starts_the_data() -> None:
    data = blob(5000)
    s = session(
        data,
        {"tsize": "0", "blksize": "99999", "timeout": "3", "windowsize": "500", "foo": "1"},
        now=10.0,
        max_blksize=2048,
        max_windowsize=8,
    )
    out = s.datagrams_to_send(10.0)
    assert len(out) == 1
    pkt = parse_packet(out[0])
    assert pkt == OAck({"tsize": "5000", "blksize": "2048", "timeout": "3", "windowsize": "8"})
    assert s.state is SessionState.NEGOTIATING
    assert s.get_timer() == 13.0  # the client's timeout option is honoured
    s.receive_datagram(encode_ack(0), 10.5)
    window = s.datagrams_to_send(10.5)
    assert [(d[2] << 8) | d[3] for d in window] == [1, 2, 3]  # 5000 bytes = 3 blocks of 2048
    assert [len(d) - 4 for d in window] == [2048, 2048, 904]


def test_windowsize_limits_the_datagrams_in_flight() -> None:
    s = session(blob(100 * 512), {"windowsize": "16"})
    s.datagrams_to_send(0.0)  # OACK
    s.receive_datagram(encode_ack(0), 0.0)
    assert len(s.datagrams_to_send(0.0)) == 16
    assert s.datagrams_to_send(0.0) == []  # nothing more until an ACK
    s.receive_datagram(encode_ack(16), 0.0)
    assert [(d[2] << 8) | d[3] for d in s.datagrams_to_send(0.0)] == list(range(17, 33))


def test_unsupported_mode_and_write_requests_are_refused() -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        session(b"x", mode="mail")
    assert exc.value.reason == "bad_mode" and "mail" in str(exc.value)
    with pytest.raises(LocalProtocolError):
        ReadSession(Request(Opcode.WRQ, "f", "octet", {}), MemorySource(b""), now=0.0)


# ---------------------------------------------------------------- block number wrap-around


@pytest.mark.parametrize("windowsize", [1, 16])
def test_more_than_65535_blocks_wrap_to_zero(windowsize: int) -> None:
    blksize = 8
    data = blob(70_000 * blksize + 3)
    s = session(data, {"blksize": "8", "windowsize": str(windowsize)})
    rx = Receiver()
    trace = drive(s, rx)
    assert s.state is SessionState.COMPLETE
    assert bytes(rx.data) == data
    blocks = trace.data_blocks()
    assert len(blocks) == 70_001 and s.retransmits == 0
    assert blocks[65534:65538] == [65535, 0, 1, 2]


def test_wrap_around_survives_loss_at_the_wrap() -> None:
    data = blob(66_000 * 8)
    s = session(data, {"blksize": "8", "windowsize": "4"})
    rx = Receiver()
    # drop the first transmission of the datagrams carrying wire blocks 65535 and 0
    seen: set[int] = set()

    def drop(dg: bytes, _n: int) -> bool:
        b = (dg[2] << 8) | dg[3]
        if rx.last > 60_000 and b in (65535, 0) and b not in seen:
            seen.add(b)
            return True
        return False

    drive(s, rx, drop_data=drop)
    assert bytes(rx.data) == data and s.state is SessionState.COMPLETE and s.retransmits > 0


# ---------------------------------------------------------------- netascii


def test_netascii_converts_line_ends_and_cr() -> None:
    s = session(b"a\nb\r\nc\r", mode="netascii")
    rx = Receiver()
    drive(s, rx)
    assert bytes(rx.data) == b"a\r\nb\r\0\r\nc\r\0"


def test_netascii_across_block_boundaries_with_loss_and_no_tsize() -> None:
    text = b"".join(b"line %d\n" % i for i in range(3000)) + b"bare\rcr\n"
    expected = text.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
    s = session(text, {"blksize": "9", "tsize": "0", "windowsize": "3"}, mode="netascii")
    assert "tsize" not in s.oack  # the converted size is unknown up front, as tftpd-hpa
    rx = Receiver()
    drive(s, rx, drop_data=lambda _dg, n: n % 11 == 0)
    assert bytes(rx.data) == expected
    assert s.retransmits > 0


def test_netascii_exact_multiple_ends_with_empty_block() -> None:
    s = session(b"abcdef\n", {"blksize": "8"}, mode="netascii")  # converts to exactly 8 bytes
    rx = Receiver()
    trace = drive(s, rx)
    assert bytes(rx.data) == b"abcdef\r\n" and trace.data_blocks() == [1, 2]


# ---------------------------------------------------------------- loss, duplication, reordering


@pytest.mark.parametrize("windowsize", [1, 8])
def test_lost_data_is_retransmitted_on_timeout(windowsize: int) -> None:
    data = blob(200 * 512 + 1)
    s = session(data, {"windowsize": str(windowsize)})
    rx = Receiver()
    trace = drive(s, rx, drop_data=lambda _dg, n: n % 7 == 0)
    assert bytes(rx.data) == data and s.state is SessionState.COMPLETE
    assert s.retransmits > 0 and s.bytes_sent == len(data)
    assert trace.timeouts > 0


def test_lost_acks_are_recovered_by_the_timer() -> None:
    data = blob(50 * 512)
    s = session(data)
    rx = Receiver()
    dropped = 0

    def drop(_ack: bytes, n: int) -> bool:
        nonlocal dropped
        dropped += n % 5 == 0
        return n % 5 == 0

    drive(s, rx, drop_ack=drop)
    assert bytes(rx.data) == data and s.state is SessionState.COMPLETE
    assert dropped >= 10 and s.timeouts == dropped  # exactly one retransmission per lost ACK
    assert s.retransmits == dropped


@pytest.mark.parametrize("windowsize", [1, 16])
def test_duplicated_acks_cause_no_extra_data(windowsize: int) -> None:
    data = blob(300 * 512)
    s = session(data, {"windowsize": str(windowsize)})
    rx = Receiver()
    trace = drive(s, rx, dup_ack=True)
    assert bytes(rx.data) == data
    assert len(trace.data_blocks()) == 301  # every block exactly once
    assert s.retransmits == 0 and s.duplicate_acks >= 301 // windowsize


def test_no_sorcerers_apprentice_when_an_ack_is_delayed_past_the_timeout() -> None:
    """RFC 1123 4.2.3.1: the delayed original ACK and the client's re-ACK must not both trigger a send."""
    s = session(blob(40 * 512))
    rx = Receiver()
    now = 0.0
    for block in range(1, 5):  # blocks 1..4 go normally
        (dg,) = s.datagrams_to_send(now)
        assert (dg[2] << 8) | dg[3] == block
        (ack,) = rx.handle(dg)
        s.receive_datagram(ack, now)
    (dg5,) = s.datagrams_to_send(now)
    (delayed,) = rx.handle(dg5)  # ACK 5 is held up in the network past the timeout
    assert s.datagrams_to_send(now) == []
    now = s.get_timer() or 0.0
    s.handle_timer(now)
    (resent,) = s.datagrams_to_send(now)
    assert resent == dg5
    (reack,) = rx.handle(resent)  # the client already has 5: it ACKs 5 again
    assert reack == delayed
    s.receive_datagram(delayed, now)  # the original ACK arrives: block 6 goes out, once
    assert [(d[2] << 8) | d[3] for d in s.datagrams_to_send(now)] == [6]
    s.receive_datagram(reack, now)  # the re-ACK must not send block 6 again
    assert s.datagrams_to_send(now) == []
    assert s.duplicate_acks == 1 and s.retransmits == 1


def test_reordered_acks_in_a_window_are_ignored_when_old() -> None:
    s = session(blob(64 * 512), {"windowsize": "8"})
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_ack(0), 0.0)
    assert len(s.datagrams_to_send(0.0)) == 8
    s.receive_datagram(encode_ack(8), 0.0)
    assert len(s.datagrams_to_send(0.0)) == 8  # 9..16
    s.receive_datagram(encode_ack(5), 0.0)  # late partial ACK from the previous window
    s.receive_datagram(encode_ack(8), 0.0)  # and a duplicate of the window ACK
    assert s.datagrams_to_send(0.0) == []
    assert s.stale_acks == 1 and s.duplicate_acks == 1
    s.receive_datagram(encode_ack(16), 0.0)
    assert [(d[2] << 8) | d[3] for d in s.datagrams_to_send(0.0)] == list(range(17, 25))


def test_partial_ack_restarts_the_window_immediately() -> None:
    """RFC 7440: a client that saw a gap ACKs the last good block; no need to wait for the timer."""
    s = session(blob(64 * 512), {"windowsize": "8"})
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_ack(0), 0.0)
    s.datagrams_to_send(0.0)  # 1..8, block 3 lost
    s.receive_datagram(encode_ack(2), 0.0)
    assert [(d[2] << 8) | d[3] for d in s.datagrams_to_send(0.0)] == list(range(3, 11))
    assert s.retransmits == 6  # 3..8 again


def test_ack_for_a_block_never_sent_is_ignored() -> None:
    s = session(blob(10 * 512))
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_ack(9), 0.0)
    assert s.datagrams_to_send(0.0) == [] and s.stale_acks == 1 and s.state is SessionState.SENDING


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 40 * 64),
    blksize=st.sampled_from([8, 64, 100]),
    windowsize=st.integers(1, 9),
    seed=st.integers(0, 2**32),
    loss=st.floats(0.0, 0.3),
)
def test_random_loss_always_delivers_the_exact_file_or_times_out(
    size: int, blksize: int, windowsize: int, seed: int, loss: float
) -> None:
    rnd = random.Random(seed)
    data = blob(size, seed)
    s = session(data, {"blksize": str(blksize), "windowsize": str(windowsize)}, retries=50)
    rx = Receiver()
    drive(s, rx, drop_data=lambda _d, _n: rnd.random() < loss, drop_ack=lambda _a, _n: rnd.random() < loss)
    if s.state is SessionState.COMPLETE:
        assert bytes(rx.data) == data
    else:
        assert s.state is SessionState.FAILED and s.reason == "timeout"
    # no storm: at most one window per event (first send, timeout or partial ACK)
    assert s.retransmits <= (s.timeouts + s.acks_received + 1) * windowsize


# ---------------------------------------------------------------- timeouts and retry exhaustion


def test_silent_client_gets_retries_then_an_error() -> None:
    s = session(blob(2000), timeout=2.0, retries=3, now=100.0)
    first = s.datagrams_to_send(100.0)
    assert len(first) == 1 and s.get_timer() == 102.0
    s.handle_timer(101.0)  # too early: nothing happens
    assert s.datagrams_to_send(101.0) == []
    now = 100.0
    for i in range(3):
        now = s.get_timer() or 0.0
        s.handle_timer(now)
        again = s.datagrams_to_send(now)
        assert again == first, f"retry {i}"
    now = s.get_timer() or 0.0
    s.handle_timer(now)
    out = s.datagrams_to_send(now)
    assert s.state is SessionState.FAILED and s.reason == "timeout" and not s.ok
    err = parse_packet(out[0])
    assert isinstance(err, ErrorPacket) and err.code == 0 and "block 1" in err.message and "3" in err.message
    assert s.get_timer() is None and s.retransmits == 3 and s.timeouts == 3


def test_oack_is_retransmitted_and_exhaustion_mentions_it() -> None:
    s = session(b"abc", {"blksize": "1024"}, retries=1)
    oack = s.datagrams_to_send(0.0)
    s.handle_timer(1.0)
    assert s.datagrams_to_send(1.0) == oack
    s.handle_timer(2.0)
    err = parse_packet(s.datagrams_to_send(2.0)[0])
    assert isinstance(err, ErrorPacket) and "OACK" in err.message


def test_progress_resets_the_retry_budget() -> None:
    data = blob(20 * 512)
    s = session(data, retries=1)
    rx = Receiver()
    # every block needs exactly one retransmission; with a per-block budget of 1 that still completes
    trace = drive(s, rx, drop_data=lambda _d, n: n % 2 == 1)
    assert s.state is SessionState.COMPLETE and bytes(rx.data) == data and trace.timeouts == 21


# ---------------------------------------------------------------- errors from the client


def test_error_8_after_a_tsize_oack_is_a_normal_size_probe() -> None:
    """EDK2 asks for tsize (and blksize), reads the OACK and ends with ERROR 8."""
    s = session(blob(1234), {"tsize": "0", "blksize": "1468"})
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_error(8, "User aborted"), 0.1)
    assert s.state is SessionState.SIZE_PROBE and s.ok and s.finished and s.reason == "size_probe"
    assert "1234" in s.message
    assert s.datagrams_to_send(0.1) == [] and s.get_timer() is None


def test_error_8_without_tsize_means_the_client_refused_our_options() -> None:
    s = session(blob(10), {"blksize": "1468"})
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_error(8, "bad blksize"), 0.1)
    assert s.state is SessionState.FAILED and s.reason == "options_refused" and "bad blksize" in s.message


def test_client_error_mid_transfer_ends_it_without_a_reply() -> None:
    s = session(blob(5000))
    s.datagrams_to_send(0.0)
    s.receive_datagram(encode_ack(1), 0.0)
    s.receive_datagram(encode_error(0, "disk full"), 0.0)
    assert s.state is SessionState.FAILED and s.reason == "client_error"
    assert s.datagrams_to_send(0.0) == []  # never answer an ERROR
    s.receive_datagram(encode_ack(2), 0.0)  # nothing after the end
    assert s.datagrams_to_send(0.0) == []


@pytest.mark.parametrize(
    ("dg", "reason"),
    [
        (b"\x00\x03\x00\x01data", "illegal_op"),
        (b"\x00\x04\x00", "malformed"),
        (b"\x00\x01f\x00octet\x00", "illegal_op"),
    ],
)
def test_unexpected_packets_end_the_transfer_with_error_4(dg: bytes, reason: str) -> None:
    s = session(blob(5000))
    s.datagrams_to_send(0.0)
    s.receive_datagram(dg, 0.0)
    err = parse_packet(s.datagrams_to_send(0.0)[0])
    assert isinstance(err, ErrorPacket) and err.code == 4 and err.message
    assert s.state is SessionState.FAILED and s.reason == reason


class ShrinkingSource(MemorySource):
    """Reads past 64 KiB come back short, as if the file were truncated mid-transfer."""

    def read(self, offset: int, n: int) -> bytes:
        data = super().read(offset, n)
        return data[: n // 2] if offset >= 65536 else data


def test_a_file_that_shrinks_during_the_transfer_fails_cleanly() -> None:
    s = ReadSession(rrq(), ShrinkingSource(blob(200_000)), now=0.0)
    rx = Receiver()
    drive(s, rx)
    assert s.state is SessionState.FAILED and s.reason == "file_changed"
    assert rx.error is not None and "changed" in rx.error.message
    assert len(rx.data) == 65536  # everything before the change arrived intact


def test_a_client_timeout_above_the_servers_limit_is_refused_not_acknowledged() -> None:
    s = session(blob(10_000), {"timeout": "255", "blksize": "1024"}, max_client_timeout=5.0, timeout=1.0)
    assert s.oack == {"blksize": "1024"} and s.timeout == 1.0
    s = session(blob(10_000), {"timeout": "3"}, max_client_timeout=5.0, timeout=1.0)
    assert s.oack == {"timeout": "3"} and s.timeout == 3.0


def test_a_transfer_ends_at_its_lifetime_even_if_the_client_keeps_acking() -> None:
    s = session(blob(10 * 512), {}, timeout=5.0, max_lifetime=10.0)
    s.datagrams_to_send(0.0)
    now = 0.0
    for block in range(1, 3):  # one ACK every 4.9 s: never a timeout, always progress
        now += 4.9
        s.receive_datagram(encode_ack(block), now)
        s.datagrams_to_send(now)
    assert not s.finished
    assert s.get_timer() == 10.0  # the lifetime, before the retransmission deadline
    s.handle_timer(10.0)
    assert s.finished and s.state is SessionState.FAILED and s.reason == "lifetime"
    out = s.datagrams_to_send(10.0)
    assert parse_packet(out[-1]) == ErrorPacket(0, "transfer took longer than the server allows (10 s)")
