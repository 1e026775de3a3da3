"""The DHCP server's decisions: who gets which address and which boot file.

Full mode is an RFC 2131 server for one pool per subnet (DISCOVER/OFFER/REQUEST/ACK/NAK,
DECLINE, RELEASE, INFORM). The subnet is chosen as Kea chooses from its ``subnet4`` list: by the
relay's giaddr, else by ciaddr (a client renewing by unicast), else the local segment's subnet; a
relayed request from a subnet we do not serve is refused and counted (``foreign-subnet``). Proxy mode (PXE spec 2.1,
"ProxyDHCP") gives PXE clients only boot information, on port 67 and on the
boot-server port 4011, so bootd can sit next to an existing DHCP server.

Address state lives in two places on purpose. The store is the truth that
survives a restart (leases, and each node's last address, which it keeps).
An in-memory index of that truth plus short-lived offers (``proto.dhcp.leases``,
pure) makes allocation a synchronous step with no ``await`` between "this address
is free" and "it is taken", so concurrent DISCOVERs can never be offered the same
address. Expiry and the periodic re-read of the store run in ``run()``, on the
pool's timer, not on incoming packets.
Leases are written at ACK, not at OFFER (RFC 2131 4.3.1 lets an offer be a
soft reservation), which keeps a DISCOVER flood from writing to the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry

# Imported for real, not under TYPE_CHECKING: compiled (tools/compile.py), the dataclasses and signatures below are
# checked at run time against these classes.
from bootd.config import Config, DhcpConfig, SubnetConfig
from bootd.errors import Conflict, StoreError
from bootd.model import BootPlan, Lease, Machine, Node, State
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.client_state import ClientState, request_state
from bootd.proto.dhcp.leases import SERVER, LeasePool, int_ip, ip_int
from bootd.proto.dhcp.loadbalance import client_key, lb_hash, wire_split_key
from bootd.proto.dhcp.packet import ZERO_IP, DhcpPacket, ip_to_bytes
from bootd.proto.dhcp.pxe import Client, Ignore, classify
from bootd.proto.dhcp.reply import (
    OWN_OPTIONS,
    Reply,
    boot_options,
    build_reply,
    destination,
    encode_options,
    lease_options,
    nak,
    reply_bytes,
)
from bootd.service.boot import BootPlanner, BootPolicy
from bootd.service.credentials import Credentials
from bootd.service.lifecycle import Actor, Lifecycle, TransitionRefused
from bootd.service.registry import RegistryService
from bootd.service.servers import Cluster
from bootd.store.base import NodeStore

log = logging.getLogger("bootd.dhcp")

MT = o.MessageType
MAX_HOPS: Final = 16  # RFC 1542 4.1.1 suggests relays discard beyond this; so do we
NODE_CACHE_TTL: Final = 10.0  # DISCOVER->REQUEST reuses the registry answer for this long (seconds)
NODE_RELOAD_EVERY: Final = 60.0  # re-read node addresses: the CLI (another process) may delete nodes or set an ip
CONFLICT_RELOAD_AFTER: Final = 1.0  # another server leased an address we thought free: re-read the leases this soon
# Kea's HA load-balancing filters these; OFFER/ACK/NAK come from servers, not clients.
SPLIT_TYPES: Final = frozenset((o.MessageType.DISCOVER, o.MessageType.REQUEST, o.MessageType.DECLINE,
                         o.MessageType.RELEASE, o.MessageType.INFORM))
_SPLIT_CODES: Final = frozenset(int(t) for t in SPLIT_TYPES)
# Client keys remembered with their hash bucket (cleared when full: forged keys only refill it).
BUCKET_CACHE: Final = 65536
OTHER: Final = "another-server"  # the sticky owner of an address another server leased (until the next reload)


@dataclass(slots=True, init=False)  # init=False: as Request
class Outcome:
    """What one request produced: replies to send, or why nothing is sent (a counter label)."""

    replies: list[Reply]
    ignored: str | None
    detail: str

    def __init__(self, replies: list[Reply] | None = None, ignored: str | None = None, detail: str = "") -> None:
        self.replies = [] if replies is None else replies
        self.ignored = ignored
        self.detail = detail


def _ignore(reason: str, detail: str = "") -> Outcome:
    return Outcome([], reason, detail)


# Not frozen: built per packet, and frozen costs an object.__setattr__ per field. init=False: a hand-written __init__
# compiles (tools/compile.py, mypyc); a dataclass's generated one stays interpreted.
@dataclass(slots=True, init=False)
class Request:
    """One request for handle_many: the parsed packet, the port it came to, its source, its device."""

    packet: DhcpPacket
    port: int
    source: tuple[str, int] | None
    interface: str | None

    def __init__(self, packet: DhcpPacket, port: int, source: tuple[str, int] | None = None,
                 interface: str | None = None) -> None:
        self.packet = packet
        self.port = port
        self.source = source
        self.interface = interface


class _Exchange:
    """A DISCOVER (``fresh``: it always asks the registry) or a REQUEST between the steps of handle_many."""

    __slots__ = ("client", "fresh", "index", "ip", "lease", "node", "packet", "resolved", "sub")

    def __init__(self, index: int, packet: DhcpPacket, client: Client, sub: Subnet, *, ip: int = 0,
                 fresh: bool = False) -> None:
        self.index = index
        self.packet = packet
        self.client = client
        self.sub = sub
        self.ip = ip  # a REQUEST's address
        self.fresh = fresh
        self.node: Node | None = None
        self.resolved = False  # node is the registry's answer (None: refused)
        self.lease: Lease | None = None  # a REQUEST's binding, waiting for its commit


@dataclass(slots=True, init=False)  # not frozen, init=False: as Request
class BootAnswer:
    """The boot part of a reply: options, the BOOTP ``file`` field, ``siaddr``, and the plan
    (None when no network boot program fits the firmware: the reply then carries no boot data)."""

    options: dict[int, bytes]
    file: bytes
    siaddr: str
    plan: BootPlan | None

    def __init__(self, options: dict[int, bytes], file: bytes, siaddr: str, plan: BootPlan | None) -> None:
        self.options = options
        self.file = file
        self.siaddr = siaddr
        self.plan = plan


class _BootMemo:
    """A DISCOVER's boot answer and encoded options, kept for its REQUEST.

    The ACK carries the boot data of the OFFER whenever nothing it depends on has changed: the same node (the
    cached registry answer, by identity), the same client classification and boot-relevant options (97, 55),
    the same subnet options and the same boot policy (a reload replaces both). Deciding and encoding them again
    cost as much as the rest of the ACK (bench/dhcp profile); reusing them changes no byte of the reply.
    """

    __slots__ = ("asks", "block", "boot", "encoded", "http", "machine", "node", "policy", "pxe", "vendor_class")

    def __init__(self, node: Node, policy: BootPlanner, encoded: bytes | None, machine: Machine,
                 vendor_class: str | None, pxe: bool, http: bool, asks: tuple[bytes | None, bytes | None],
                 boot: BootAnswer, block: bytes | None) -> None:
        self.node = node
        self.policy = policy
        self.encoded = encoded  # the subnet's options block it was built on (a reload replaces it)
        self.machine = machine
        self.vendor_class = vendor_class
        self.pxe = pxe
        self.http = http
        self.asks = asks  # the request's options 97 (GUID) and 55 (parameter list)
        self.boot = boot
        self.block = block  # the options block for reply_bytes (None: the reply is built the slow way)


# [dhcp] settings the running service applies on reload, and those only a restart applies: the
# sockets (address, ports, device) are bound once, the mode decides which sockets exist, and the
# server address is the identifier every client's lease names. queue_size is the transport's (live).
LIVE: Final = ("pool_start", "pool_end", "netmask", "router", "dns", "domain", "lease_time", "offer_hold",
        "decline_hold", "subnets")
KIND_CACHE: Final = 1024  # kinds of client remembered with their boot answer (cleared when full)
GIADDR_CACHE: Final = 1024  # relay addresses remembered with their subnet (a forged-giaddr flood only refills it)


@dataclass(slots=True)
class Subnet:
    """One served subnet at run time: its pool index and the options its clients get."""

    config: SubnetConfig
    pool: LeasePool
    options: dict[int, bytes]
    encoded: bytes | None = None  # the options' TLVs, encoded once for every OFFER and ACK (None: encode per reply)

    def __post_init__(self) -> None:
        self.encoded = encode_options(self.options) if OWN_OPTIONS.isdisjoint(self.options) else None

    @classmethod
    def build(cls, config: SubnetConfig, server_address: str) -> Subnet:
        pool = LeasePool.for_range(config.pool_start, config.pool_end, config.netmask)
        # The server's own address is never handed out, even when inside the pool range.
        pool.stick(ip_int(server_address), SERVER)
        return cls(config, pool, _options(config))

    def update(self, config: SubnetConfig) -> None:
        """A reload: move the range in place (every claim kept), new options."""
        self.pool.set_range(config.pool_start, config.pool_end, config.netmask)  # ValueError: nothing changed
        self.config = config
        self.options = _options(config)
        self.__post_init__()


def _options(config: SubnetConfig) -> dict[int, bytes]:
    return lease_options(lease_time=config.lease_time, netmask=config.netmask, router=config.router,
                         dns=config.dns, domain=config.domain)
RESTART: Final = ("enabled", "mode", "listen", "interface", "port", "client_port", "proxy_port")


class DhcpService:
    """Decides the reply to each classified request; the transport only moves bytes."""

    def __init__(self, store: NodeStore, registry: RegistryService, boot: BootPlanner, config: DhcpConfig,
                 *, server_address: str, clock: Callable[[], float] = time.time, lifecycle: Lifecycle | None = None,
                 credentials: Credentials | None = None, cluster: Cluster | None = None) -> None:
        if config.mode not in ("full", "proxy"):
            raise ValueError(f"dhcp mode {config.mode!r} is neither 'full' nor 'proxy'")
        self.store = store
        self.registry = registry
        self.boot = boot
        self.config = config
        self.server_id = server_address
        self._server_bytes = ip_to_bytes(server_address)
        self.clock = clock
        self.subnets: list[Subnet] = []
        if config.mode == "full":
            if not config.all_subnets():
                raise ValueError("full DHCP mode needs dhcp.pool_start and dhcp.pool_end (or [[dhcp.subnets]])")
            self.subnets = [Subnet.build(sc, server_address) for sc in config.all_subnets()]
        self._set_local()
        self._owns_boot = False  # True when from_config built the planner: reload() rebuilds it then
        # Tests build the service alone; the daemon passes the one lifecycle every transport shares.
        self.lifecycle = lifecycle or Lifecycle(store, registry.config, CollectorRegistry())
        self.credentials = credentials  # proxy mode records its PXE exchanges there (a credential's evidence)
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._nodes: dict[str, tuple[Node, float]] = {}  # mac -> (node, cached_at)
        self._memos: dict[str, _BootMemo] = {}  # mac -> its OFFER's boot answer (bounded like _nodes: same expiry)
        # A kind of client -> (policy, subnet, its options block, boot answer, options block): see _offer_boot.
        self._kinds: dict[tuple[object, ...], tuple[BootPlanner, Subnet, bytes | None, BootAnswer, bytes | None]] = {}
        self._next_reload = math.inf  # set by load()
        self._armed = math.inf  # when run() wakes up next
        self._wake = asyncio.Event()
        # Several servers on one registry: answer only our share of the clients (cluster.owns, no I/O).
        self.cluster = cluster
        self._buckets: dict[bytes, int] = {}
        if cluster is not None:
            cluster.on_change(self._servers_changed)
            self._servers_changed()

    @classmethod
    def from_config(cls, config: Config, store: NodeStore, registry: RegistryService,
                    lifecycle: Lifecycle | None = None) -> DhcpService:
        """A service that also owns its boot decisions (a BootPolicy), so its reload() applies [boot] too."""
        svc = cls(store, registry, BootPolicy.from_config(config), config.dhcp, server_address=config.server.address,
                  lifecycle=lifecycle)
        svc._owns_boot = True
        return svc

    def _servers_changed(self) -> None:
        """The live servers changed: re-read the leases now (a dead server's clients are ours from now on,
        and it leased addresses we never saw), and start allocating in our own part of each pool, so live
        servers rarely pick the same free address (the database refuses the second anyway)."""
        assert self.cluster is not None
        index, count = self.cluster.position
        for sub in self.subnets:
            pool = sub.pool
            pool.cursor = pool.start + (pool.end - pool.start + 1) * index // count
        self._next_reload = 0.0
        self._poke(0.0)

    @property
    def pool(self) -> LeasePool | None:
        """The local subnet's pool (the only one before [[dhcp.subnets]]), or None in proxy mode."""
        return self.local.pool if self.local is not None else (self.subnets[0].pool if self.subnets else None)

    def _set_local(self) -> None:
        """Which subnet unrelayed clients get: the one bound to dhcp.interface, else the [dhcp] pool's,
        else the one holding the server's address (None: unrelayed clients are refused, and counted).

        Also the [dhcp] values read for every packet, copied into this (compiled) object: DhcpConfig is a plain
        Python class, and an attribute read on it costs a dictionary lookup or two (five reads an exchange)."""
        cfg = self.config
        self._port, self._client_port, self._proxy_port = cfg.port, cfg.client_port, cfg.proxy_port
        self._offer_hold = cfg.offer_hold
        self._by_giaddr: dict[str, Subnet | None] = {}
        self._on_interface = {x.config.interface: x for x in self.subnets if x.config.interface}
        self.local: Subnet | None = None
        iface = self.config.interface
        server = ip_int(self.server_id)
        for sub in self.subnets:
            if iface and sub.config.interface == iface:
                self.local = sub
                return
        if self.subnets and self.config.pool_start:
            self.local = self.subnets[0]
            return
        self.local = next((x for x in self.subnets if x.config.interface is None and x.pool.in_subnet(server)), None)

    def subnet_for(self, packet: DhcpPacket, interface: str | None = None) -> Subnet | None:
        """The subnet a request comes from: giaddr (relayed), else ciaddr (a renewing client's unicast,
        possibly from a relayed subnet), else the local segment. No I/O, one dict hit per relayed packet."""
        if packet.giaddr != ZERO_IP:
            hit = self._by_giaddr.get(packet.giaddr, False)
            if hit is not False:
                return hit  # type: ignore[return-value]
            found = self._containing(ip_int(packet.giaddr))
            if len(self._by_giaddr) >= GIADDR_CACHE:
                self._by_giaddr.clear()
            self._by_giaddr[packet.giaddr] = found
            return found
        if packet.ciaddr != ZERO_IP:
            found = self._containing(ip_int(packet.ciaddr))
            if found is not None:
                return found
        if interface is not None and interface != self.config.interface:
            return self._on_interface.get(interface, self.local)
        return self.local

    def _containing(self, ip: int) -> Subnet | None:
        for sub in self.subnets:
            if sub.pool.in_subnet(ip):
                return sub
        return None

    @staticmethod
    def _no_subnet(packet: DhcpPacket) -> Outcome:
        if packet.giaddr != ZERO_IP:
            return _ignore("foreign-subnet", f"giaddr {packet.giaddr} is in no subnet this server serves")
        return _ignore("no-local-subnet", "an unrelayed client, and no subnet is this segment's (set dhcp.pool_start "
                                          "or a subnet's interface)")

    def reload(self, config: Config) -> list[str]:
        """Apply every [dhcp] setting that can change live (and [boot] when this service owns its planner).

        Returns the settings that changed but need a restart (see RESTART for why). Synchronous on
        purpose: nothing awaits between two packets seeing half of the old and half of the new values.
        """
        new, old = config.dhcp, self.config
        restart = [f"dhcp.{k}" for k in RESTART if getattr(new, k) != getattr(old, k)]
        if config.server.address != self.server_id:
            restart.append("server.address")
        live = dataclasses.replace(old, **{k: getattr(new, k) for k in LIVE})
        if self.subnets:
            wanted = live.all_subnets()
            if not wanted:
                raise ValueError("full DHCP mode needs dhcp.pool_start and dhcp.pool_end (or [[dhcp.subnets]])")
            if len(wanted) != len(self.subnets):
                # A new subnet's pool must first be indexed from the store (its leases): only at start.
                restart.append("dhcp.subnets")
                live = dataclasses.replace(live, pool_start=old.pool_start, pool_end=old.pool_end,
                                           netmask=old.netmask, subnets=old.subnets)
                wanted = old.all_subnets()
            for sc in wanted:  # check every range first: a refused reload changes nothing
                LeasePool.for_range(sc.pool_start, sc.pool_end, sc.netmask)
            for sub, sc in zip(self.subnets, wanted, strict=True):
                sub.update(sc)
        self.config = live
        self._set_local()
        if self._owns_boot:
            self.boot = BootPolicy.from_config(config)
        return restart

    async def load(self, now: float | None = None) -> None:
        """Index the stored leases and node addresses (once; a restart keeps every lease)."""
        async with self._load_lock:
            if not self._loaded and self.subnets:
                await self._reload()
                log.info("event=dhcp-loaded subnets=%d leases=%d node_addresses=%d", len(self.subnets),
                         sum(len(x.pool.leases) for x in self.subnets),
                         sum(len(x.pool.sticky) - 1 for x in self.subnets))
                self._next_reload = (self.clock() if now is None else now) + NODE_RELOAD_EVERY
            self._loaded = True

    async def _reload(self) -> None:
        """Rebuild the in-memory index from the store.

        Done at start and every NODE_RELOAD_EVERY seconds because the CLI (another process) may delete a
        node (and its lease) or give it an address. Addresses bound or freed here while the store was
        being read are tracked and re-applied, so the reload never forgets a decision made meanwhile.
        """
        pools = [x.pool for x in self.subnets]
        for pool in pools:
            pool.begin_reload()
        try:
            leases = await self.store.list_leases()
            nodes = await self.store.list_nodes()
        except BaseException:
            for pool in pools:
                pool.abort_reload()
            raise
        held = [(ip_int(x.ip), x.mac, x.expires) for x in leases]
        owned = [(ip_int(n.ip), n.mac) for n in nodes if n.ip]
        for pool in pools:
            pool.finish_reload((x for x in held if pool.in_subnet(x[0])), (x for x in owned if pool.in_subnet(x[0])),
                               ip_int(self.server_id))

    # -- timers ------------------------------------------------------------------------
    # Why a loop in the service and not loop.call_at in the transport: the periodic reload awaits the
    # store, which needs a task anyway, and one task that sleeps until the earliest deadline (the
    # pool's timer, the next reload) keeps the per-packet path to one comparison (_poke).
    def next_timer(self, now: float) -> float:
        """When on_timer has work next: the pool's timer, the node-cache expiry, the periodic reload."""
        deadline = now + (NODE_CACHE_TTL if self._nodes else NODE_RELOAD_EVERY)
        for sub in self.subnets:
            pool_timer = sub.pool.get_timer()
            if pool_timer is not None:
                deadline = min(deadline, pool_timer)
        if self.subnets:
            deadline = min(deadline, self._next_reload)
        return deadline

    async def on_timer(self, now: float) -> None:
        """Expire offers, DECLINE holds, leases and cached registry answers; re-read node addresses when due."""
        for sub in self.subnets:
            sub.pool.handle_timer(now)
        for mac, (_, at) in list(self._nodes.items()):
            if now - at > NODE_CACHE_TTL:
                del self._nodes[mac]
                self._memos.pop(mac, None)
        if self.subnets and self._loaded and now >= self._next_reload:
            self._next_reload = now + NODE_RELOAD_EVERY  # before the await: one reload at a time
            await self._reload()

    async def run(self) -> None:
        """Background job for as long as DHCP is served (the transport starts and cancels it)."""
        await self.load()
        while True:
            try:
                await self.on_timer(self.clock())
            except StoreError as exc:
                # The index stays as it was (every ACK still updates it); the next reload tries again.
                log.warning("event=dhcp-reload-failed error=%r retry_in=%ss", str(exc), NODE_RELOAD_EVERY)
            self._armed = self.next_timer(self.clock())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, self._armed - self.clock()))

    def _poke(self, deadline: float) -> None:
        """A claim with an earlier deadline than run() sleeps for: wake it (cheap; called per claim)."""
        if deadline < self._armed:
            self._armed = deadline
            self._wake.set()

    # -- entry point -----------------------------------------------------------------
    def peer_share(self, data: bytes, port: int) -> str | None:
        """Before parsing: why a raw datagram is a peer server's to answer (None: handle it, or not sure).

        Called by the transport on arrival, so with several servers each one spends a few byte reads on its
        peers' clients instead of a queue slot and a parse. Same rule as in handle(), which still checks
        every packet this lets through.
        """
        cluster = self.cluster
        if cluster is None or not cluster.shared or port == self._proxy_port:
            return None
        key = wire_split_key(data, _SPLIT_CODES)
        return None if key is None else self._peers(cluster, key, data[28:34].hex(":"))

    def _peers(self, cluster: Cluster, key: bytes, mac: str) -> str | None:
        """Why the client with this load-balancing key is a peer's (None: it is ours); buckets are cached."""
        share = self._buckets.get(key)
        if share is None:
            if len(self._buckets) >= BUCKET_CACHE:
                self._buckets.clear()
            share = self._buckets[key] = lb_hash(key)
        if cluster.owns(share):
            return None
        return f"{mac} hashes to bucket {share}, server {cluster.owner(share).id}'s"

    async def handle(self, packet: DhcpPacket, *, port: int, now: float,
                     source: tuple[str, int] | None = None, interface: str | None = None) -> Outcome:
        """Decide the replies to one request. Malformed options raise RemoteProtocolError.

        ``interface`` is the device the request came in on (when the transport knows): an unrelayed client
        there gets the subnet bound to that interface.
        """
        result = (await self.handle_many([Request(packet, port, source, interface)], now))[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def handle_many(self, requests: Sequence[Request], now: float) -> list[Outcome | Exception]:
        """Decide the replies to a batch of requests (what the transport read in one go), one answer each, in order:
        an Outcome, or the exception that request raised (RemoteProtocolError, StoreError, ...).

        Why a batch: per request, the work is small next to the trips it needs (the registry's answer, the lease's
        commit, the tasks and futures around each). Here every DISCOVER and REQUEST of the batch goes through the
        same steps together: the synchronous checks, one registry trip for all (registration included), the
        allocations (synchronous, so two requests of one batch never get one address), one group commit for every
        lease, then the replies, none sent before the commit that holds its lease. The rarer messages (DECLINE,
        RELEASE, INFORM, proxy and boot-server requests) run one by one alongside.
        """
        if not self._loaded:
            await self.load(now)
        answers: list[Outcome | Exception | None] = [None] * len(requests)
        exchanges: list[_Exchange] = []
        others: list[tuple[int, Callable[[], Awaitable[Outcome]]]] = []
        for i, r in enumerate(requests):
            try:
                step = self._begin(i, r, now)
            except Exception as exc:
                answers[i] = exc
                continue
            if isinstance(step, Outcome):
                answers[i] = step
            elif isinstance(step, _Exchange):
                exchanges.append(step)
            else:
                others.append((i, step))
        if exchanges:
            await self._exchanges(exchanges, answers, now)
        if others:
            got = await asyncio.gather(*(fn() for _, fn in others), return_exceptions=True)
            for (i, _), one in zip(others, got, strict=True):
                if isinstance(one, BaseException) and not isinstance(one, Exception):
                    raise one
                answers[i] = one
        return [a if a is not None else _ignore("internal-error", "no answer") for a in answers]

    def _begin(self, index: int, r: Request, now: float) -> Outcome | _Exchange | Callable[[], Awaitable[Outcome]]:
        """The checks every request gets before any I/O: an answer already, an exchange (DISCOVER, REQUEST) for
        the batch's steps, or the call that handles a rarer message."""
        packet, port = r.packet, r.port
        c = classify(packet)
        if isinstance(c, Ignore):
            return _ignore(c.reason, c.detail)
        if packet.hops > MAX_HOPS:
            return _ignore("too-many-hops", f"hops {packet.hops}")
        cluster = self.cluster
        if cluster is not None and cluster.shared and c.msg_type in SPLIT_TYPES and port != self._proxy_port:
            why = self._peers(cluster, client_key(packet), c.machine.mac)
            if why is not None:
                return _ignore("peer-share", why)
        if port == self._proxy_port and port != self._port:
            return functools.partial(self._boot_server, packet, c, now, r.source)
        if not self.subnets:
            return functools.partial(self._proxy, packet, c, now)
        mt = c.msg_type
        if mt is MT.DISCOVER:
            sub = self.subnet_for(packet, r.interface)
            if sub is None:
                return self._no_subnet(packet)
            return _Exchange(index, packet, c, sub, fresh=True)
        if mt is MT.REQUEST:
            return self._begin_request(index, packet, c, r.interface)
        if mt is MT.DECLINE:
            return functools.partial(self._decline, packet, c, now)
        if mt is MT.RELEASE:
            return functools.partial(self._release, packet, c, now)
        if mt is MT.INFORM:
            return functools.partial(self._inform, packet, c, now, r.interface)
        return _ignore("unexpected-type", f"{mt.name} from a client")

    async def _exchanges(self, exchanges: list[_Exchange], answers: list[Outcome | Exception | None],
                         now: float) -> None:
        """The DISCOVERs and REQUESTs of a batch: nodes, allocations, one lease commit, replies."""
        try:
            await self._nodes_for(exchanges, now)
        except Exception as exc:  # the registry's trip failed: every exchange that waited for it fails alike
            for x in exchanges:
                if not x.resolved:
                    answers[x.index] = exc
            exchanges = [x for x in exchanges if x.resolved]
        claimed: list[_Exchange] = []
        for x in exchanges:
            try:
                outcome = self._offer(x, now) if x.fresh else self._claim(x, now)
            except Exception as exc:
                answers[x.index] = exc
                continue
            if outcome is None:
                claimed.append(x)
            else:
                answers[x.index] = outcome
        if not claimed:
            return
        leases = [x.lease for x in claimed if x.lease is not None]
        try:
            stored: list[Exception | None] = await self.store.put_leases(
                leases, now=now, server=self.cluster.id if self.cluster is not None else None)
        except BaseException as exc:
            if not isinstance(exc, Exception):
                for x in claimed:
                    x.sub.pool.unbind(x.ip)
                raise
            stored = [exc] * len(claimed)  # the commit failed: nothing of the batch is stored
        marks: list[Awaitable[None]] = []
        for x, failed in zip(claimed, stored, strict=True):
            if failed is None:
                answers[x.index] = self._ack(x, now, marks)
            elif isinstance(failed, Conflict):
                # Another server (sharing the registry) holds it: the database said no. Keep away from it until
                # the leases are re-read, and send the client back to DISCOVER for another address.
                x.sub.pool.unbind(x.ip)
                x.sub.pool.stick(x.ip, OTHER)
                self._reload_soon(now)
                answers[x.index] = self._nak(x.packet, f"{int_ip(x.ip)} is not available: {failed}")
            else:
                x.sub.pool.unbind(x.ip)
                answers[x.index] = failed
        if marks:
            await asyncio.gather(*marks)

    async def _nodes_for(self, exchanges: list[_Exchange], now: float) -> None:
        """Each exchange's node: the registry's answer (registering on first contact), one trip for the batch; a
        REQUEST reuses the answer its DISCOVER got for NODE_CACHE_TTL seconds."""
        asking: list[_Exchange] = []
        for x in exchanges:
            hit = None if x.fresh else self._cached(x.client.machine.mac, now)
            if hit is not None:
                x.node, x.resolved = hit, True
            else:
                asking.append(x)
        if not asking:
            return
        answers = await self.registry.decide_many([(x.client.machine, x.client.pxe) for x in asking], now)
        for x, answer in zip(asking, answers, strict=True):
            x.node, x.resolved = self._remember(x.client.machine.mac, answer.node, now), True
            if answer.node is None:
                # Debug only: refusals come at packet rate from a flood; the transport counts them.
                log.debug("event=refused mac=%s reason=%r", x.client.machine.mac, answer.reason)

    # -- helpers -----------------------------------------------------------------------
    async def _node(self, c: Client, now: float, *, fresh: bool) -> Node | None:
        """The registry's answer (registering on first contact), cached briefly between DISCOVER and REQUEST."""
        hit = None if fresh else self._cached(c.machine.mac, now)
        if hit is not None:
            return hit
        return self._remember(c.machine.mac, await self.registry.resolve(c.machine, now, netboot=c.pxe), now)

    def _cached(self, mac: str, now: float) -> Node | None:
        """The registry's answer for ``mac`` if it is at most NODE_CACHE_TTL seconds old (None: ask again)."""
        hit = self._nodes.get(mac)
        return hit[0] if hit is not None and now - hit[1] <= NODE_CACHE_TTL else None

    def _remember(self, mac: str, node: Node | None, now: float) -> Node | None:
        """Keep the registry's answer for the next request of the exchange; a refusal is never kept."""
        if node is not None:
            self._nodes[mac] = (node, now)
        else:
            self._nodes.pop(mac, None)
        self._memos.pop(mac, None)
        return node

    def _boot(self, packet: DhcpPacket, c: Client, node: Node | None, subnet: Subnet | None = None) -> BootAnswer:
        if subnet is not None and (subnet.config.public_url or subnet.config.next_server):
            plan = self.boot.plan(c.machine, node, pxe=c.pxe, public_url=subnet.config.public_url,
                                  next_server=subnet.config.next_server)
        else:
            plan = self.boot.plan(c.machine, node, pxe=c.pxe)
        if plan is None:
            log.info("event=dhcp-no-nbp mac=%s firmware=%s arch=%s reason=%r", c.machine.mac,
                     c.machine.firmware.value, c.machine.arch, "no network boot program for this firmware")
            return BootAnswer({}, b"", ZERO_IP, None)
        opts, file = boot_options(c, plan, packet)
        return BootAnswer(opts, file, plan.next_server or ZERO_IP, plan)

    async def _mark_pxe(self, node: Node | None, c: Client, plan: BootPlan | None, now: float,
                        address: str | None = None) -> None:
        """First contact -> discovered; a boot firmware that got its boot file -> pxe.

        In proxy mode this exchange is also the evidence a node credential is later issued against.
        """
        if node is None or plan is None or not c.pxe:
            return
        if self.credentials is not None and self.config.mode == "proxy":
            try:
                await self.credentials.note_pxe(node.mac, now, address)
            except StoreError as exc:
                log.warning("event=dhcp-evidence-failed node=%s error=%r", node.name, str(exc))
        if node.state is State.PXE:
            return
        try:
            updated = await self.lifecycle.change(
                node.name, State.PXE,
                f"dhcp: {c.machine.firmware.value}{' ipxe' if c.machine.ipxe else ''} boot file {plan.filename}",
                actor=Actor.FIRMWARE, now=now, node=node)
        except TransitionRefused:
            return  # a running node is not the firmware's to change; the lifecycle counted and recorded it
        except StoreError as exc:
            # The node's timeline misses a step; the machine must still get its answer.
            log.warning("event=dhcp-state-failed node=%s error=%r", node.name, str(exc))
            return
        self._nodes[c.machine.mac] = (updated, now)

    def _send(self, packet: DhcpPacket, mt: o.MessageType, *, yiaddr: str, siaddr: str,
              options: dict[int, bytes], file: bytes) -> Reply:
        rep = build_reply(packet, mt, server_id=self.server_id, yiaddr=yiaddr, siaddr=siaddr, options=options,
                          file=file)
        return self._addressed(packet, mt, rep.encode())

    def _addressed(self, packet: DhcpPacket, mt: o.MessageType, data: bytes) -> Reply:
        addr, port = destination(packet, mt, server_port=self._port, client_port=self._client_port)
        return Reply(data, addr, port, mt)

    def _lease_reply(self, packet: DhcpPacket, mt: o.MessageType, ip: int, sub: Subnet, boot: BootAnswer,
                     block: bytes | None) -> Reply:
        """An OFFER or ACK of an address: ``block`` is the subnet's options as encoded once (Subnet.encoded), then
        the boot options (_block); the bytes build_reply would give, in the order it gives them. None: built the
        slow way (build_reply), when the boot options clash with the subnet's or the subnet has no block."""
        if block is None:
            return self._send(packet, mt, yiaddr=int_ip(ip), siaddr=boot.siaddr,
                              options={**sub.options, **boot.options}, file=boot.file)
        data = reply_bytes(packet, mt, server_id=self._server_bytes, yiaddr=ip.to_bytes(4, "big"), siaddr=boot.siaddr,
                           options=block, file=boot.file)
        return self._addressed(packet, mt, data)

    @staticmethod
    def _block(sub: Subnet, boot: BootAnswer) -> bytes | None:
        """The options block of a reply with this boot answer (None: the reply is built the slow way)."""
        extra = boot.options
        clash = bool(extra) and not (OWN_OPTIONS.isdisjoint(extra) and sub.options.keys().isdisjoint(extra))
        if sub.encoded is None or clash:
            return None
        return sub.encoded + encode_options(extra) if extra else sub.encoded

    def _offer_boot(self, packet: DhcpPacket, c: Client, node: Node, sub: Subnet) -> tuple[BootAnswer, bytes | None]:
        """An OFFER's boot answer and options block, shared by every client of one kind when the answer cannot depend
        on the client itself: no node variables, and not iPXE (whose script URL names the MAC). A rack powering on
        is hundreds of clients of one kind; deciding and encoding the same answer for each was a tenth of the
        DISCOVER path (bench/dhcp profile). The policy, the subnet and its options block must be the ones it was
        built with (a reload replaces them)."""
        shared = not node.vars and not c.machine.ipxe
        key: tuple[object, ...] = ()
        if shared:
            opts = packet.options
            key = (id(sub), c.machine.firmware, c.machine.arch, c.pxe, c.http, c.vendor_class,
                   opts.get(o.CLIENT_GUID) if c.pxe else None, opts.get(o.PARAMETER_LIST))
            hit = self._kinds.get(key)
            if hit is not None and hit[0] is self.boot and hit[1] is sub and hit[2] is sub.encoded:
                return hit[3], hit[4]
        boot = self._boot(packet, c, node, sub)
        block = self._block(sub, boot)
        if shared and boot.plan is not None:
            if len(self._kinds) >= KIND_CACHE:
                self._kinds.clear()  # PXE clients' GUIDs make every key new: they only refill it
            self._kinds[key] = (self.boot, sub, sub.encoded, boot, block)
        return boot, block

    def _memo(self, x: _Exchange) -> _BootMemo | None:
        """The OFFER's boot answer for this REQUEST, if nothing it depends on changed (see _BootMemo)."""
        memo = self._memos.get(x.client.machine.mac)
        if memo is None:
            return None
        c = x.client
        if (memo.node is x.node and memo.policy is self.boot and memo.encoded is x.sub.encoded
                and memo.machine == c.machine and memo.vendor_class == c.vendor_class and memo.pxe == c.pxe
                and memo.http == c.http and memo.asks == _boot_asks(x.packet)):
            return memo
        return None

    def _nak(self, packet: DhcpPacket, why: str) -> Outcome:
        log.info("event=dhcp-nak mac=%s reason=%r", _mac(packet), why)
        return Outcome([nak(packet, server_id=self.server_id, message=why, server_port=self.config.port,
                            client_port=self.config.client_port)])

    # -- full mode -----------------------------------------------------------------------
    @staticmethod
    def _choose(pool: LeasePool, c: Client, node: Node, packet: DhcpPacket, now: float) -> int | None:
        """RFC 2131 4.3.1 order: the node's own address, its current lease or offer, the requested one, any free."""
        mac = c.machine.mac
        candidates: list[int] = []
        if node.ip:
            candidates.append(ip_int(node.ip))
        for held in (pool.lease_of.get(mac), pool.offer_of.get(mac)):
            if held is not None:
                candidates.append(held)
        want = o.requested_ip(packet)
        if want is not None:
            candidates.append(ip_int(want))
        for ip in candidates:
            # A node's own address may sit outside the dynamic range (set by the admin) but must be on the subnet.
            ok_range = pool.in_pool(ip) or (node.ip is not None and ip == ip_int(node.ip) and pool.in_subnet(ip))
            if ok_range and pool.available(ip, mac, now):
                return ip
        return pool.free(mac, now)

    def _offer(self, x: _Exchange, now: float) -> Outcome:
        """A DISCOVER with its node: choose an address, hold it for the offer, answer."""
        c, node, sub = x.client, x.node, x.sub
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        ip = self._choose(sub.pool, c, node, x.packet, now)
        if ip is None:
            log.warning("event=dhcp-pool-exhausted mac=%s subnet=%s", c.machine.mac, sub.config.subnet)
            return _ignore("pool-exhausted", f"no free address in {sub.config.subnet} for {c.machine.mac}")
        until = now + self._offer_hold
        sub.pool.offer(ip, c.machine.mac, until)
        self._poke(until)
        boot, block = self._offer_boot(x.packet, c, node, sub)
        reply = self._lease_reply(x.packet, MT.OFFER, ip, sub, boot, block)
        self._memos[c.machine.mac] = _BootMemo(node, self.boot, sub.encoded, c.machine, c.vendor_class, c.pxe, c.http,
                                               _boot_asks(x.packet), boot, block)
        return Outcome([reply])

    def _begin_request(self, index: int, packet: DhcpPacket, c: Client,
                       interface: str | None) -> Outcome | _Exchange:
        """A REQUEST's checks that need no node: whose it is, which subnet, whether the address is on it."""
        mac = c.machine.mac
        req = request_state(packet)
        if isinstance(req, Ignore):
            return _ignore(req.reason, req.detail)
        sub = self.subnet_for(packet, interface)
        if req.state is ClientState.SELECTING and req.server_id != self.server_id and not self._took_over(
                req.server_id):
            # The client chose another server: our offer is free again.
            if sub is not None:
                sub.pool.drop_offer(mac)
            return _ignore("other-server", f"{mac} selected server {req.server_id}")
        if sub is None:
            return self._no_subnet(packet)
        ip = ip_int(req.address)
        if not sub.pool.in_subnet(ip):
            if req.configured:
                # RFC 2131 4.3.2: a REBINDING client on another network is not ours to refuse.
                return _ignore("foreign-subnet", f"{mac} renews {int_ip(ip)} outside our subnet")
            return self._nak(packet, f"{int_ip(ip)} is not on this network")
        return _Exchange(index, packet, c, sub, ip=ip)

    def _claim(self, x: _Exchange, now: float) -> Outcome | None:
        """A REQUEST with its node: refuse (NAK) or bind the address in memory, its lease to be committed before
        the ACK (None). No await between the check and the claim."""
        mac, node, pool, ip = x.client.machine.mac, x.node, x.sub.pool, x.ip
        if node is None:
            return _ignore("refused", f"registry refused {mac}")
        own = node.ip is not None and ip == ip_int(node.ip)
        if not (pool.in_pool(ip) or own) or not pool.available(ip, mac, now):
            return self._nak(x.packet, f"{int_ip(ip)} is not available to {mac}")
        if node.ip and not own and pool.in_subnet(ip_int(node.ip)) and pool.available(ip_int(node.ip), mac, now):
            # The node keeps its address: steer it back there instead of granting another one.
            return self._nak(x.packet, f"{mac} is assigned {node.ip}")
        expires = now + x.sub.config.lease_time
        # Bind in memory first, persist before the ACK (RFC 2131 4.3.1: the binding is committed before the
        # reply); the caller undoes the binding when the commit fails.
        pool.bind(ip, mac, expires)
        x.lease = Lease(int_ip(ip), mac, expires, o.hostname(x.packet))
        return None

    def _ack(self, x: _Exchange, now: float, marks: list[Awaitable[None]]) -> Outcome:
        """A REQUEST whose lease is committed: the ACK (and, for a boot firmware, its lifecycle step, in marks)."""
        assert x.lease is not None and x.node is not None
        self._poke(x.lease.expires)
        memo = self._memo(x)
        if memo is not None:
            boot, block = memo.boot, memo.block
        else:
            boot = self._boot(x.packet, x.client, x.node, x.sub)
            block = self._block(x.sub, boot)
        if boot.plan is not None and x.client.pxe:
            marks.append(self._mark_pxe(x.node, x.client, boot.plan, now))
        log.debug("event=dhcp-ack mac=%s ip=%s node=%s file=%r", x.client.machine.mac, x.lease.ip, x.node.name,
                  boot.file)
        return Outcome([self._lease_reply(x.packet, MT.ACK, x.ip, x.sub, boot, block)])

    def _took_over(self, server_id: str | None) -> bool:
        """RFC 2131 4.3.2: a REQUEST naming another server is that server's, unless that server is dead and its
        share is ours now (the caller checked the share): then we answer in its place."""
        return server_id is not None and self.cluster is not None and self.cluster.is_dead(server_id)

    def _reload_soon(self, now: float) -> None:
        due = now + CONFLICT_RELOAD_AFTER
        if due < self._next_reload:
            self._next_reload = due
            self._poke(due)

    async def _decline(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        if o.server_id(packet) not in (None, self.server_id) and not self._took_over(o.server_id(packet)):
            return _ignore("other-server", "DECLINE for another server")
        wanted = o.requested_ip(packet)
        if wanted is None:
            return _ignore("no-requested-ip", "DECLINE without option 50")
        ip = ip_int(wanted)
        sub = self._containing(ip)
        held = sub.pool.leases.get(ip) if sub is not None else None
        if sub is None or held is None or held[0] != c.machine.mac:
            return _ignore("not-holder", f"{c.machine.mac} declines {wanted}, which it does not hold")
        pool = sub.pool
        # Someone else answers ARP for it: park the address and let the client DISCOVER again.
        log.warning("event=dhcp-decline mac=%s ip=%s reason=%r", c.machine.mac, wanted, "address in use on the wire")
        until = now + self.config.decline_hold
        pool.decline(ip, until)
        self._poke(until)
        await self.store.release_lease(wanted)
        return Outcome()

    async def _release(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        if o.server_id(packet) not in (None, self.server_id) and not self._took_over(o.server_id(packet)):
            return _ignore("other-server", "RELEASE for another server")
        if packet.ciaddr == ZERO_IP:
            return _ignore("no-ciaddr", "RELEASE without ciaddr")
        ip = ip_int(packet.ciaddr)
        sub = self._containing(ip)
        held = sub.pool.leases.get(ip) if sub is not None else None
        if sub is None or held is None or held[0] != c.machine.mac:
            return _ignore("not-holder", f"{c.machine.mac} releases {packet.ciaddr}, which it does not hold")
        sub.pool.unbind(ip)  # the node keeps it as its sticky address: nobody else gets it
        await self.store.release_lease(packet.ciaddr)
        log.info("event=dhcp-release mac=%s ip=%s", c.machine.mac, packet.ciaddr)
        return Outcome()

    async def _inform(self, packet: DhcpPacket, c: Client, now: float, interface: str | None = None) -> Outcome:
        if packet.ciaddr == ZERO_IP:
            return _ignore("no-ciaddr", "INFORM without ciaddr")
        node = await self._node(c, now, fresh=False)
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        sub = self.subnet_for(packet, interface)
        if sub is None:
            return self._no_subnet(packet)
        boot = self._boot(packet, c, node, sub)
        # RFC 2131 3.4: no lease time and no yiaddr in the ACK to an INFORM.
        net = {k: v for k, v in sub.options.items() if k not in (o.LEASE_TIME, o.RENEWAL_TIME, o.REBINDING_TIME)}
        return Outcome([self._send(packet, MT.ACK, yiaddr=ZERO_IP, siaddr=boot.siaddr,
                                   options={**net, **boot.options}, file=boot.file)])

    # -- proxy mode ----------------------------------------------------------------------
    async def _proxy(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        """ProxyDHCP on port 67: answer PXE DISCOVERs with boot data only (no address)."""
        if not c.pxe or c.vendor_class is None:
            return _ignore("not-pxe", f"{c.machine.mac} is not a PXE client (vendor class {c.vendor_class!r})")
        if c.msg_type is not MT.DISCOVER:
            # REQUESTs on 67 go to the real DHCP server; PXE clients come to 4011 for us.
            return _ignore("proxy-not-discover", f"{c.msg_type.name} on the DHCP port in proxy mode")
        node = await self._node(c, now, fresh=True)
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        boot = self._boot(packet, c, node)
        if boot.plan is None:
            return _ignore("no-nbp", f"no boot program for {c.machine.firmware.value} arch {c.machine.arch}")
        boot.options.setdefault(o.VENDOR_CLASS, b"PXEClient")  # what marks a ProxyDHCP offer to the client
        await self._mark_pxe(node, c, boot.plan, now)
        return Outcome([self._send(packet, MT.OFFER, yiaddr=ZERO_IP, siaddr=boot.siaddr, options=boot.options,
                                   file=boot.file)])

    async def _boot_server(self, packet: DhcpPacket, c: Client, now: float,
                           source: tuple[str, int] | None) -> Outcome:
        """Port 4011 (PXE boot server): a REQUEST/INFORM from a client that already has an address."""
        if not c.pxe:
            return _ignore("not-pxe", f"{c.machine.mac} on the boot-server port is not a PXE client")
        if c.msg_type not in (MT.REQUEST, MT.INFORM):
            return _ignore("unexpected-type", f"{c.msg_type.name} on the boot-server port")
        node = await self._node(c, now, fresh=False)
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        boot = self._boot(packet, c, node)
        if boot.plan is None:
            return _ignore("no-nbp", f"no boot program for {c.machine.firmware.value} arch {c.machine.arch}")
        boot.options.setdefault(o.VENDOR_CLASS, b"PXEClient")
        item = o.pxe_vendor_options(packet).get(o.PXE_BOOT_ITEM)
        if item is not None:
            # PXE spec 2.2.6: echo the boot item the client asked for.
            boot.options[o.VENDOR_SPECIFIC] = o.encode_suboptions({o.PXE_BOOT_ITEM: item})
        address = source[0] if source is not None else (packet.ciaddr if packet.ciaddr != ZERO_IP else None)
        await self._mark_pxe(node, c, boot.plan, now, address)
        rep = build_reply(packet, MT.ACK, server_id=self.server_id, siaddr=boot.siaddr, options=boot.options,
                          file=boot.file)
        if source is not None:
            addr, port = source
        elif packet.ciaddr != ZERO_IP:
            addr, port = packet.ciaddr, self.config.proxy_port
        else:
            return _ignore("no-ciaddr", "boot-server request without a source address")
        return Outcome([Reply(rep.encode(), addr, port, MT.ACK)])


def _boot_asks(packet: DhcpPacket) -> tuple[bytes | None, bytes | None]:
    """The request's options a boot answer depends on (boot_options): 97, echoed, and 55, which may ask for 66."""
    opts = packet.options
    return opts.get(o.CLIENT_GUID), opts.get(o.PARAMETER_LIST)


def _mac(packet: DhcpPacket) -> str:
    return packet.chaddr[:6].hex(":")
