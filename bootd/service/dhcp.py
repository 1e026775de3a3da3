"""The DHCP server's decisions: who gets which address and which boot file.

Full mode is an RFC 2131 server for one pool (DISCOVER/OFFER/REQUEST/ACK/NAK,
DECLINE, RELEASE, INFORM, relays via giaddr). Proxy mode (PXE spec 2.1,
"ProxyDHCP") gives PXE clients only boot information, on port 67 and on the
boot-server port 4011, so bootd can sit next to an existing DHCP server.

Address state lives in two places on purpose. The store is the truth that
survives a restart (leases, and each node's last address, which it keeps).
An in-memory index of that truth plus short-lived offers makes allocation a
synchronous step with no ``await`` between "this address is free" and "it is
taken", so concurrent DISCOVERs can never be offered the same address.
Leases are written at ACK, not at OFFER (RFC 2131 4.3.1 lets an offer be a
soft reservation), which keeps a DISCOVER flood from writing to the database.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from bootd.errors import StoreError
from bootd.model import BootPlan, Lease, Node, State
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.packet import ZERO_IP, DhcpPacket
from bootd.proto.dhcp.pxe import Client, Ignore, classify
from bootd.proto.dhcp.reply import Reply, boot_options, build_reply, destination, lease_options, nak
from bootd.service.boot import Booter, BootPolicy
from bootd.service.lifecycle import Actor, Lifecycle, TransitionRefused
from bootd.store.base import NodeStore

if TYPE_CHECKING:
    from bootd.config import Config
    from bootd.service.registry import RegistryService

log = logging.getLogger("bootd.dhcp")

MT = o.MessageType
MAX_HOPS = 16  # RFC 1542 4.1.1 suggests relays discard beyond this; so do we
NODE_CACHE_TTL = 10.0  # DISCOVER->REQUEST reuses the registry answer for this long (seconds)
NODE_RELOAD_EVERY = 60.0  # re-read node addresses: the CLI (another process) may delete nodes or set an ip


def ip_int(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


def int_ip(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    """Plain values the service needs; built from Config by ``from_config``."""

    server_address: str
    mode: str = "full"  # "full" | "proxy"
    pool_start: str | None = None
    pool_end: str | None = None
    netmask: str = "255.255.255.0"
    router: str | None = None
    dns: tuple[str, ...] = ()
    domain: str | None = None
    lease_time: int = 3600
    server_port: int = 67
    client_port: int = 68
    proxy_port: int = 4011
    offer_hold: float = 30.0  # seconds an offered address stays reserved for its client
    decline_hold: float = 600.0  # seconds a DECLINEd address (in use by someone unknown) is skipped

    @classmethod
    def from_config(cls, config: Config) -> DhcpSettings:
        d = config.dhcp
        return cls(server_address=config.server.address, mode=d.mode, pool_start=d.pool_start,
                   pool_end=d.pool_end, netmask=d.netmask, router=d.router, dns=tuple(d.dns), domain=d.domain,
                   lease_time=d.lease_time, server_port=d.port, client_port=d.client_port,
                   proxy_port=d.proxy_port)


@dataclass(slots=True)
class Outcome:
    """What one request produced: replies to send, or why nothing is sent (a counter label)."""

    replies: list[Reply] = field(default_factory=list)
    ignored: str | None = None
    detail: str = ""


def _ignore(reason: str, detail: str = "") -> Outcome:
    return Outcome([], reason, detail)


@dataclass(slots=True)
class _Pool:
    """In-memory index of who holds which address (see module docstring for why)."""

    start: int
    end: int
    subnet: int
    mask: int
    leases: dict[int, tuple[str, float]] = field(default_factory=dict)  # ip -> (mac, expires)
    lease_of: dict[str, int] = field(default_factory=dict)  # mac -> ip
    sticky: dict[int, str] = field(default_factory=dict)  # ip -> mac of the node that owns it
    sticky_of: dict[str, int] = field(default_factory=dict)  # mac -> its sticky ip
    offers: dict[int, tuple[str, float]] = field(default_factory=dict)  # ip -> (mac, until)
    offer_of: dict[str, int] = field(default_factory=dict)  # mac -> ip
    declined: dict[int, float] = field(default_factory=dict)  # ip -> until
    cursor: int = 0
    tracking: set[int] | None = None  # addresses changed while a reload reads the store

    def in_subnet(self, ip: int) -> bool:
        return ip & self.mask == self.subnet

    def in_pool(self, ip: int) -> bool:
        return self.start <= ip <= self.end

    def available(self, ip: int, mac: str, now: float) -> bool:
        """May ``mac`` have ``ip`` now? Free, or already this client's, and not someone's sticky address."""
        held = self.leases.get(ip)
        if held is not None and held[0] != mac and held[1] > now:
            return False
        owner = self.sticky.get(ip)
        if owner is not None and owner != mac:
            return False
        offer = self.offers.get(ip)
        if offer is not None and offer[0] != mac and offer[1] > now:
            return False
        until = self.declined.get(ip)
        return not (until is not None and until > now)

    def free(self, mac: str, now: float) -> int | None:
        """Next free pool address, scanning from a cursor so sequential allocation stays O(1)."""
        size = self.end - self.start + 1
        if not self.cursor:
            self.cursor = self.start
        for step in range(size):
            ip = self.start + (self.cursor - self.start + step) % size
            if self.available(ip, mac, now):
                self.cursor = ip + 1 if ip < self.end else self.start
                return ip
        return None

    def offer(self, ip: int, mac: str, until: float) -> None:
        old = self.offer_of.pop(mac, None)
        if old is not None and old != ip:
            self.offers.pop(old, None)
        self.offers[ip] = (mac, until)
        self.offer_of[mac] = ip

    def drop_offer(self, mac: str) -> None:
        ip = self.offer_of.pop(mac, None)
        if ip is not None:
            self.offers.pop(ip, None)

    def bind(self, ip: int, mac: str, expires: float) -> None:
        self.drop_offer(mac)
        if self.tracking is not None:
            self.tracking.add(ip)
        old = self.lease_of.get(mac)
        if old is not None and old != ip:
            self.leases.pop(old, None)
            if self.tracking is not None:
                self.tracking.add(old)
        prev = self.leases.get(ip)
        if prev is not None and prev[0] != mac:
            self.lease_of.pop(prev[0], None)
        self.leases[ip] = (mac, expires)
        self.lease_of[mac] = ip
        self.stick(ip, mac)

    def stick(self, ip: int, mac: str) -> None:
        """Make ``ip`` the node's own address (a node keeps one address; the store moves it the same way)."""
        old = self.sticky_of.get(mac)
        if self.tracking is not None:
            self.tracking.add(ip)
            if old is not None:
                self.tracking.add(old)
        if old is not None and old != ip and self.sticky.get(old) == mac:
            del self.sticky[old]
        self.sticky[ip] = mac
        self.sticky_of[mac] = ip

    def unstick(self, ip: int) -> None:
        if self.tracking is not None:
            self.tracking.add(ip)
        mac = self.sticky.pop(ip, None)
        if mac is not None and self.sticky_of.get(mac) == ip:
            del self.sticky_of[mac]

    def unbind(self, ip: int) -> None:
        if self.tracking is not None:
            self.tracking.add(ip)
        held = self.leases.pop(ip, None)
        if held is not None and self.lease_of.get(held[0]) == ip:
            del self.lease_of[held[0]]

    def expire_offers(self, now: float) -> None:
        for ip, (mac, until) in list(self.offers.items()):
            if until <= now:
                del self.offers[ip]
                if self.offer_of.get(mac) == ip:
                    del self.offer_of[mac]
        for ip, until in list(self.declined.items()):
            if until <= now:
                del self.declined[ip]


class DhcpService:
    """Decides the reply to each classified request; the transport only moves bytes."""

    def __init__(self, store: NodeStore, registry: RegistryService, policy: Booter,
                 settings: DhcpSettings, lifecycle: Lifecycle | None = None) -> None:
        if settings.mode not in ("full", "proxy"):
            raise ValueError(f"dhcp mode {settings.mode!r} is neither 'full' nor 'proxy'")
        self.store = store
        self.registry = registry
        self.policy = policy
        self.settings = settings
        self.server_id = settings.server_address
        self.pool: _Pool | None = None
        if settings.mode == "full":
            if not settings.pool_start or not settings.pool_end:
                raise ValueError("full DHCP mode needs dhcp.pool_start and dhcp.pool_end")
            mask = ip_int(settings.netmask)
            start, end = ip_int(settings.pool_start), ip_int(settings.pool_end)
            if start > end or start & mask != end & mask:
                raise ValueError(f"dhcp pool {settings.pool_start}-{settings.pool_end} is not one range in one "
                                 f"subnet of netmask {settings.netmask}")
            self.pool = _Pool(start, end, start & mask, mask)
            # The server's own address is never handed out, even when inside the pool range.
            self.pool.stick(ip_int(settings.server_address), "server")
        self._net_opts = lease_options(lease_time=settings.lease_time, netmask=settings.netmask,
                                       router=settings.router, dns=settings.dns, domain=settings.domain)
        # Tests build the service alone; the daemon passes the one lifecycle every transport shares.
        self.lifecycle = lifecycle or Lifecycle(store, registry.config, CollectorRegistry())
        self._loaded = False
        self._load_lock = asyncio.Lock()
        self._nodes: dict[str, tuple[Node, float]] = {}  # mac -> (node, cached_at)
        self._last_sweep = 0.0
        self._last_reload = 0.0

    @classmethod
    def from_config(cls, config: Config, store: NodeStore, registry: RegistryService,
                    lifecycle: Lifecycle | None = None) -> DhcpService:
        policy = BootPolicy(public_url=config.http.public_url, next_server=config.server.address,
                            bios_nbp=config.boot.bios_nbp, uefi_nbp=config.boot.uefi_nbp,
                            uefi_arm64_nbp=config.boot.uefi_arm64_nbp)
        return cls(store, registry, policy, DhcpSettings.from_config(config), lifecycle)

    async def load(self) -> None:
        """Index the stored leases and node addresses (once; a restart keeps every lease)."""
        async with self._load_lock:
            if not self._loaded and self.pool is not None:
                await self._reload()
                log.info("event=dhcp-loaded leases=%d node_addresses=%d", len(self.pool.leases),
                         len(self.pool.sticky) - 1)
            self._loaded = True

    async def _reload(self) -> None:
        """Rebuild the in-memory index from the store.

        Done at start and every NODE_RELOAD_EVERY seconds because the CLI (another process) may delete a
        node (and its lease) or give it an address. Addresses bound or freed here while the store was
        being read are tracked and re-applied, so the reload never forgets a decision made meanwhile.
        """
        pool = self.pool
        assert pool is not None
        pool.tracking = set()
        try:
            leases = await self.store.list_leases()
            nodes = await self.store.list_nodes()
        except BaseException:
            pool.tracking = None
            raise
        touched = pool.tracking
        pool.tracking = None
        keep_leases = {ip: pool.leases.get(ip) for ip in touched}
        keep_sticky = {ip: pool.sticky.get(ip) for ip in touched}
        pool.leases.clear()
        pool.lease_of.clear()
        pool.sticky.clear()
        pool.sticky_of.clear()
        for lease in leases:
            pool.leases[ip_int(lease.ip)] = (lease.mac, lease.expires)
            pool.lease_of[lease.mac] = ip_int(lease.ip)
        pool.stick(ip_int(self.settings.server_address), "server")
        for node in nodes:
            if node.ip and ip_int(node.ip) not in pool.sticky:
                pool.stick(ip_int(node.ip), node.mac)
        for ip, held in keep_leases.items():
            if held is None:
                pool.unbind(ip)
            else:
                pool.leases[ip] = held
                pool.lease_of[held[0]] = ip
        for ip, owner in keep_sticky.items():
            if owner is None:
                pool.unstick(ip)
            else:
                pool.stick(ip, owner)

    # -- entry point -----------------------------------------------------------------
    async def handle(self, packet: DhcpPacket, *, port: int, now: float,
                     source: tuple[str, int] | None = None) -> Outcome:
        """Decide the replies to one request. Malformed options raise RemoteProtocolError."""
        c = classify(packet)
        if isinstance(c, Ignore):
            return _ignore(c.reason, c.detail)
        if packet.hops > MAX_HOPS:
            return _ignore("too-many-hops", f"hops {packet.hops}")
        if not self._loaded:
            await self.load()
            self._last_reload = now
        if now - self._last_sweep > 5.0:
            self._sweep(now)
            if self.pool is not None and now - self._last_reload > NODE_RELOAD_EVERY:
                self._last_reload = now  # before the await: one reload at a time
                await self._reload()
        if port == self.settings.proxy_port and port != self.settings.server_port:
            return await self._boot_server(packet, c, now, source)
        if self.pool is None:
            return await self._proxy(packet, c, now)
        mt = c.msg_type
        if mt is MT.DISCOVER:
            return await self._discover(packet, c, now)
        if mt is MT.REQUEST:
            return await self._request(packet, c, now)
        if mt is MT.DECLINE:
            return await self._decline(packet, c, now)
        if mt is MT.RELEASE:
            return await self._release(packet, c, now)
        if mt is MT.INFORM:
            return await self._inform(packet, c, now)
        return _ignore("unexpected-type", f"{mt.name} from a client")

    # -- helpers -----------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        self._last_sweep = now
        if self.pool is not None:
            self.pool.expire_offers(now)
        for mac, (_, at) in list(self._nodes.items()):
            if now - at > NODE_CACHE_TTL:
                del self._nodes[mac]

    async def _node(self, c: Client, now: float, *, fresh: bool) -> Node | None:
        """The registry's answer (registering on first contact), cached briefly between DISCOVER and REQUEST."""
        mac = c.machine.mac
        if not fresh:
            hit = self._nodes.get(mac)
            if hit is not None and now - hit[1] <= NODE_CACHE_TTL:
                return hit[0]
        node = await self.registry.resolve(c.machine, now, netboot=c.pxe)
        if node is not None:
            self._nodes[mac] = (node, now)
        else:
            self._nodes.pop(mac, None)
        return node

    def _boot(self, packet: DhcpPacket, c: Client, node: Node | None) -> tuple[dict[int, bytes], bytes, str,
                                                                              BootPlan | None]:
        plan = self.policy.plan(c.machine, node, pxe=c.pxe)
        if plan is None:
            log.info("event=dhcp-no-nbp mac=%s firmware=%s arch=%s reason=%r", c.machine.mac,
                     c.machine.firmware.value, c.machine.arch, "no network boot program for this firmware")
            return {}, b"", ZERO_IP, None
        opts, file = boot_options(c, plan, packet)
        return opts, file, plan.next_server or ZERO_IP, plan

    async def _mark_pxe(self, node: Node | None, c: Client, plan: BootPlan | None, now: float) -> None:
        """First contact -> discovered; a boot firmware that got its boot file -> pxe."""
        if node is None or plan is None or not c.pxe or node.state is State.PXE:
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
        addr, port = destination(packet, mt, server_port=self.settings.server_port,
                                 client_port=self.settings.client_port)
        return Reply(rep.encode(), addr, port, mt)

    def _nak(self, packet: DhcpPacket, why: str) -> Outcome:
        log.info("event=dhcp-nak mac=%s reason=%r", _mac(packet), why)
        return Outcome([nak(packet, server_id=self.server_id, message=why, server_port=self.settings.server_port,
                            client_port=self.settings.client_port)])

    def _relay_ok(self, packet: DhcpPacket) -> bool:
        assert self.pool is not None
        return packet.giaddr == ZERO_IP or self.pool.in_subnet(ip_int(packet.giaddr))

    # -- full mode -----------------------------------------------------------------------
    def _choose(self, c: Client, node: Node, packet: DhcpPacket, now: float) -> int | None:
        """RFC 2131 4.3.1 order: the node's own address, its current lease or offer, the requested one, any free."""
        pool = self.pool
        assert pool is not None
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

    async def _discover(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        if not self._relay_ok(packet):
            return _ignore("foreign-subnet", f"giaddr {packet.giaddr} is not on the pool's subnet")
        node = await self._node(c, now, fresh=True)
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        ip = self._choose(c, node, packet, now)
        if ip is None:
            log.warning("event=dhcp-pool-exhausted mac=%s", c.machine.mac)
            return _ignore("pool-exhausted", f"no free address for {c.machine.mac}")
        assert self.pool is not None
        self.pool.offer(ip, c.machine.mac, now + self.settings.offer_hold)
        boot_opts, file, siaddr, _ = self._boot(packet, c, node)
        opts = {**self._net_opts, **boot_opts}
        return Outcome([self._send(packet, MT.OFFER, yiaddr=int_ip(ip), siaddr=siaddr, options=opts, file=file)])

    async def _request(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        pool = self.pool
        assert pool is not None
        mac = c.machine.mac
        sid = o.server_id(packet)
        wanted = o.requested_ip(packet)
        if sid is not None:
            # SELECTING: the client names the server it chose.
            if sid != self.server_id:
                pool.drop_offer(mac)
                return _ignore("other-server", f"{mac} selected server {sid}")
            if wanted is None:
                return _ignore("no-requested-ip", f"{mac} SELECTING without option 50")
            ip = ip_int(wanted)
        elif wanted is not None and packet.ciaddr == ZERO_IP:
            ip = ip_int(wanted)  # INIT-REBOOT
        elif packet.ciaddr != ZERO_IP:
            ip = ip_int(packet.ciaddr)  # RENEWING / REBINDING
        else:
            return _ignore("no-requested-ip", f"{mac} REQUEST names no address")
        if not self._relay_ok(packet):
            return _ignore("foreign-subnet", f"giaddr {packet.giaddr} is not on the pool's subnet")
        if not pool.in_subnet(ip):
            if sid is None and packet.ciaddr != ZERO_IP:
                # RFC 2131 4.3.2: a REBINDING client on another network is not ours to refuse.
                return _ignore("foreign-subnet", f"{mac} renews {int_ip(ip)} outside our subnet")
            return self._nak(packet, f"{int_ip(ip)} is not on this network")
        node = await self._node(c, now, fresh=False)
        if node is None:
            return _ignore("refused", f"registry refused {mac}")
        own = node.ip is not None and ip == ip_int(node.ip)
        if not (pool.in_pool(ip) or own) or not pool.available(ip, mac, now):
            return self._nak(packet, f"{int_ip(ip)} is not available to {mac}")
        if node.ip and not own and pool.in_subnet(ip_int(node.ip)) and pool.available(ip_int(node.ip), mac, now):
            # The node keeps its address: steer it back there instead of granting another one.
            return self._nak(packet, f"{mac} is assigned {node.ip}")
        expires = now + self.settings.lease_time
        # Bind in memory first (no await between the check and the claim), persist before the ACK
        # (RFC 2131 4.3.1: the binding is committed before the reply), undo on failure.
        pool.bind(ip, mac, expires)
        try:
            await self.store.put_lease(Lease(int_ip(ip), mac, expires, o.hostname(packet)))
        except BaseException:
            pool.unbind(ip)
            raise
        boot_opts, file, siaddr, plan = self._boot(packet, c, node)
        await self._mark_pxe(node, c, plan, now)
        opts = {**self._net_opts, **boot_opts}
        log.debug("event=dhcp-ack mac=%s ip=%s node=%s file=%r", mac, int_ip(ip), node.name, file)
        return Outcome([self._send(packet, MT.ACK, yiaddr=int_ip(ip), siaddr=siaddr, options=opts, file=file)])

    async def _decline(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        pool = self.pool
        assert pool is not None
        if o.server_id(packet) not in (None, self.server_id):
            return _ignore("other-server", "DECLINE for another server")
        wanted = o.requested_ip(packet)
        if wanted is None:
            return _ignore("no-requested-ip", "DECLINE without option 50")
        ip = ip_int(wanted)
        held = pool.leases.get(ip)
        if held is None or held[0] != c.machine.mac:
            return _ignore("not-holder", f"{c.machine.mac} declines {wanted}, which it does not hold")
        # Someone else answers ARP for it: park the address and let the client DISCOVER again.
        log.warning("event=dhcp-decline mac=%s ip=%s reason=%r", c.machine.mac, wanted, "address in use on the wire")
        pool.unbind(ip)
        pool.unstick(ip)
        pool.declined[ip] = now + self.settings.decline_hold
        await self.store.release_lease(wanted)
        return Outcome()

    async def _release(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        pool = self.pool
        assert pool is not None
        if o.server_id(packet) not in (None, self.server_id):
            return _ignore("other-server", "RELEASE for another server")
        if packet.ciaddr == ZERO_IP:
            return _ignore("no-ciaddr", "RELEASE without ciaddr")
        ip = ip_int(packet.ciaddr)
        held = pool.leases.get(ip)
        if held is None or held[0] != c.machine.mac:
            return _ignore("not-holder", f"{c.machine.mac} releases {packet.ciaddr}, which it does not hold")
        pool.unbind(ip)  # the node keeps it as its sticky address: nobody else gets it
        await self.store.release_lease(packet.ciaddr)
        log.info("event=dhcp-release mac=%s ip=%s", c.machine.mac, packet.ciaddr)
        return Outcome()

    async def _inform(self, packet: DhcpPacket, c: Client, now: float) -> Outcome:
        if packet.ciaddr == ZERO_IP:
            return _ignore("no-ciaddr", "INFORM without ciaddr")
        node = await self._node(c, now, fresh=False)
        if node is None:
            return _ignore("refused", f"registry refused {c.machine.mac}")
        boot_opts, file, siaddr, _ = self._boot(packet, c, node)
        # RFC 2131 3.4: no lease time and no yiaddr in the ACK to an INFORM.
        net = {k: v for k, v in self._net_opts.items() if k not in (o.LEASE_TIME, o.RENEWAL_TIME, o.REBINDING_TIME)}
        return Outcome([self._send(packet, MT.ACK, yiaddr=ZERO_IP, siaddr=siaddr, options={**net, **boot_opts},
                                   file=file)])

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
        boot_opts, file, siaddr, plan = self._boot(packet, c, node)
        if plan is None:
            return _ignore("no-nbp", f"no boot program for {c.machine.firmware.value} arch {c.machine.arch}")
        boot_opts.setdefault(o.VENDOR_CLASS, b"PXEClient")  # what marks a ProxyDHCP offer to the client
        await self._mark_pxe(node, c, plan, now)
        return Outcome([self._send(packet, MT.OFFER, yiaddr=ZERO_IP, siaddr=siaddr, options=boot_opts, file=file)])

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
        boot_opts, file, siaddr, plan = self._boot(packet, c, node)
        if plan is None:
            return _ignore("no-nbp", f"no boot program for {c.machine.firmware.value} arch {c.machine.arch}")
        boot_opts.setdefault(o.VENDOR_CLASS, b"PXEClient")
        item = o.pxe_vendor_options(packet).get(o.PXE_BOOT_ITEM)
        if item is not None:
            # PXE spec 2.2.6: echo the boot item the client asked for.
            boot_opts[o.VENDOR_SPECIFIC] = o.encode_suboptions({o.PXE_BOOT_ITEM: item})
        await self._mark_pxe(node, c, plan, now)
        rep = build_reply(packet, MT.ACK, server_id=self.server_id, siaddr=siaddr, options=boot_opts, file=file)
        if source is not None:
            addr, port = source
        elif packet.ciaddr != ZERO_IP:
            addr, port = packet.ciaddr, self.settings.proxy_port
        else:
            return _ignore("no-ciaddr", "boot-server request without a source address")
        return Outcome([Reply(rep.encode(), addr, port, MT.ACK)])


def _mac(packet: DhcpPacket) -> str:
    return packet.chaddr[:6].hex(":")
