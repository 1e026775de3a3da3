"""The address pool of full-mode DHCP: who holds, was offered, owns or may not get each address.

Pure bookkeeping (no I/O, no clock: every call takes ``now``), so the service can decide
"this address is free" and "it is taken" in one synchronous step with no ``await`` between
them, and so every rule here is tested without sockets or a store.

Four kinds of claim on an address, each with its own index in both directions:

* a lease (ACKed, persisted by the service before the ACK; expires),
* an offer (RFC 2131 4.3.1 lets an OFFER be a soft reservation; held ``offer_hold`` seconds),
* a node's own ("sticky") address: a node keeps one address across leases and restarts, so nobody
  else gets it even while the node is off,
* a DECLINE hold: someone unknown answers ARP for it, so it is skipped for ``decline_hold`` seconds.

Expiry is driven by timers in the shape of the TFTP session (``get_timer`` gives the next deadline,
``handle_timer(now)`` acts on it), not by incoming packets, so an idle server still frees memory.
``available`` also compares deadlines with ``now`` itself: a claim that is past its deadline never
blocks anyone even when the timer has not run yet, so correctness never depends on timer latency.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = ["SERVER", "LeasePool", "int_ip", "ip_int"]

SERVER: Final = "server"  # the sticky owner of the server's own address: never handed out

_OFFER, _DECLINED, _LEASE = 0, 1, 2
_COMPACT_SLACK: Final = 1024  # stale timer entries tolerated before the heap is rebuilt from the indexes


def ip_int(text: str) -> int:
    # A dotted quad digit by digit (compiled: a fifth of the instructions of four int() parses, on every REQUEST);
    # anything else goes the lenient way it always went, ValueError included.
    if text.isascii():
        value = part = digits = dots = 0
        for c in text.encode():
            if 48 <= c <= 57 and digits < 3:
                part = part * 10 + c - 48
                digits += 1
            elif c == 46 and digits and dots < 3 and part <= 255:
                value = value << 8 | part
                part = digits = 0
                dots += 1
            else:
                break
        else:
            if dots == 3 and digits and part <= 255:
                return value << 8 | part
    w, x, y, z = text.split(".")
    return (int(w) << 24) | (int(x) << 16) | (int(y) << 8) | int(z)


def int_ip(value: int) -> str:
    return f"{value >> 24 & 255}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def _range(start: str, end: str, netmask: str) -> tuple[int, int, int, int]:
    mask = ip_int(netmask)
    lo, hi = ip_int(start), ip_int(end)
    if lo > hi or lo & mask != hi & mask:
        raise ValueError(f"dhcp pool {start}-{end} is not one range in one subnet of netmask {netmask}")
    return lo, hi, lo & mask, mask


@dataclass(slots=True)
class LeasePool:
    """In-memory index of the claims on one pool's addresses (see the module docstring for why)."""

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
    # (deadline, kind, ip); an entry whose claim changed since is stale and skipped when it surfaces.
    _timers: list[tuple[float, int, int]] = field(default_factory=list)

    @classmethod
    def for_range(cls, start: str, end: str, netmask: str) -> LeasePool:
        """A pool for ``start``-``end``; ValueError (saying why) unless it is one range in one subnet."""
        return cls(*_range(start, end, netmask))

    def set_range(self, start: str, end: str, netmask: str) -> None:
        """Move the dynamic range in place (a configuration reload).

        Every claim is kept: a client holding an address outside the new range keeps renewing it
        as long as it is its node's own address on the subnet, exactly as after a restart.
        """
        self.start, self.end, self.subnet, self.mask = _range(start, end, netmask)
        if not self.start <= self.cursor <= self.end:
            self.cursor = 0

    def in_subnet(self, ip: int) -> bool:
        return ip & self.mask == self.subnet

    def in_pool(self, ip: int) -> bool:
        return self.start <= ip <= self.end

    # -- queries -------------------------------------------------------------------------
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

    # -- claims --------------------------------------------------------------------------
    def offer(self, ip: int, mac: str, until: float) -> None:
        self.drop_offer(mac)
        prev = self.offers.get(ip)
        if prev is not None and self.offer_of.get(prev[0]) == ip:
            del self.offer_of[prev[0]]  # an expired offer to another client, not yet swept
        self.offers[ip] = (mac, until)
        self.offer_of[mac] = ip
        self._push(until, _OFFER, ip)

    def drop_offer(self, mac: str) -> None:
        ip = self.offer_of.pop(mac, None)
        if ip is None:
            return
        claim = self.offers.get(ip)
        if claim is not None and claim[0] == mac:
            del self.offers[ip]

    def bind(self, ip: int, mac: str, expires: float) -> None:
        self.drop_offer(mac)
        self._track(ip)
        old = self.lease_of.get(mac)
        if old is not None and old != ip:
            self.unbind(old)
        prev = self.leases.get(ip)
        if prev is not None and prev[0] != mac and self.lease_of.get(prev[0]) == ip:
            del self.lease_of[prev[0]]
        self.leases[ip] = (mac, expires)
        self.lease_of[mac] = ip
        self._push(expires, _LEASE, ip)
        self.stick(ip, mac)

    def stick(self, ip: int, mac: str) -> None:
        """Make ``ip`` the node's own address (a node keeps one address; the store moves it the same way)."""
        old = self.sticky_of.get(mac)
        if old is not None and old != ip:
            self.unstick(old)
        prev = self.sticky.get(ip)
        if prev is not None and prev != mac and self.sticky_of.get(prev) == ip:
            del self.sticky_of[prev]
        self._track(ip)
        self.sticky[ip] = mac
        self.sticky_of[mac] = ip

    def unstick(self, ip: int) -> None:
        self._track(ip)
        mac = self.sticky.pop(ip, None)
        if mac is not None and self.sticky_of.get(mac) == ip:
            del self.sticky_of[mac]

    def unbind(self, ip: int) -> None:
        self._track(ip)
        held = self.leases.pop(ip, None)
        if held is not None and self.lease_of.get(held[0]) == ip:
            del self.lease_of[held[0]]

    def decline(self, ip: int, until: float) -> None:
        """Someone unknown answers ARP for ``ip``: nobody gets it before ``until``."""
        self.unbind(ip)
        self.unstick(ip)
        self.declined[ip] = until
        self._push(until, _DECLINED, ip)

    # -- timers --------------------------------------------------------------------------
    def get_timer(self) -> float | None:
        """When ``handle_timer`` next has something to expire, or None when nothing ever expires."""
        timers = self._timers
        while timers and not self._current(*timers[0]):
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def handle_timer(self, now: float) -> None:
        """Forget every offer, DECLINE hold and lease whose deadline is ``now`` or earlier.

        An expired lease leaves the node its sticky address: only the lease goes.
        """
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, kind, ip = heapq.heappop(timers)
            if not self._current(deadline, kind, ip):
                continue
            if kind == _OFFER:
                mac = self.offers.pop(ip)[0]
                if self.offer_of.get(mac) == ip:
                    del self.offer_of[mac]
            elif kind == _DECLINED:
                del self.declined[ip]
            else:
                self.unbind(ip)

    def _current(self, deadline: float, kind: int, ip: int) -> bool:
        """Is this timer entry still the deadline of a live claim (not replaced or removed since)?"""
        if kind == _OFFER:
            claim = self.offers.get(ip)
            return claim is not None and claim[1] == deadline
        if kind == _DECLINED:
            return self.declined.get(ip) == deadline
        held = self.leases.get(ip)
        return held is not None and held[1] == deadline

    def _push(self, deadline: float, kind: int, ip: int) -> None:
        heapq.heappush(self._timers, (deadline, kind, ip))
        # A client repeating DISCOVER or REQUEST leaves one stale entry per packet: bound them.
        if len(self._timers) > 2 * (len(self.offers) + len(self.declined) + len(self.leases)) + _COMPACT_SLACK:
            self._rebuild_timers()

    def _rebuild_timers(self) -> None:
        self._timers = [(until, _OFFER, ip) for ip, (_, until) in self.offers.items()]
        self._timers += [(until, _DECLINED, ip) for ip, until in self.declined.items()]
        self._timers += [(expires, _LEASE, ip) for ip, (_, expires) in self.leases.items()]
        heapq.heapify(self._timers)

    # -- reload from the store -----------------------------------------------------------
    def _track(self, ip: int) -> None:
        if self.tracking is not None:
            self.tracking.add(ip)

    def begin_reload(self) -> None:
        """The service starts reading the store: remember every address changed until ``finish_reload``."""
        self.tracking = set()

    def abort_reload(self) -> None:
        self.tracking = None

    def finish_reload(self, leases: Iterable[tuple[int, str, float]], nodes: Iterable[tuple[int, str]],
                      server: int) -> None:
        """Replace leases and sticky addresses by what the store holds (``leases``: ip, mac, expires;
        ``nodes``: ip, mac), then re-apply every change made while the store was being read, so the
        reload never forgets a decision taken meanwhile. Offers and DECLINE holds live only here: kept.
        """
        touched = self.tracking or set()
        self.tracking = None
        keep_leases = {ip: self.leases.get(ip) for ip in touched}
        keep_sticky = {ip: self.sticky.get(ip) for ip in touched}
        self.leases.clear()
        self.lease_of.clear()
        self.sticky.clear()
        self.sticky_of.clear()
        for ip, mac, expires in leases:
            self.leases[ip] = (mac, expires)
            self.lease_of[mac] = ip
        self.stick(server, SERVER)
        for ip, mac in nodes:
            if ip not in self.sticky:
                self.stick(ip, mac)
        for ip, held in keep_leases.items():
            if held is None:
                self.unbind(ip)
            else:
                self.leases[ip] = held
                self.lease_of[held[0]] = ip
        for ip, owner in keep_sticky.items():
            if owner is None:
                self.unstick(ip)
            else:
                self.stick(ip, owner)
        self._rebuild_timers()
