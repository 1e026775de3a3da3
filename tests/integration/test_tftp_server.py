"""TftpServer over real loopback sockets with a small asyncio client written for these tests.

Covers what the interop tests cannot steer: refusals and their messages, the
EDK2 size probe, 300 concurrent transfers, the busy refusal above the limit,
shared file descriptors, metrics, shutdown and bind errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bootd.errors import BootdError
from bootd.net.tftp import TftpServer
from bootd.proto.tftp.packet import (
    Data,
    ErrorPacket,
    OAck,
    encode_ack,
    encode_error,
    encode_request,
    parse_packet,
)

HOST = "127.0.0.1"


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))


class Client:
    """A lock-step RFC 1350/2347 client: enough to drive hundreds of transfers from one loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None
        self.ep = _Endpoint()

    async def __aenter__(self) -> Client:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self.ep, local_addr=(HOST, 0))
        self.transport = transport
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.transport is not None
        self.transport.close()

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float = 5.0) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.ep.queue.get(), timeout)

    async def request(
        self, name: str, options: dict[str, str] | None = None, mode: str = "octet", write: bool = False
    ) -> tuple[object, tuple[str, int]]:
        self.send(encode_request(name, mode, options, write=write), (HOST, self.port))
        data, addr = await self.recv()
        return parse_packet(data), addr

    async def fetch(self, name: str, options: dict[str, str] | None = None) -> bytes | ErrorPacket:
        """Download ``name``; returns the bytes, or the server's ERROR packet."""
        blksize = 512
        first, tid = await self.request(name, options)
        out = bytearray()
        pkt = first
        expected = 1
        while True:
            if isinstance(pkt, ErrorPacket):
                return pkt
            if isinstance(pkt, OAck):
                blksize = int(pkt.options.get("blksize", "512"))
                last_ack = encode_ack(0)
            elif isinstance(pkt, Data):
                if pkt.block == expected & 0xFFFF:
                    out += pkt.payload
                    expected += 1
                last_ack = encode_ack(expected - 1)
                if pkt.block == (expected - 1) & 0xFFFF and len(pkt.payload) < blksize:
                    self.send(last_ack, tid)
                    return bytes(out)
            else:
                raise AssertionError(f"unexpected {pkt!r}")
            self.send(last_ack, tid)
            for _ in range(6):
                try:
                    data, addr = await self.recv(timeout=2.0)
                except TimeoutError:
                    self.send(last_ack, tid)
                    continue
                assert addr == tid, "server changed its TID mid-transfer"
                pkt = parse_packet(data)
                break
            else:
                raise AssertionError(f"server went silent after block {expected - 1}")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "tftp"
    r.mkdir()
    rnd = random.Random(3)
    (r / "ipxe.efi").write_bytes(rnd.randbytes(200_000))
    (r / "undionly.kpxe").write_bytes(rnd.randbytes(70_001))
    (r / "small").write_bytes(b"x" * 100)
    (r / "dir").mkdir()
    (r / "dir" / "inner").write_bytes(b"inner")
    (r / "escape").symlink_to("/etc/hostname")
    (r / "dangling").symlink_to(r / "gone")
    (r / "inside-link").symlink_to(r / "small")
    os.mkfifo(r / "fifo")
    (r / "secret").write_bytes(b"s")
    (r / "secret").chmod(0)
    return r


@pytest.fixture
async def server(root: Path, tmp_path: Path) -> AsyncIterator[TftpServer]:
    nbp = tmp_path / "nbp"
    nbp.mkdir()
    (nbp / "snponly.efi").write_bytes(b"nbp" * 1000)
    (nbp / "small").write_bytes(b"from the second root")
    s = TftpServer(HOST, 0, [root, nbp], timeout=0.5, retries=2, metrics=CollectorRegistry())
    await s.start()
    try:
        yield s
    finally:
        await s.close()


def digest(data: bytes | ErrorPacket) -> str:
    assert isinstance(data, bytes), data
    return hashlib.sha256(data).hexdigest()


async def test_fetch_and_lookup_order(server: TftpServer, root: Path) -> None:
    async with Client(server.port) as c:
        assert await c.fetch("/ipxe.efi", {"blksize": "1468", "tsize": "0"}) == (root / "ipxe.efi").read_bytes()
    async with Client(server.port) as c:
        assert await c.fetch("snponly.efi") == b"nbp" * 1000  # found in the second root
    async with Client(server.port) as c:
        assert await c.fetch("small") == b"x" * 100  # the first root wins
    async with Client(server.port) as c:
        assert await c.fetch("inside-link") == b"x" * 100  # symlinks inside the root are fine
    async with Client(server.port) as c:
        assert await c.fetch("dir/inner") == b"inner"


@pytest.mark.parametrize(
    ("name", "code", "words"),
    [
        ("../etc/passwd", 2, "'..' is not allowed"),
        ("dir/../../x", 2, "'..' is not allowed"),
        ("escape", 2, "outside the TFTP root"),
        ("dir", 2, "is a directory"),
        ("fifo", 2, "not a regular file"),
        ("missing.efi", 1, "file not found"),
        ("/", 1, "names no file"),
        ("dangling", 1, "dangling symlink"),
    ],
)
async def test_refusals_say_why(server: TftpServer, name: str, code: int, words: str) -> None:
    async with Client(server.port) as c:
        pkt, _addr = await c.request(name)
    assert isinstance(pkt, ErrorPacket), pkt
    assert pkt.code == code and words in pkt.message
    assert server.active_transfers == 0 and server.open_files == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
async def test_unreadable_file_is_an_access_violation(server: TftpServer) -> None:
    async with Client(server.port) as c:
        pkt, _ = await c.request("secret")
    assert isinstance(pkt, ErrorPacket) and pkt.code == 2 and "permission denied" in pkt.message


async def test_write_requests_and_bad_modes_are_refused(server: TftpServer) -> None:
    async with Client(server.port) as c:
        pkt, _ = await c.request("new.bin", write=True)
        assert pkt == ErrorPacket(2, "write requests are not accepted")
        pkt, _ = await c.request("small", mode="mail")
        assert isinstance(pkt, ErrorPacket) and pkt.code == 4 and "mail" in pkt.message
        c.send(encode_ack(1), (HOST, server.port))  # not a request
        pkt = parse_packet((await c.recv())[0])
        assert isinstance(pkt, ErrorPacket) and pkt.code == 5
        c.send(b"\x00\x01nonul", (HOST, server.port))
        pkt = parse_packet((await c.recv())[0])
        assert isinstance(pkt, ErrorPacket) and pkt.code == 4 and "malformed" in pkt.message
    assert server.stats["error:write_request"] == 1


async def test_edk2_size_probe_is_a_normal_end(server: TftpServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="bootd.tftp")
    async with Client(server.port) as c:
        pkt, tid = await c.request("ipxe.efi", {"tsize": "0", "blksize": "1468"})
        assert pkt == OAck({"tsize": "200000", "blksize": "1468"})
        c.send(encode_error(8, "User aborted the transfer"), tid)
        for _ in range(100):
            if server.active_transfers == 0:
                break
            await asyncio.sleep(0.01)
    assert server.stats["size_probes"] == 1 and server.stats["failed"] == 0
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    assert any("event=tftp_size_probe" in r.getMessage() for r in caplog.records)


async def test_silent_client_times_out_and_is_told(server: TftpServer) -> None:
    async with Client(server.port) as c:
        pkt, _tid = await c.request("ipxe.efi")
        assert isinstance(pkt, Data) and pkt.block == 1
        again = [parse_packet((await c.recv(3.0))[0]) for _ in range(2)]  # retries=2
        assert again == [pkt, pkt]
        err = parse_packet((await c.recv(3.0))[0])
    assert isinstance(err, ErrorPacket) and "timed out" in err.message
    assert server.stats["failed:timeout"] == 1 and server.active_transfers == 0 and server.open_files == 0


async def test_client_that_vanishes_ends_the_transfer_at_once(server: TftpServer) -> None:
    async with Client(server.port) as c:
        pkt, _tid = await c.request("ipxe.efi")
        assert isinstance(pkt, Data)
    # the client's port is closed now: the server's retransmission gets ICMP port unreachable
    for _ in range(300):
        if server.active_transfers == 0:
            break
        await asyncio.sleep(0.01)
    assert server.active_transfers == 0
    assert server.stats["failed:client_gone"] == 1  # ICMP port unreachable, not the retry budget


async def test_duplicate_request_does_not_start_a_second_transfer(server: TftpServer, root: Path) -> None:
    async with Client(server.port) as c:
        req = encode_request("small", "octet", {"blksize": "1024"})
        c.send(req, (HOST, server.port))
        c.send(req, (HOST, server.port))
        pkt = parse_packet((await c.recv())[0])
        await asyncio.sleep(0.05)
        assert server.active_transfers == 1 and server.stats["duplicate_requests"] == 1
        assert isinstance(pkt, OAck)


async def test_request_repeated_after_progress_restarts_the_transfer(server: TftpServer, root: Path) -> None:
    async with Client(server.port) as c:
        pkt, tid = await c.request("ipxe.efi")
        assert isinstance(pkt, Data) and pkt.block == 1
        c.send(encode_ack(1), tid)
        assert parse_packet((await c.recv())[0]) == Data(2, (root / "ipxe.efi").read_bytes()[512:1024])
        pkt, tid2 = await c.request("ipxe.efi")  # the client starts over from the same port
        assert isinstance(pkt, Data) and pkt.block == 1 and tid2 != tid
        assert server.active_transfers == 1  # the abandoned transfer was ended, not leaked
        assert server.stats["failed:restarted"] == 1


async def test_300_concurrent_transfers_all_complete_with_shared_files(root: Path) -> None:
    files = {"ipxe.efi": (root / "ipxe.efi").read_bytes(), "undionly.kpxe": (root / "undionly.kpxe").read_bytes()}
    limit = 300  # exactly at the limit: nobody may be refused
    server = TftpServer(HOST, 0, [root], max_sessions=limit, max_sessions_per_source=limit, timeout=1.0, retries=5)
    await server.start()
    peak = {"active": 0, "files": 0}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak["active"] = max(peak["active"], server.active_transfers)
            peak["files"] = max(peak["files"], server.open_files)
            await asyncio.sleep(0.001)

    async def one(i: int) -> bytes | ErrorPacket:
        name = "ipxe.efi" if i % 2 else "undionly.kpxe"
        async with Client(server.port) as c:
            return await c.fetch(name, {"blksize": "1468", "tsize": "0"})

    sampler = asyncio.create_task(sample())
    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(300))), 120)
    finally:
        stop.set()
        await sampler
        await server.close()
    refused = [r for r in results if isinstance(r, ErrorPacket)]
    assert not refused, refused[:3]
    for i, r in enumerate(results):
        assert r == files["ipxe.efi" if i % 2 else "undionly.kpxe"], i
    assert server.stats["completed"] == 300 and server.stats["failed"] == 0
    assert not [k for k in server.stats if k.startswith("refused")]
    assert peak["active"] > 50, peak  # they really overlapped
    assert peak["files"] <= 2, peak  # one descriptor per file, shared


async def test_busy_refusal_above_the_limit_is_immediate(root: Path) -> None:
    server = TftpServer(HOST, 0, [root], max_sessions=3, max_sessions_per_source=3, timeout=5.0, retries=1)
    await server.start()
    try:
        clients = [await Client(server.port).__aenter__() for _ in range(4)]
        tids = []
        for c in clients[:3]:  # three transfers that never ACK: they hold their slots
            pkt, tid = await c.request("ipxe.efi")
            assert isinstance(pkt, Data)
            tids.append(tid)
        assert server.active_transfers == 3
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pkt, addr = await clients[3].request("small")
        assert loop.time() - t0 < 0.5
        assert pkt == ErrorPacket(0, "server busy: 3 transfers in progress, try again")
        assert addr == (HOST, server.port)  # refused from the listener: no socket spent on it
        assert server.stats["refused:busy"] == 1
        # one client cancels: its slot frees up at once and the retry is served
        clients[0].send(encode_error(0, "cancelled"), tids[0])
        for _ in range(100):
            if server.active_transfers < 3:
                break
            await asyncio.sleep(0.01)
        assert await clients[3].fetch("small") == b"x" * 100
        for c in clients:
            await c.__aexit__()
    finally:
        await server.close()


async def test_metrics_are_exported(server: TftpServer, root: Path) -> None:
    registry = CollectorRegistry()
    s = TftpServer(HOST, 0, [root], metrics=registry)
    await s.start()
    try:
        async with Client(s.port) as c:
            assert await c.fetch("small") == b"x" * 100
        async with Client(s.port) as c:
            await c.request("missing")
        async with Client(s.port) as c:
            await c.request("x", write=True)
        for _ in range(100):
            if s.active_transfers == 0:
                break
            await asyncio.sleep(0.01)
    finally:
        await s.close()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("bootd_tftp_transfers_started_total") == 1
    assert value("bootd_tftp_transfers_completed_total", kind="complete") == 1
    assert value("bootd_tftp_sent_bytes_total") == 100
    assert value("bootd_tftp_errors_total", reason="not_found") == 1
    assert value("bootd_tftp_errors_total", reason="write_request") == 1
    assert value("bootd_tftp_active_transfers") == 0


async def test_close_tells_running_clients(root: Path) -> None:
    server = TftpServer(HOST, 0, [root])
    await server.start()
    async with Client(server.port) as c:
        pkt, _ = await c.request("ipxe.efi")
        assert isinstance(pkt, Data)
        await server.close()
        err = parse_packet((await c.recv())[0])
    assert err == ErrorPacket(0, "server shutting down")
    assert server.open_files == 0 and server.active_transfers == 0


async def test_bind_errors_are_clear(root: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        server = TftpServer(HOST, taken.getsockname()[1], [root])
        with pytest.raises(BootdError, match=r"cannot listen on 127\.0\.0\.1:\d+: Address already in use"):
            await server.start()
    with pytest.raises(BootdError, match="no local interface has that address"):
        await TftpServer("192.0.2.77", 0, [root]).start()
    with pytest.raises(BootdError, match="cannot bind to interface 'no-such-if0'"):
        await TftpServer(HOST, 0, [root], listen_interface="no-such-if0").start()


async def test_listen_interface_lo_serves(root: Path) -> None:
    server = TftpServer(HOST, 0, [root], listen_interface="lo")
    try:
        await server.start()
    except BootdError as exc:
        pytest.skip(f"SO_BINDTODEVICE not permitted here: {exc}")
    try:
        async with Client(server.port) as c:
            assert await c.fetch("small") == b"x" * 100
    finally:
        await server.close()
