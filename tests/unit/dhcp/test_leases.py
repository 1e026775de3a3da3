"""The pure lease pool: claims, timers (get_timer/handle_timer), reload tracking, and properties."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from bootd.proto.dhcp.leases import SERVER, LeasePool, int_ip, ip_int

A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"


def pool(start: str = "10.0.0.10", end: str = "10.0.0.13") -> LeasePool:
    return LeasePool.for_range(start, end, "255.255.255.0")


def ip(last: int) -> int:
    return ip_int(f"10.0.0.{last}")


def test_ip_conversions_round_trip() -> None:
    assert int_ip(ip_int("10.77.0.255")) == "10.77.0.255" and ip_int("0.0.1.2") == 258


def test_range_must_be_one_range_in_one_subnet() -> None:
    with pytest.raises(ValueError, match="one range in one subnet"):
        LeasePool.for_range("10.0.0.10", "10.0.1.10", "255.255.255.0")
    with pytest.raises(ValueError, match="one range in one subnet"):
        LeasePool.for_range("10.0.0.10", "10.0.0.9", "255.255.255.0")


def test_free_skips_every_kind_of_claim_and_wraps() -> None:
    p = pool()
    p.stick(ip(10), SERVER)
    p.offer(ip(11), A, 100.0)
    p.bind(ip(12), B, 100.0)
    p.decline(ip(13), 100.0)
    assert p.free(C, 0.0) is None
    assert p.free(A, 0.0) == ip(11)  # its own offer
    # Past every deadline only the sticky addresses stay taken: the server's and B's.
    assert p.free(C, 100.0) in (ip(11), ip(13))


def test_offer_expires_by_timer_and_a_reoffer_is_not_cut_short() -> None:
    p = pool()
    assert p.get_timer() is None
    p.offer(ip(10), A, 30.0)
    assert p.get_timer() == 30.0
    p.handle_timer(29.9)
    assert p.offers == {ip(10): (A, 30.0)}
    p.offer(ip(10), A, 50.0)  # the client's DISCOVER again: the hold starts over
    assert p.get_timer() == 50.0  # the stale 30.0 entry is skipped
    p.handle_timer(35.0)
    assert p.offer_of == {A: ip(10)}
    p.handle_timer(50.0)
    assert p.offers == {} and p.offer_of == {} and p.get_timer() is None


def test_lease_expiry_keeps_the_nodes_address() -> None:
    p = pool()
    p.bind(ip(11), A, 60.0)
    assert p.get_timer() == 60.0
    p.handle_timer(60.0)
    assert p.leases == {} and p.lease_of == {}
    assert p.sticky == {ip(11): A} and not p.available(ip(11), B, 61.0)
    p.bind(ip(11), A, 200.0)  # a renewal after expiry is a fresh timer
    assert p.get_timer() == 200.0


def test_renewal_replaces_the_lease_deadline() -> None:
    p = pool()
    p.bind(ip(11), A, 60.0)
    p.bind(ip(11), A, 120.0)
    p.handle_timer(90.0)
    assert p.leases == {ip(11): (A, 120.0)}


def test_decline_hold_expires() -> None:
    p = pool()
    p.bind(ip(12), A, 1000.0)
    p.decline(ip(12), 600.0)
    assert p.leases == {} and ip(12) not in p.sticky and not p.available(ip(12), B, 599.0)
    assert p.get_timer() == 600.0
    p.handle_timer(600.0)
    assert p.declined == {} and p.available(ip(12), B, 600.0)


def test_a_reoffer_does_not_remove_another_clients_offer() -> None:
    """A's offer ran out (not swept yet) and went to B; A's next DISCOVER must not cancel B's offer."""
    p = pool()
    p.offer(ip(10), A, 30.0)
    p.offer(ip(10), B, 70.0)  # at t=40: A's offer had expired, so ip(10) was free
    p.offer(ip(11), A, 70.0)
    assert p.offers == {ip(10): (B, 70.0), ip(11): (A, 70.0)}
    assert p.offer_of == {A: ip(11), B: ip(10)}


def test_timer_heap_stays_bounded_under_repeats() -> None:
    p = pool()
    for i in range(20_000):
        p.offer(ip(10), A, 30.0 + i)
        p.bind(ip(11), B, 3600.0 + i)
    assert len(p._timers) <= 2 * 2 + 1024 + 1
    assert p.get_timer() == 30.0 + 19_999


def test_set_range_keeps_every_claim() -> None:
    p = pool()
    p.bind(ip(11), A, 100.0)
    p.set_range("10.0.0.50", "10.0.0.60", "255.255.255.0")
    assert p.leases == {ip(11): (A, 100.0)} and not p.in_pool(ip(11)) and p.in_subnet(ip(11))
    assert p.free(B, 0.0) == ip(50)
    with pytest.raises(ValueError):
        p.set_range("10.0.0.50", "10.0.1.60", "255.255.255.0")
    assert p.in_pool(ip(60))  # a refused range changes nothing


def test_reload_replaces_the_index_but_keeps_changes_made_meanwhile() -> None:
    p = pool()
    p.bind(ip(10), A, 100.0)  # memory only: the store (below) does not have it
    p.offer(ip(13), C, 50.0)
    p.begin_reload()
    p.bind(ip(12), B, 100.0)  # an ACK while the store is read
    p.finish_reload([(ip(11), C, 90.0)], [(ip(11), C), (ip(20), A)], ip(1))
    assert p.leases == {ip(11): (C, 90.0), ip(12): (B, 100.0)}
    assert p.sticky == {ip(1): SERVER, ip(11): C, ip(20): A, ip(12): B}
    assert p.offers == {ip(13): (C, 50.0)} and p.tracking is None
    assert p.get_timer() == 50.0


class PoolMachine(RuleBasedStateMachine):
    """The service's use of the pool (claims only after ``available``), timers and reloads interleaved
    at random; a model of the store is updated as the service updates the real one."""

    MACS = [f"52:54:00:00:01:{i:02x}" for i in range(6)]

    def __init__(self) -> None:
        super().__init__()
        self.p = LeasePool.for_range("10.0.0.10", "10.0.0.14", "255.255.255.0")
        self.p.stick(ip(1), SERVER)
        self.now = 0.0
        self.store_leases: dict[int, tuple[str, float]] = {}
        self.store_node_ip: dict[str, int] = {}
        self.granted: dict[int, tuple[str, float]] = {}  # what each client was ACKed: ip -> (mac, until)
        self.reloading = False

    macs = st.sampled_from(MACS)

    @rule(mac=macs)
    def discover(self, mac: str) -> None:
        mine = self.p.sticky_of.get(mac)
        pick = mine if mine is not None and self.p.available(mine, mac, self.now) else self.p.free(mac, self.now)
        if pick is not None:
            assert self.p.available(pick, mac, self.now)
            self.p.offer(pick, mac, self.now + 30)

    @rule(mac=macs, lease=st.sampled_from([20.0, 60.0, 3600.0]))
    def request(self, mac: str, lease: float) -> None:
        want = self.p.offer_of.get(mac, self.p.lease_of.get(mac))
        if want is None or not self.p.available(want, mac, self.now):
            return
        other = self.granted.get(want)
        assert other is None or other[0] == mac or other[1] <= self.now, "address granted to two clients"
        self.p.bind(want, mac, self.now + lease)
        self.granted[want] = (mac, self.now + lease)
        self.store_leases = {k: v for k, v in self.store_leases.items() if v[0] != mac}
        self.store_leases[want] = (mac, self.now + lease)
        self.store_node_ip[mac] = want

    @rule(mac=macs, decline=st.booleans())
    def give_back(self, mac: str, decline: bool) -> None:
        held = self.p.lease_of.get(mac)
        if held is None:
            return
        if decline:
            self.p.decline(held, self.now + 100)
        else:
            self.p.unbind(held)
        self.granted.pop(held, None)
        self.store_leases.pop(held, None)

    @rule(step=st.sampled_from([1.0, 10.0, 31.0, 120.0]))
    def advance(self, step: float) -> None:
        self.now += step  # the timer may run late: nothing may depend on it running on time

    @rule()
    def timers(self) -> None:
        self.p.handle_timer(self.now)
        timer = self.p.get_timer()
        assert timer is None or timer > self.now

    @rule()
    def reload_begin(self) -> None:
        if not self.reloading:
            self.p.begin_reload()
            self.reloading = True
            self.snapshot = (dict(self.store_leases), dict(self.store_node_ip))

    @rule()
    def reload_end(self) -> None:
        if self.reloading:
            leases, nodes = self.snapshot  # what the store said when the reload read it
            self.p.finish_reload([(i, m, e) for i, (m, e) in leases.items()],
                                 [(i, m) for m, i in nodes.items()], ip(1))
            self.reloading = False

    @invariant()
    def indexes_agree(self) -> None:
        p = self.p
        assert all(p.lease_of.get(m) == i for i, (m, _) in p.leases.items())
        assert all(p.leases[i][0] == m for m, i in p.lease_of.items())
        assert all(p.offer_of.get(m) == i for i, (m, _) in p.offers.items())
        assert all(p.offers[i][0] == m for m, i in p.offer_of.items())
        assert all(p.sticky_of.get(m) == i for i, m in p.sticky.items())
        assert all(p.sticky[i] == m for m, i in p.sticky_of.items())

    @invariant()
    def no_address_held_by_two_macs(self) -> None:
        p = self.p
        for i, (mac, expires) in p.leases.items():
            if expires > self.now:
                offer = p.offers.get(i)
                assert offer is None or offer[0] == mac or offer[1] <= self.now
        assert p.sticky.get(ip(1)) == SERVER and ip(1) not in p.leases and ip(1) not in p.offers


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=300)
@given(st.tuples(*[st.integers(0, 255)] * 4))
def test_ip_int_reads_every_dotted_quad(parts: tuple[int, int, int, int]) -> None:
    # ip_int reads the usual form digit by digit; int_ip is its inverse.
    a, b, c, d = parts
    text = f"{a}.{b}.{c}.{d}"
    assert ip_int(text) == (a << 24) | (b << 16) | (c << 8) | d
    assert int_ip(ip_int(text)) == text


def test_ip_int_keeps_its_lenient_reading_and_its_errors() -> None:
    # Outside the usual form it reads as it always did (four int() parses), and fails the same way.
    assert ip_int("010.0.0.1") == ip_int("10.0.0.1") == 0x0A000001
    assert ip_int(" 10.0.0.1") == 0x0A000001
    assert ip_int("300.0.0.1") == 300 << 24 | 1
    for bad in ("10.1", "1.2.3.4.5", "a.b.c.d", "", "1..2.3", "1.2.3."):
        with pytest.raises(ValueError):
            ip_int(bad)
