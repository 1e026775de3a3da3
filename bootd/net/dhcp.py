"""DHCP transport: UDP sockets on 67 (and 4011 in proxy mode), a bounded queue, and counters.

It decides nothing: bytes are parsed by ``bootd.proto.dhcp`` and answered by
``DhcpService``. What it owns, and why:

* ``SO_BINDTODEVICE`` when an interface is configured: a socket bound to
  0.0.0.0 cannot send to 255.255.255.255 from a namespace (or host) whose
  routing table has no route for it (ENETUNREACH), and binding to the device
  also keeps bootd from answering on interfaces it was not asked to serve. A subnet with its own
  ``interface`` (``[[dhcp.subnets]]``) gets a socket of its own on that device, and the service
  hears which device a request came in on (the local subnet for unrelayed clients).
* Two bounded lanes between the socket and the workers: REQUEST (and the rest
  of an exchange already under way) before DISCOVER. Under overload, finishing
  the exchanges already started is what turns work into booted nodes; serving
  new DISCOVERs first would make the REQUESTs of the clients we already
  offered to time out, and every offer would be wasted. When a lane is full
  the newest datagram is dropped (and counted) instead of growing memory or
  delaying every answer past the client's retransmit timer. Clients
  retransmit, so dropping is the correct overload response for DHCP.
* Requests that waited longer than ``max_age`` (twice that for the REQUEST
  lane) are dropped unanswered ("stale"): serving old requests first makes
  every answer late, the clients time out and retransmit, and goodput
  collapses; shedding the old keeps the recent ones within the client's timer.
* A retransmission of a request still in the queue (same xid, chaddr and message type: clients keep their
  xid while they retransmit) is dropped on arrival ("duplicate"): the queued copy gets the answer, which
  the client takes whichever copy it answers, so the copy would only cost a second answer.
* The lane is chosen without parsing (message type 53 is the first option in
  every client we captured; anything else takes the DISCOVER lane): under a
  flood most arrivals are dropped, so the arrival path must cost next to
  nothing. Parsing happens in the worker, after the age check.
* A few worker tasks, each taking up to a read batch from the lanes (one at a
  time gathers, lingering ``LINGER`` for a short batch to fill) and handing
  it to the service in one call (``DhcpService.handle_many``: one registry trip
  and one lease commit for the batch instead of a task, futures and a trip per
  request); while one batch waits for its commit, another worker takes the
  next, and its writes join the next group commit.
* A counter for every packet that gets no answer, labelled by reason, plus a
  rate-limited log line per reason (one per ``LOG_EVERY`` seconds) so a flood
  cannot flood the journal too.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

from prometheus_client import CollectorRegistry

from bootd.config import Config  # for real: compiled, reload()'s argument is checked at run time
from bootd.errors import RemoteProtocolError, StoreError
from bootd.metrics import DhcpMetrics, make_registry
from bootd.proto.dhcp.options import MessageType
from bootd.proto.dhcp.packet import DhcpPacket
from bootd.ratelog import LogLimiter
from bootd.service.dhcp import DhcpService, Request

__all__ = ["DhcpServer"]

log = logging.getLogger("bootd.dhcp")

_SO_BINDTODEVICE: Final = getattr(socket, "SO_BINDTODEVICE", 25)
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
# Kernel receive buffer (the kernel doubles it): room for a whole rack's synchronised power-on, a few thousand
# DISCOVERs arriving within milliseconds (a small buffer drops most of such a wave, and the clients' retransmit
# timers then bring the same wave back, seconds later, again and again). Time spent in the buffer is not hidden
# from the age check below: each datagram carries the kernel's receive time (SO_TIMESTAMPNS), so a request that
# waited there is as stale as one that waited in the queue (no bufferbloat under sustained overload).
RCVBUF: Final = 4 * 1024 * 1024
_SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS has the same value
_TIMESPEC: Final = struct.Struct("@qq")
_TIMESPEC_SIZE: Final = _TIMESPEC.size
_SOL_SOCKET: Final = socket.SOL_SOCKET
_ANCILLARY: Final = socket.CMSG_SPACE(_TIMESPEC.size)
LOG_EVERY: Final = 10.0

_Item = tuple[bytes, tuple[str, int], int, "_Endpoint", float, str | None, bytes]  # ..., _request_key
READ_BATCH: Final = 256  # datagrams read per wake-up, and requests per worker batch at most
# Why 256 (bench/dhcp, light client, capacity searches, medians of 3 in one run each): 32 saturated near 12,300
# exchanges/s (the per-batch costs, a registry trip and a commit, grow with the number of batches), 96 gave 17,250/s,
# 128 18,000, 192 to 384 18,500 alike: under load a batch is what arrived while the last one was decided, and past
# about 200 there is no more. A reply waits for its whole batch to be decided: 256 requests take about 5 ms.
# How long a worker that found a short batch waits for more before deciding it (seconds). None: since a batch's writes
# are committed at once (SqliteNodeStore._inline) rather than in a group commit a turn of the event loop later, the
# wait bought nothing and cost every request its length: at 12,000/s offered the average delay fell from about 10 ms
# to 5 ms without it (bench/dhcp, light client). Kept as a knob (DhcpServer(linger=...)) for stores whose trips are
# remote and long.
LINGER: Final = 0.0
SAME_AGE: Final = 0.01  # seconds: see _Endpoint.readable
BURST: Final = 64  # replies sent back to back at most before the socket is read again (see _batch)
RECV_SIZE: Final = 4096  # larger than any DHCP message (RFC 2131's minimum is 576; jumbo options stay well below)


def _request_key(data: bytes) -> bytes:
    """xid, chaddr and the leading message-type option: what a client's retransmission repeats."""
    return data[4:8] + data[28:44] + data[240:243]


# Option 53 first, with a type that continues an exchange: REQUEST, DECLINE, RELEASE, INFORM.
_PRIORITY_HEADS: Final = frozenset(b"\x35\x01" + bytes((t,)) for t in (3, 4, 7, 8))


T = TypeVar("T")


class _Lanes(Generic[T]):
    """Two FIFO lanes, lane 0 always served first, each bounded; wakes one waiting worker per item."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.lanes: tuple[collections.deque[T], collections.deque[T]] = (
            collections.deque(), collections.deque())
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()

    def qsize(self) -> int:
        return len(self.lanes[0]) + len(self.lanes[1])

    def put_nowait(self, item: T, lane: int) -> bool:
        q = self.lanes[lane]
        if len(q) >= self.maxsize:
            return False
        q.append(item)
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                break
        return True

    async def get(self) -> tuple[T, int]:
        while True:
            for lane, q in enumerate(self.lanes):
                if q:
                    return q.popleft(), lane
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter.done() and not getter.cancelled() and self.qsize():
                    self._wake_one()  # pass the wakeup we consumed on to another worker
                raise

    async def get_many(self, limit: int, linger: float = 0.0) -> list[tuple[T, int]]:
        """Up to ``limit`` items, lane 0's first, once at least one is there; with fewer than ``limit`` waiting,
        after ``linger`` seconds more for others to arrive."""
        first = await self.get()
        got = [first]
        if linger and self.qsize() + 1 < limit:
            await asyncio.sleep(linger)
        for lane, q in enumerate(self.lanes):
            while q and len(got) < limit:
                got.append((q.popleft(), lane))
        return got

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return


class _Endpoint:
    """One socket, read in batches: up to READ_BATCH datagrams per wake-up of the event loop.

    Why not asyncio's datagram transport: it reads one datagram per pass of the event loop, so under load
    every request paid a pass (a poll, the callbacks) of its own and its lease write a COMMIT of its own
    (the store's group commit takes what arrived before it runs). Reading what the kernel holds in one go
    lets one pass queue many requests, the workers handle them together, and their writes share one COMMIT.
    Replies are sent straight on the non-blocking socket: a full send buffer drops that reply (counted);
    the client retransmits, as for a request dropped under overload.
    """

    def __init__(self, server: DhcpServer, sock: socket.socket, port: int, interface: str | None) -> None:
        self.server = server
        self.sock = sock
        self.port = port
        self.interface = interface
        self.closed = False
        self.received = server.metrics.received.labels(port=str(port))

    def readable(self) -> None:
        server = self.server
        queue = server.queue
        waiting = server.waiting
        recvmsg = self.sock.recvmsg
        peer_share = server.service.peer_share
        cluster = server.service.cluster
        shared = cluster is not None and cluster.shared
        now = time.monotonic()
        to_monotonic = now - time.time()  # the kernel stamps arrivals with the wall clock
        recvfrom = self.sock.recvfrom
        count = 0
        port, interface = self.port, self.interface
        arrived = now
        stamped = True  # read with recvmsg, for the kernel's arrival stamp
        for _ in range(READ_BATCH):
            try:
                if stamped:
                    data, ancillary, _flags, addr = recvmsg(RECV_SIZE, _ANCILLARY)
                    arrived = now
                    for level, kind, stamp in ancillary:
                        if level == _SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(stamp) >= _TIMESPEC_SIZE:
                            sec, nsec = _TIMESPEC.unpack_from(stamp)
                            arrived = min(now, sec + nsec * 1e-9 + to_monotonic)
                    # A datagram that waited less than SAME_AGE: those behind it arrived later still, so its stamp
                    # stands for theirs, off by less than SAME_AGE (never enough to make a fresh one stale), and
                    # they are read with recvfrom, half the cost of recvmsg here.
                    stamped = now - arrived >= SAME_AGE
                else:
                    data, addr = recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # Linux reports an ICMP error for an earlier send on the next receive.
                self.error(exc)
                continue
            count += 1
            if shared:
                why = peer_share(data, self.port)
                if why is not None:
                    server.drop("peer-share", why)
                    continue
            # A retransmission (same client, same xid, same message type) of a request still waiting in the queue
            # is that request again: the one queued gets the answer, the copy would only cost a second one.
            key = _request_key(data)
            if key in waiting:
                server.drop("duplicate", f"from {addr[0]}:{addr[1]}: a retransmission of a request still queued")
                continue
            lane = 0 if data[240:243] in _PRIORITY_HEADS else 1
            if queue.put_nowait((data, addr, port, self, arrived, interface, key), lane):
                waiting.add(key)
            else:
                server.drop("queue-full", f"from {addr[0]}:{addr[1]}, {queue.maxsize} waiting")
        if count:
            self.received.inc(count)

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self.server.drop("send-buffer-full", f"reply to {addr[0]}:{addr[1]} not sent")
        except OSError as exc:
            self.error(exc)

    def is_closing(self) -> bool:
        return self.closed

    def error(self, exc: OSError) -> None:
        # Failed sends (e.g. ENETUNREACH for a broadcast without a device) and ICMP errors.
        self.server.metrics.send_errors.inc()
        self.server.drop("send-error", str(exc), count=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class DhcpServer:
    """Listens for DHCP; constructed from plain values so it never needs the config module."""

    def __init__(
        self,
        service: DhcpService,
        *,
        listen: str = "0.0.0.0",
        port: int = 67,
        proxy_port: int | None = None,
        interface: str | None = None,
        more_interfaces: tuple[str, ...] = (),
        queue_size: int = 1024,
        workers: int = 4,
        batch: int = READ_BATCH,
        linger: float = LINGER,
        max_age: float = 2.0,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.listen = listen
        self.port = port
        self.proxy_port = proxy_port
        self.interface = interface
        # Subnets' own interfaces: one more socket each, on the DHCP port (not the proxy port).
        self.more_interfaces = tuple(i for i in dict.fromkeys(more_interfaces) if i and i != interface)
        self.workers = workers
        self.batch = batch
        self.linger = linger
        self._collecting = asyncio.Lock()
        self.max_age = max_age
        self.clock = clock
        self.queue: _Lanes[_Item] = _Lanes(queue_size)
        self.waiting: set[bytes] = set()  # the queued requests' (xid, chaddr, type): bounded by the queue
        # The daemon passes its one collector registry (served on /metrics); a private one only for tests that do
        # not scrape.  Named `metrics`, not `registry`: in bootd "registry" is the node registry.
        self.metrics = DhcpMetrics(metrics if metrics is not None else make_registry())
        self.metrics.queue.set_function(lambda: float(self.queue.qsize()))
        self._endpoints: list[_Endpoint] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._drop_log = LogLimiter(LOG_EVERY)  # one line per reason per LOG_EVERY seconds
        self.bound_ports: list[int] = []
        self._reply_counters: dict[int, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------
    def _socket(self, port: int, interface: str | None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # No SO_REUSEADDR on purpose: a second DHCP server on the same port and device must make
            # bootd fail at start, not silently share (and race on) every broadcast.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            with contextlib.suppress(OSError):  # without it, a datagram's age counts from its read
                sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            if interface:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot bind DHCP to interface {interface!r} "
                                             f"(needs CAP_NET_RAW and an existing device): {exc.strerror}") from None
            try:
                sock.bind((self.listen, port))
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen for DHCP on {self.listen}:{port}"
                                         f"{' on ' + interface if interface else ''}: {exc.strerror} "
                                         "(another DHCP server running? port below 1024 without "
                                         "CAP_NET_BIND_SERVICE?)") from None
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.service.load()
        ports: list[tuple[int, str | None]] = [(self.port, self.interface)]
        if self.proxy_port and self.proxy_port != self.port:
            ports.append((self.proxy_port, self.interface))
        ports += [(self.port, extra) for extra in self.more_interfaces]
        try:
            for port, interface in ports:
                sock = self._socket(port, interface)
                real_port = int(sock.getsockname()[1])
                endpoint = _Endpoint(self, sock, real_port, interface)
                self._endpoints.append(endpoint)
                loop.add_reader(sock.fileno(), endpoint.readable)
                if real_port not in self.bound_ports:
                    self.bound_ports.append(real_port)
        except BaseException:
            await self.close()
            raise
        self._tasks = [asyncio.create_task(self._worker(), name=f"dhcp-worker-{i}") for i in range(self.workers)]
        # The service's timers (expiry, periodic re-read of node addresses) live as long as the sockets:
        # one start and one close for every user of the transport (daemon, bench, tests).
        self._tasks.append(asyncio.create_task(self._timers(), name="dhcp-timers"))
        if not self.interface:
            log.warning("event=dhcp-no-interface reason=%r", "dhcp.interface (or server.interface) is not set: "
                        "broadcast replies follow the routing table and may leave by the wrong interface or "
                        "fail with ENETUNREACH; only relayed clients are served reliably")
        log.info("event=dhcp-listening address=%s ports=%s interface=%s mode=%s", self.listen,
                 ",".join(map(str, self.bound_ports)), ",".join([self.interface or "-", *self.more_interfaces]),
                 self.service.config.mode)

    async def close(self) -> None:
        for transport in self._endpoints:
            transport.close()
        self._endpoints.clear()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    def reload(self, config: Config) -> list[str]:
        """SIGHUP: apply what can change live (queue bound here, the rest in the service); log and return
        the settings that changed but need a restart. A reload the service refuses changes nothing."""
        try:
            restart = self.service.reload(config)
        except ValueError as exc:
            log.error("event=dhcp-reload-failed error=%r (keeping the running [dhcp] and [boot] settings)",
                      str(exc))
            return []
        self.queue.maxsize = config.dhcp.queue_size
        if restart:
            log.warning("event=dhcp-reloaded restart_needed_for=%s", ",".join(restart))
        else:
            log.info("event=dhcp-reloaded")
        return restart

    async def _timers(self) -> None:
        while True:
            try:
                await self.service.run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop expiry for good: log the trace, start over
                log.exception("event=dhcp-timers-failed retry_in=%ss", LOG_EVERY)
                await asyncio.sleep(LOG_EVERY)

    # -- work --------------------------------------------------------------------------
    def drop(self, reason: str, detail: str = "", *, count: bool = True) -> None:
        if count:
            self.metrics.dropped.labels(reason=reason).inc()
        held = self._drop_log.allow(reason)
        if held is not None:
            more = f" (+{held} more since last report)" if held else ""
            log.info("event=dhcp-drop reason=%s detail=%r%s", reason, detail, more)

    async def _worker(self) -> None:
        queue = self.queue
        while True:
            async with self._collecting:  # one worker gathers a batch at a time, the others decide theirs meanwhile
                items = await queue.get_many(self.batch, self.linger)
            try:
                await self._batch(items)
            except asyncio.CancelledError:
                raise
            except StoreError as exc:  # the batch's common step failed (the first read of the leases)
                for _ in items:
                    self.drop("store-error", str(exc))
            except Exception:  # a bug must not kill the worker: count it, log the trace, keep serving
                self.metrics.dropped.labels(reason="internal-error").inc(len(items))
                log.exception("event=dhcp-internal-error requests=%d", len(items))

    async def _batch(self, items: list[tuple[_Item, int]]) -> None:
        """Answer what one worker took from the queue together (the service decides a batch in one go: one
        registry trip, one lease commit); each reply goes out as soon as the batch is decided."""
        now = time.monotonic()
        requests: list[Request] = []
        routes: list[tuple[tuple[str, int], _Endpoint]] = []
        waiting = self.waiting
        for (data, addr, port, transport, queued_at, interface, key), lane in items:
            waiting.discard(key)
            limit = self.max_age * (2 if lane == 0 else 1)
            if now - queued_at > limit:
                # Overloaded: the client has retransmitted or given up by now (RFC 2131 4.1: ~4 s).
                # Answering it would only make every later request later too (congestion collapse).
                self.drop("stale", f"waited more than {limit:.1f}s in the queue")
                continue
            try:
                packet = DhcpPacket.parse(data)
            except RemoteProtocolError as exc:
                self.drop(exc.reason, f"from {addr[0]}:{addr[1]}: {exc}")
                continue
            requests.append(Request(packet, port, addr, interface))
            routes.append((addr, transport))
        if not requests:
            return
        results = await self.service.handle_many(requests, self.clock())
        sent: dict[MessageType, int] = {}
        burst = 0
        for (addr, transport), result in zip(routes, results, strict=True):
            if isinstance(result, Exception):
                if isinstance(result, RemoteProtocolError):
                    self.drop(result.reason, f"from {addr[0]}:{addr[1]}: {result}")
                elif isinstance(result, StoreError):
                    self.drop("store-error", str(result))
                else:
                    self.metrics.dropped.labels(reason="internal-error").inc()
                    log.error("event=dhcp-internal-error from=%s:%d", addr[0], addr[1], exc_info=result)
                continue
            if result.ignored is not None:
                self.drop(result.ignored, result.detail)
            for reply in result.replies:
                if transport.closed:
                    break
                transport.sendto(reply.data, (reply.address, reply.port))
                # Counted per batch below: a prometheus counter takes a lock on every inc().
                sent[reply.msg_type] = sent.get(reply.msg_type, 0) + 1
                burst += 1
                if burst == BURST:
                    # A batch's replies leave together; a relay (one socket for all its clients) would drop
                    # what its receive buffer cannot hold. Reading what arrived meanwhile spaces them.
                    burst = 0
                    transport.readable()
        for msg_type, count in sent.items():
            counter = self._reply_counters.get(msg_type)
            if counter is None:
                counter = self._reply_counters[msg_type] = self.metrics.replies.labels(type=msg_type.name.lower())
            counter.inc(count)
