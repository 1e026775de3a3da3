"""The RFC 3074 hash, the bucket split between live servers, and takeover, with two DhcpServices on one real
store (each with its own cluster view, as two `bootd serve` processes on one registry have)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootd import config as config_mod
from bootd.model import Lease
from bootd.proto.dhcp import options as o
from bootd.proto.dhcp.loadbalance import BUCKETS, MIXING_TABLE, bucket, client_key, lb_hash, wire_split_key
from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes
from bootd.service.boot import BootPolicy
from bootd.service.dhcp import DhcpService
from bootd.service.registry import RegistryService
from bootd.service.servers import Cluster, ServerAdmin, live_servers, split
from bootd.store.base import ServerRecord
from bootd.store.memory import memory_store
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden, golden_packet

T0 = 1_700_000_000.0


def test_mixing_table_is_a_permutation_of_the_byte_values() -> None:
    assert len(MIXING_TABLE) == 256 and set(MIXING_TABLE) == set(range(256))
    assert MIXING_TABLE[:4] == bytes((251, 175, 119, 215)) and MIXING_TABLE[-4:] == bytes((6, 169, 234, 151))


def test_hash_known_values_worked_by_hand_from_rfc_3074_section_6() -> None:
    assert lb_hash(b"") == 0  # the key's length, nothing mixed in
    assert lb_hash(b"\x00") == MIXING_TABLE[1] == 175  # T[len ^ key[0]]
    assert lb_hash(b"\x01") == MIXING_TABLE[0] == 251
    # Two bytes, last first: T[2 ^ 0] = T[2] = 119, then T[119 ^ 0] = 150.
    assert lb_hash(b"\x00\x00") == 150
    # Order matters (the bytes are mixed from the last to the first).
    assert lb_hash(b"\x01\x02") == MIXING_TABLE[MIXING_TABLE[2 ^ 2] ^ 1]
    assert lb_hash(b"\x02\x01") == MIXING_TABLE[MIXING_TABLE[2 ^ 1] ^ 2]


def test_key_is_the_client_identifier_else_chaddr() -> None:
    p = golden_packet("udhcpc-c2s-discover-1")
    plain = dataclasses.replace(p, options={k: v for k, v in p.options.items() if k != o.CLIENT_ID})
    assert client_key(plain) == plain.chaddr[:6]
    with_id = dataclasses.replace(plain, options={**plain.options, o.CLIENT_ID: b"\x01\x52\x54\x00\x00\x00\x09"})
    assert client_key(with_id) == b"\x01\x52\x54\x00\x00\x00\x09"
    assert bucket(with_id) == lb_hash(b"\x01\x52\x54\x00\x00\x00\x09")


SPLIT = frozenset(int(t) for t in (o.MessageType.DISCOVER, o.MessageType.REQUEST, o.MessageType.DECLINE,
                                   o.MessageType.RELEASE, o.MessageType.INFORM))
CLIENT_CAPTURES = ("dhclient-c2s-discover-1", "dhclient-c2s-request-1", "edk2-pxe-c2s-discover-1",
                   "edk2-pxe-c2s-request-ipxe-1", "ipxe-bios-c2s-discover-ipxe-1", "ipxe-uefi-c2s-request-ipxe-1",
                   "udhcpc-c2s-discover-1", "udhcpc-c2s-request-1")


@pytest.mark.parametrize("name", CLIENT_CAPTURES)
def test_the_raw_key_of_a_captured_request_is_the_parsed_key(name: str) -> None:
    data = golden(name)
    assert wire_split_key(data, SPLIT) == client_key(DhcpPacket.parse(data))


def test_the_raw_key_defers_to_the_parser_when_unsure() -> None:
    data = golden("udhcpc-c2s-discover-1")
    assert wire_split_key(data, SPLIT) is not None
    assert wire_split_key(data, frozenset({3})) is None  # a type not split
    assert wire_split_key(data[:239], SPLIT) is None  # no room for the cookie
    assert wire_split_key(data[:236] + b"\x00\x00\x00\x00" + data[240:], SPLIT) is None  # no cookie
    assert wire_split_key(b"\x02" + data[1:], SPLIT) is None  # a reply
    assert wire_split_key(data[:240] + b"\x35\x01\x01\x34\x01\x03\xff", SPLIT) is None  # option overload
    assert wire_split_key(data[:240] + b"\x35\x01\x01\x3d\x09\x01", SPLIT) is None  # truncated option
    two_ids = data[:240] + b"\x35\x01\x01\x3d\x02\x01\x02\x3d\x01\x03\xff"
    assert wire_split_key(two_ids, SPLIT) is None  # RFC 3396 concatenation is the parser's
    assert wire_split_key(data[:240] + b"\x35\x01\x01\xff", SPLIT) == data[28:34]  # chaddr's hlen bytes


@settings(max_examples=300, deadline=None)
@given(mac=st.binary(min_size=16, max_size=16), hlen=st.integers(0, 16), cid=st.none() | st.binary(max_size=20),
       mtype=st.integers(1, 8), pad=st.integers(0, 3), extra=st.dictionaries(st.integers(1, 254).filter(
           lambda c: c not in (52, 53, 61)), st.binary(max_size=12), max_size=4))
def test_the_raw_key_agrees_with_the_parser_on_any_request(mac: bytes, hlen: int, cid: bytes | None, mtype: int,
                                                           pad: int, extra: dict[int, bytes]) -> None:
    options = {53: bytes((mtype,)), **extra}
    if cid is not None:
        options[61] = cid
    packet = DhcpPacket(hlen=hlen, chaddr=mac, options=options)
    data = packet.encode()
    data = data[:240] + b"\x00" * pad + data[240:]  # pads before the first option are legal
    key = wire_split_key(data, SPLIT)
    parsed = DhcpPacket.parse(data)
    if mtype in SPLIT:
        assert key == client_key(parsed)
    else:
        assert key is None


def test_split_gives_every_bucket_one_owner_in_turn() -> None:
    assert split([]) == []
    two = split(["a", "b"])
    assert len(two) == BUCKETS and two.count(0) == two.count(1) == 128 and two[:3] == [0, 1, 0]
    three = split(["a", "b", "c"])
    assert [three.count(i) for i in range(3)] == [86, 85, 85]


def test_sequential_macs_spread_evenly() -> None:
    owners = [lb_hash(bytes.fromhex(f"525400{i:06x}")) % 2 for i in range(2000)]
    assert 0.42 < owners.count(0) / len(owners) < 0.58


def test_live_servers_drop_a_silent_one_after_the_takeover_timeout() -> None:
    rows = [ServerRecord("b", heartbeat=100.0), ServerRecord("a", heartbeat=109.0), ServerRecord("c", heartbeat=95.0)]
    assert [r.id for r in live_servers(rows, "a", 105.0, 10.0)] == ["a", "b", "c"]
    assert [r.id for r in live_servers(rows, "a", 109.5, 10.0)] == ["a", "b"]
    assert [r.id for r in live_servers(rows, "c", 200.0, 10.0)] == ["c"]  # the asker is always alive


# -- two services, one registry ---------------------------------------------------------------------------
def cfg(server: str, ident: str) -> config_mod.Config:
    return config_mod.from_dict({
        "server": {"address": server},
        "registry": {"register_any_client": True},
        "dhcp": {"enabled": True, "pool_start": "10.77.0.100", "pool_end": "10.77.0.199", "lease_time": 600},
        "http": {"public_url": f"http://{server}:8080"},
        "cluster": {"id": ident, "heartbeat": 1.0, "takeover_after": 5.0},
    })


@pytest.fixture
async def store() -> AsyncIterator[SqliteNodeStore]:
    s = memory_store()
    yield s
    await s.close()


def pair(store: SqliteNodeStore) -> tuple[tuple[DhcpService, Cluster], tuple[DhcpService, Cluster]]:
    out = []
    for address, ident in (("10.77.0.1", "a"), ("10.77.0.2", "b")):
        c = cfg(address, ident)
        cluster = Cluster(store, c, clock=lambda: T0)
        svc = DhcpService(store, RegistryService(store, c.registry), BootPolicy.from_config(c), c.dhcp,
                          server_address=address, cluster=cluster)
        out.append((svc, cluster))
    return out[0], out[1]


def discover(i: int) -> DhcpPacket:
    p = golden_packet("udhcpc-c2s-discover-1")
    mac = bytes.fromhex(f"5254004400{i:02x}")
    # udhcpc sends option 61 = type 1 + its MAC: the hash is over that (RFC 3074 section 5).
    return dataclasses.replace(p, chaddr=mac + bytes(10), options={**p.options, o.CLIENT_ID: b"\x01" + mac})


def request(i: int, offer: DhcpPacket, server_id: str) -> DhcpPacket:
    p = discover(i)
    p.options.update({o.MESSAGE_TYPE: b"\x03", o.SERVER_ID: ip_to_bytes(server_id),
                      o.REQUESTED_IP: ip_to_bytes(offer.yiaddr)})
    return p


async def test_two_servers_answer_each_client_exactly_once_and_take_over_a_dead_peer(
        store: SqliteNodeStore) -> None:
    (a, ca), (b, cb) = pair(store)
    await ca.beat(T0)
    await cb.beat(T0)
    await ca.beat(T0)
    assert [r.id for r in ca.live] == [r.id for r in cb.live] == ["a", "b"]
    assert ca.live_urls() == ["http://10.77.0.1:8080", "http://10.77.0.2:8080"]
    assert cb.live_urls() == ["http://10.77.0.2:8080", "http://10.77.0.1:8080"]
    answered: dict[int, str] = {}
    for i in range(40):
        outs = {name: await svc.handle(discover(i), port=67, now=T0) for name, svc in (("a", a), ("b", b))}
        who = [name for name, out in outs.items() if out.replies]
        assert len(who) == 1, (i, outs)
        silent = outs["b" if who == ["a"] else "a"]
        assert silent.ignored == "peer-share" and f"server {who[0]}'s" in silent.detail
        answered[i] = who[0]
        svc, sid = (a, "10.77.0.1") if who == ["a"] else (b, "10.77.0.2")
        offer = DhcpPacket.parse(outs[who[0]].replies[0].data)
        ack = await svc.handle(request(i, offer, sid), port=67, now=T0 + 0.5)
        assert o.message_type(DhcpPacket.parse(ack.replies[0].data)) is o.MessageType.ACK
    assert 8 < list(answered.values()).count("a") < 32
    leases = await store.list_leases()
    assert len(leases) == 40 and len({x.ip for x in leases}) == 40  # no address twice, across both servers
    nodes = await store.list_nodes()
    assert {n.server for n in nodes} == {"a", "b"}  # each node shown with the server that booted it
    assert all(n.server == answered[int(n.mac[-2:], 16)] for n in nodes)

    # b stops heartbeating; before the takeover timeout its clients still wait for it ...
    mine_b = next(i for i, who in answered.items() if who == "b")
    await ca.beat(T0 + 4.0)
    assert (await a.handle(discover(mine_b), port=67, now=T0 + 4.0)).ignored == "peer-share"
    # ... after it, a answers every client, including a REQUEST that names b (b is dead: its share is a's).
    assert await ca.beat(T0 + 6.0)
    assert [r.id for r in ca.live] == ["a"] and ca.is_dead("10.77.0.2") and not ca.is_dead("10.77.0.1")
    assert (await a.handle(discover(mine_b), port=67, now=T0 + 6.0)).replies
    held = await store.get_lease_by_mac(f"52:54:00:44:00:{mine_b:02x}")
    assert held is not None
    selecting_b = request(mine_b, dataclasses.replace(discover(mine_b), yiaddr=held.ip), "10.77.0.2")
    ack = DhcpPacket.parse((await a.handle(selecting_b, port=67, now=T0 + 6.5)).replies[0].data)
    assert o.message_type(ack) is o.MessageType.ACK and ack.yiaddr == held.ip and o.server_id(ack) == "10.77.0.1"
    node = await store.get_node_by_mac(f"52:54:00:44:00:{mine_b:02x}")
    assert node is not None and node.server == "a"
    views = await ServerAdmin(store, cfg("10.77.0.1", "a")).list(T0 + 6.0)
    assert [(v.id, v.alive, v.buckets) for v in views] == [("a", True, 256), ("b", False, 0)]
    # b comes back: the split is restored.
    await cb.beat(T0 + 7.0)
    assert await ca.beat(T0 + 7.0)
    assert [r.id for r in ca.live] == ["a", "b"] and sum(ca._mine) == 128


async def test_a_request_naming_a_live_peer_is_left_to_it(store: SqliteNodeStore) -> None:
    (a, ca), (_, cb) = pair(store)
    for c in (ca, cb, ca):
        await c.beat(T0)
    i = next(i for i in range(256) if ca.owns(bucket(discover(i))))
    out = await a.handle(discover(i), port=67, now=T0)
    offer = DhcpPacket.parse(out.replies[0].data)
    other = await a.handle(request(i, offer, "10.77.0.2"), port=67, now=T0 + 1)
    assert other.ignored == "other-server" and other.replies == []


async def test_an_address_another_server_leased_gets_a_nak_and_is_avoided(store: SqliteNodeStore) -> None:
    (a, ca), _ = pair(store)
    await ca.beat(T0)  # alone: every client is a's
    out = await a.handle(discover(1), port=67, now=T0)
    offer = DhcpPacket.parse(out.replies[0].data)
    # Meanwhile another server (a's memory does not know it yet) leased that address to another node.
    await store.add_node("52:54:00:99:99:99", "other", group="default", now=T0)
    await store.put_lease(Lease(offer.yiaddr, "52:54:00:99:99:99", T0 + 600), now=T0, server="b")
    nak = await a.handle(request(1, offer, "10.77.0.1"), port=67, now=T0 + 1)
    reply = DhcpPacket.parse(nak.replies[0].data)
    assert o.message_type(reply) is o.MessageType.NAK and b"is leased to" in reply.options[o.MESSAGE]
    again = DhcpPacket.parse((await a.handle(discover(1), port=67, now=T0 + 2)).replies[0].data)
    assert again.yiaddr != offer.yiaddr
    lease = await store.get_lease_by_ip(offer.yiaddr)
    assert lease is not None and lease.mac == "52:54:00:99:99:99"


async def test_a_credential_issued_by_one_server_is_accepted_by_another(store: SqliteNodeStore,
                                                                        tmp_path: object) -> None:
    """One registry: the digest another server stored is what this one checks (no per-server copy)."""
    from bootd.service.credentials import Credentials

    one, two = (Credentials(store, config_mod.from_dict({"server": {"state_dir": f"{tmp_path}/{x}"}}))
                for x in ("a", "b"))
    node = await store.add_node("52:54:00:44:01:01", "m1", group="default", now=T0)
    issued = await one.issue(node, "10.77.0.50", T0)
    assert issued.token is not None
    assert await two.check_node("m1", issued.token, T0 + 5)
    assert not await two.check_node("m1", "0" * len(issued.token), T0 + 5)
