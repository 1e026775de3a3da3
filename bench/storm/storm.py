"""Boot-storm simulator: N nodes power on at once and do everything a real node does.

Each simulated node runs, concurrently with all the others:
  1. DHCP DORA (broadcast flag set, one shared socket on port 68, demultiplexed by xid),
  2. TFTP of the network boot program from next-server (RFC 2348 blksize),
  3. HTTP: its iPXE script, the capsule manifest (checked against the version id on the kernel
     command line), every chunk (each verified against the manifest), lifecycle events and a
     heartbeat, so bootd's registry must end with every node `ready`;
  4. with ``heartbeat`` set, what the node agent does once ready: a heartbeat every so often until
     the storm ends, to its current source, moving to the next (and staying there) when it fails.

The code deliberately shares nothing with bootd (its own DHCP, TFTP and manifest parsing): a
client that reused the server's codecs would share its bugs.  Every loop is bounded in count
and time.  Run it only inside a network namespace you created (see run.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MAGIC_COOKIE = b"\x63\x82\x53\x63"


def mac_of(index: int, prefix: int = 0x5E) -> bytes:
    return bytes((0x52, 0x54, prefix, (index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF))


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def dhcp_request(kind: int, mac: bytes, xid: int, extra: dict[int, bytes]) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4),
                         bytes(4), mac.ljust(16, b"\0"), b"", b"")
    opts = bytes((53, 1, kind))
    opts += bytes((60, 32)) + b"PXEClient:Arch:00000:UNDI:002001"
    opts += bytes((93, 2, 0, 0, 94, 3, 1, 2, 1))
    opts += bytes((55, 6, 1, 3, 6, 43, 66, 67))
    for code, value in extra.items():
        opts += bytes((code, len(value))) + value
    return header + MAGIC_COOKIE + opts + b"\xff"


def dhcp_parse(data: bytes) -> tuple[int, str, str, bytes, dict[int, bytes]] | None:
    if len(data) < 240 or data[236:240] != MAGIC_COOKIE:
        return None
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = socket.inet_ntoa(data[16:20])
    siaddr = socket.inet_ntoa(data[20:24])
    bootfile = data[108:236].rstrip(b"\0")
    opts: dict[int, bytes] = {}
    i = 240
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data):
            break
        length = data[i + 1]
        opts[code] = opts.get(code, b"") + data[i + 2 : i + 2 + length]
        i += 2 + length
    return xid, yiaddr, siaddr, bootfile, opts


class DhcpClients:
    """One socket on port 68 for every simulated node; replies are routed by xid.

    Every reply waiting in the socket is read at each wake-up: the simulated nodes stand for as many machines,
    each of which takes its reply as it arrives, and asyncio's datagram transport reads one datagram per pass
    of the event loop. In a storm a pass of this loop (all the nodes' TFTP and HTTP) takes milliseconds, so at
    one reply per pass the replies queued up in the socket for seconds, past the nodes' own retransmission
    timers (the servers had answered in time), and every retransmission added another reply to the queue.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.waiters: dict[int, asyncio.Queue[tuple[str, str, bytes, dict[int, bytes]]]] = {}
        self.sock = sock
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    def _readable(self) -> None:
        for _ in range(1024):  # bounded: the loop's other work gets its turn
            try:
                data, addr = self.sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                return
            self.datagram_received(data, addr)

    def send(self, packet: bytes) -> None:
        """Broadcast a request; a full send buffer loses it, as a busy NIC would (the node retransmits)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self.sock.sendto(packet, ("255.255.255.255", 67))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        parsed = dhcp_parse(data)
        if parsed is None:
            return
        xid, yiaddr, siaddr, bootfile, opts = parsed
        queue = self.waiters.get(xid)
        if queue is not None:
            queue.put_nowait((yiaddr, siaddr, bootfile, opts))

    async def exchange(self, packet: bytes, xid: int, want: int, timeout: float,
                       retries: int) -> tuple[str, str, bytes, dict[int, bytes]]:
        queue: asyncio.Queue[tuple[str, str, bytes, dict[int, bytes]]] = asyncio.Queue()
        self.waiters[xid] = queue
        try:
            for attempt in range(retries):
                self.send(packet)
                deadline = time.monotonic() + timeout * (attempt + 1)
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        reply = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                    kind = reply[3].get(53, b"\0")[0]
                    if kind == want:
                        return reply
                    if kind == 6:
                        raise DhcpNak(f"DHCPNAK for xid {xid:#x}")
            raise StormError(f"no DHCP {'OFFER' if want == 2 else 'ACK'} after {retries} tries")
        finally:
            self.waiters.pop(xid, None)


class StormError(Exception):
    pass


class DhcpNak(StormError):
    pass


class _TftpGet:
    """One transfer's state, driven by its socket's readiness and one timer: each block is acknowledged in the
    callback that reads it, as a node's firmware does at once, instead of a task waking up per block."""

    def __init__(self, sock: socket.socket, filename: str, dest: tuple[str, int], blksize: int, timeout: float,
                 retries: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.filename = filename
        self.dest = dest
        self.timeout = timeout
        self.retries = retries
        self.peer: tuple[str, int] | None = None
        self.out = bytearray()
        self.expected = 1
        self.size = 512
        self.tries = 0
        self.done: asyncio.Future[bytes] = self.loop.create_future()
        self.last = struct.pack("!H", 1) + filename.encode() + b"\0octet\0blksize\0" + str(blksize).encode() + b"\0"
        self.timer = self.loop.call_later(timeout, self._expired)
        self.loop.add_reader(sock.fileno(), self._readable)
        self._send(self.last)

    def close(self) -> None:
        self.timer.cancel()
        self.loop.remove_reader(self.sock.fileno())

    def _send(self, packet: bytes) -> None:
        self.last = packet
        with contextlib.suppress(BlockingIOError, InterruptedError):  # lost: the timer sends it again
            self.sock.sendto(packet, self.dest)

    def _fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(StormError(f"TFTP {self.filename}: {why}"))

    def _expired(self) -> None:
        self.tries += 1
        if self.tries > self.retries:
            self._fail(f"timed out waiting for block {self.expected}")
            return
        self._send(self.last)
        self.timer = self.loop.call_later(self.timeout, self._expired)

    def _readable(self) -> None:
        while not self.done.done():
            try:
                data, addr = self.sock.recvfrom(70000)
            except (BlockingIOError, InterruptedError):
                return
            self.timer.cancel()
            self.timer = self.loop.call_later(self.timeout, self._expired)
            self._packet(data, addr)

    def _packet(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.peer is None:
            self.peer = self.dest = addr
        elif addr != self.peer:
            return
        opcode = struct.unpack_from("!H", data)[0]
        if opcode == 5:
            self._fail("ERROR " + data[4:].rstrip(b"\0").decode(errors="replace"))
        elif opcode == 6:
            opts = data[2:].split(b"\0")
            self.size = int(dict(zip(opts[0::2], opts[1::2], strict=False)).get(b"blksize", b"512"))
            self._send(struct.pack("!HH", 4, 0))
        elif opcode == 3:
            block = struct.unpack_from("!H", data, 2)[0]
            if block != self.expected & 0xFFFF:
                self._send(self.last)
                return
            self.tries = 0
            self.out += data[4:]
            self._send(struct.pack("!HH", 4, block))
            self.expected += 1
            if len(data) - 4 < self.size:
                self.done.set_result(bytes(self.out))


async def tftp_get(server: str, port: int, filename: str, blksize: int = 1468, timeout: float = 2.0,
                   retries: int = 6) -> bytes:
    """A small, independent RFC 1350/2348 client (lock-step, with retransmission)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("0.0.0.0", 0))
    transfer = _TftpGet(sock, filename, (server, port), blksize, timeout, retries)
    try:
        return await transfer.done
    finally:
        transfer.close()
        sock.close()


def parse_manifest(data: bytes) -> list[tuple[str, int, int]]:
    """The chunk table of a capsule manifest (format in README), parsed independently of bootd."""
    if data[:8] != b"BDCAPS01":
        raise StormError(f"manifest magic {data[:8]!r} is not BDCAPS01")
    (meta_len,) = struct.unpack_from("!I", data, 8)
    pos = 12 + meta_len
    (count,) = struct.unpack_from("!I", data, pos)
    pos += 4
    chunks = []
    for _ in range(count):
        digest, stored, raw = struct.unpack_from("!32sII", data, pos)
        chunks.append((digest.hex(), stored, raw))
        pos += 40
    return chunks


@dataclass
class NodeResult:
    index: int
    mac: str
    name: str = ""
    ip: str = ""
    ok: bool = False
    error: str = ""
    bytes: int = 0
    script_latency: float = 0.0
    retries: int = 0
    times: dict[str, float] = field(default_factory=dict)
    server: str = ""  # the DHCP server that gave the lease (option 54)
    acked_by: list[str] = field(default_factory=list)  # every server that ACKed it (a failover makes two)
    chunk_bytes: dict[str, int] = field(default_factory=dict)  # chunk bytes by the host that served them
    beats: dict[str, int] = field(default_factory=dict)  # heartbeats from `ready` on, by the host that took them
    beat_errors: int = 0  # heartbeats no source took (the node agent logs them and goes on)


@dataclass
class StormConfig:
    nodes: int = 500
    server: str = "10.78.0.1"
    tftp_port: int = 69
    chunk_parallel: int = 4
    deadline: float = 240.0
    dhcp: bool = True
    tftp: bool = True
    seed: int = 1
    http_base: str = "http://10.78.0.1:8080"
    # Several servers: load from the one that gave the lease (option 54) on this port, then fail over to
    # the others the iPXE script names (bootd.sources=), as the stage one does.
    follow_server: bool = False
    http_port: int = 8080
    first_index: int = 0  # MACs from mac_of(first_index) on: a second storm against the same registry
    heartbeat: float = 0.0  # seconds between a ready node's heartbeats until the storm ends (0: only the first)
    linger: float = 0.0  # seconds the ready nodes go on heartbeating after the last node finished


class Sources:
    """A node's ordered HTTP sources; a connection failure moves it to the next (bounded by the deadline)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(dict.fromkeys(u.rstrip("/") for u in urls if u))
        self.at = 0

    @property
    def base(self) -> str:
        return self.urls[self.at % len(self.urls)]

    def failed(self, base: str) -> None:
        if base == self.base:
            self.at += 1


async def _retrying_get(session: aiohttp.ClientSession, path: str, result: NodeResult, deadline: float,
                        src: Sources) -> tuple[bytes, str]:
    """GET honouring 503 + Retry-After (admission control), bounded by the storm deadline; the body and the
    source that served it."""
    while True:
        base = src.base
        url = base + path
        try:
            async with session.get(url) as resp:
                if resp.status == 503:
                    wait = float(resp.headers.get("Retry-After", "1"))
                    if time.monotonic() + wait > deadline:
                        raise StormError(f"503 for {url} until the deadline")
                    await asyncio.sleep(wait * random.uniform(0.5, 1.5))
                    continue
                if resp.status != 200:
                    raise StormError(f"GET {url}: HTTP {resp.status}")
                body = await resp.read()
                result.bytes += len(body)
                return body, base
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            # The server went away mid-request (restart, crash): do what a node does, try again (the next source).
            result.retries += 1
            src.failed(base)
            if time.monotonic() > deadline:
                raise StormError(f"GET {url}: {exc!r}") from None
            await asyncio.sleep(random.uniform(0.2, 0.6))


async def _retrying_post(session: aiohttp.ClientSession, path: str, body: dict[str, Any] | None,
                         headers: dict[str, str], result: NodeResult, deadline: float, src: Sources) -> str:
    """POST until a source takes it (the next source after a connection failure); the source that did."""
    while True:
        base = src.base
        url = base + path
        try:
            async with session.post(url, json=body, headers=headers) as resp:
                if resp.status in (200, 204):
                    return base
                if resp.status != 503:
                    raise StormError(f"POST {url}: HTTP {resp.status} {await resp.text()}")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise StormError(f"POST {url}: {exc!r}") from None
            src.failed(base)
        result.retries += 1
        await asyncio.sleep(random.uniform(0.2, 0.6))


async def _lease_and_nbp(index: int, mac: bytes, cfg: StormConfig, dhcp: DhcpClients, result: NodeResult,
                         start: float, deadline: float) -> None:
    """DORA, then TFTP of the boot program; any failure starts over from DISCOVER, as PXE firmware does
    (a NAK, a REQUEST its server no longer answers, a TFTP server that died), until the deadline."""
    while True:
        try:
            xid = (index << 8) | random.randrange(256)
            offer = await dhcp.exchange(dhcp_request(1, mac, xid, {}), xid, 2, timeout=2.0, retries=5)
            yiaddr, _siaddr, _bootfile, opts = offer
            ack = await dhcp.exchange(
                dhcp_request(3, mac, xid, {50: socket.inet_aton(yiaddr), 54: opts.get(54, b"")}), xid, 5,
                timeout=2.0, retries=3)
            result.ip = ack[0]
            result.server = socket.inet_ntoa(ack[3][54]) if len(ack[3].get(54, b"")) == 4 else cfg.server
            result.acked_by.append(result.server)
            bootfile = (ack[3].get(67) or ack[2]).rstrip(b"\0").decode()
            result.times["dhcp"] = time.monotonic() - start
            if cfg.tftp and bootfile and not bootfile.startswith("http"):
                server = ack[1] if ack[1] != "0.0.0.0" else result.server
                nbp = await tftp_get(server, cfg.tftp_port, bootfile)
                result.bytes += len(nbp)
                if not nbp:
                    raise StormError(f"TFTP {bootfile}: empty file")
                result.times["tftp"] = time.monotonic() - start
            return
        except StormError:
            # RFC 2131 3.1: a NAK (or silence) sends the client back to INIT.
            result.retries += 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(random.uniform(0.5, 1.0))


def host_of(base: str) -> str:
    return base.split("//", 1)[-1].split(":", 1)[0]


async def _keep_beating(session: aiohttp.ClientSession, path: str, headers: dict[str, str], result: NodeResult,
                        every: float, deadline: float, src: Sources) -> None:
    """The node agent after `ready`: a heartbeat every ``every`` s (jittered) until cancelled at the storm's
    end, to the current source, the next one when it fails (Sources stays there).  A heartbeat no source
    took is counted, not fatal: the agent logs it and tries again at the next beat."""
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every * random.uniform(0.8, 1.2))
        try:
            base = await _retrying_post(session, path, None, headers, result, min(deadline, time.monotonic() + every),
                                        src)
        except (StormError, aiohttp.ClientError, OSError, TimeoutError):
            result.beat_errors += 1
            continue
        host = host_of(base)
        result.beats[host] = result.beats.get(host, 0) + 1


async def boot_one(index: int, cfg: StormConfig, dhcp: DhcpClients | None, session: aiohttp.ClientSession,
                   base: str, start: float, deadline: float, beating: list[asyncio.Task[None]] | None = None,
                   ) -> NodeResult:
    mac = mac_of(index)
    result = NodeResult(index, mac_text(mac))
    try:
        while True:
            if dhcp is not None:
                await _lease_and_nbp(index, mac, cfg, dhcp, result, start, deadline)
            if cfg.follow_server and result.server:
                base = f"http://{result.server}:{cfg.http_port}"
            src = Sources([base])
            t0 = time.monotonic()
            try:
                # A script its server cannot send within 15 s: PXE firmware starts over from DISCOVER.
                body, _ = await _retrying_get(session, f"/boot/{result.mac.replace(':', '-')}.ipxe", result,
                                              min(deadline, t0 + 15) if dhcp is not None else deadline, src)
                break
            except StormError:
                if dhcp is None or time.monotonic() > deadline:
                    raise
        script = body.decode()
        result.script_latency = time.monotonic() - t0
        result.times["script"] = time.monotonic() - start
        args = dict(re.findall(r"bootd\.(\w+)=(\S+)", script))
        for key in ("node", "capsule", "token"):
            if key not in args:
                raise StormError(f"iPXE script lacks bootd.{key}=: {script[:200]!r}")
        result.name = args["node"]
        headers = {"X-Bootd-Token": args["token"]}
        # The stage one's order: the server the script came from, then the others it names.
        src = Sources([src.base, *args.get("sources", "").split(",")])

        async def event(name: str, **extra: Any) -> None:
            await _retrying_post(session, f"/api/v1/nodes/{result.name}/events", {"event": name, **extra},
                                 headers, result, deadline, src)

        await event("stage1")
        manifest, _ = await _retrying_get(session, f"/capsules/{args['capsule']}/manifest", result, deadline, src)
        if hashlib.sha256(manifest).hexdigest() != args["capsule"]:
            raise StormError("manifest does not hash to the version id on the kernel command line")
        chunks = parse_manifest(manifest)
        total = sum(c[1] for c in chunks)
        await event("fetching", done=0, total=total)
        queue: asyncio.Queue[tuple[str, int, int]] = asyncio.Queue()
        for chunk in chunks:
            queue.put_nowait(chunk)

        async def worker() -> None:
            while not queue.empty():
                digest, stored, _raw = queue.get_nowait()
                body, source = await _retrying_get(session, f"/chunks/{digest}", result, deadline, src)
                if len(body) != stored or hashlib.sha256(body).hexdigest() != digest:
                    raise StormError(f"chunk {digest} failed verification")
                host = host_of(source)
                result.chunk_bytes[host] = result.chunk_bytes.get(host, 0) + len(body)

        await asyncio.gather(*(worker() for _ in range(cfg.chunk_parallel)))
        result.times["chunks"] = time.monotonic() - start
        await event("verified")
        await event("booted")
        beat = f"/api/v1/nodes/{result.name}/heartbeat"
        host = host_of(await _retrying_post(session, beat, None, headers, result, deadline, src))
        result.beats[host] = result.beats.get(host, 0) + 1
        result.times["ready"] = time.monotonic() - start
        result.ok = True
        if cfg.heartbeat > 0 and beating is not None:
            beating.append(asyncio.get_running_loop().create_task(
                _keep_beating(session, beat, headers, result, cfg.heartbeat, deadline, src)))
    except (StormError, aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def storm(cfg: StormConfig, base: str, interface: str | None = None) -> tuple[list[NodeResult], float]:
    random.seed(cfg.seed)
    dhcp: DhcpClients | None = None
    if cfg.dhcp:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", 68))
        dhcp = DhcpClients(sock)
    start = time.monotonic()
    deadline = start + cfg.deadline
    connector = aiohttp.TCPConnector(limit=2000, limit_per_host=2000, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=20)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            beating: list[asyncio.Task[None]] = []
            tasks = [boot_one(i, cfg, dhcp, session, cfg.http_base, start, deadline, beating)
                     for i in range(cfg.first_index, cfg.first_index + cfg.nodes)]
            try:
                results = await asyncio.wait_for(asyncio.gather(*tasks), cfg.deadline + 30)
                if beating and cfg.linger > 0:  # e.g. so every node's agent reports after a server's death
                    await asyncio.sleep(min(cfg.linger, max(0.0, deadline - time.monotonic())))
            finally:
                for task in beating:  # the storm is over: the simulated agents stop with it
                    task.cancel()
                await asyncio.gather(*beating, return_exceptions=True)
    finally:
        if dhcp is not None:
            dhcp.close()
    return list(results), time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]
