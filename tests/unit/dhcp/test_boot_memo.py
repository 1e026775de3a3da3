"""The boot answers the DHCP service reuses: a DISCOVER's for its REQUEST, and one kind of client's for the next.

Reuse must never change a reply: these tests change what an answer depends on (the boot policy, a node's variables,
the client's own MAC in an iPXE URL) between two requests and check that the reply follows, on the real stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from bootd.proto.dhcp import options as o
from bootd.service.boot import BootPolicy
from bootd.store.sqlite import SqliteNodeStore

from .conftest import golden_packet
from .test_service import NOW, POLICY, dora, only, request_from, service, with_mac


@pytest.fixture
async def store(node_store: SqliteNodeStore) -> AsyncIterator[SqliteNodeStore]:
    yield node_store


async def test_ack_follows_a_policy_replaced_after_the_offer(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    _, offer = only(await svc.handle(discover, port=67, now=NOW))
    assert offer.file == b"undionly.kpxe"
    svc.boot = dataclasses.replace(POLICY, bios_nbp="other.kpxe")  # what a reload of [boot] does
    _, ack = only(await svc.handle(request_from(discover, offer), port=67, now=NOW + 1))
    assert ack.file == b"other.kpxe" and ack.options[o.BOOTFILE_NAME] == b"other.kpxe"


async def test_ack_repeats_the_offers_boot_data(store: SqliteNodeStore) -> None:
    svc = service(store)
    offer, _, ack = await dora(svc, golden_packet("edk2-pxe-c2s-discover-1"))
    assert ack.file == offer.file and ack.siaddr == offer.siaddr
    boot = (o.BOOTFILE_NAME, o.VENDOR_CLASS, o.VENDOR_SPECIFIC, o.CLIENT_GUID)
    assert {k: ack.options.get(k) for k in boot} == {k: offer.options.get(k) for k in boot}
    assert offer.options[o.CLIENT_GUID] == golden_packet("edk2-pxe-c2s-discover-1").options[o.CLIENT_GUID]


async def test_clients_of_one_kind_share_an_answer_but_a_nodes_variables_win(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    first, _, _ = await dora(svc, with_mac(discover, 1))
    assert first.file == b"undionly.kpxe"
    await store.add_node("52:54:00:11:00:02", "special", group="default", now=NOW)
    await store.set_vars("special", {"boot.file": "special.kpxe"})
    special, _, ack = await dora(svc, with_mac(discover, 2))
    assert special.file == ack.file == b"special.kpxe"
    third, _, _ = await dora(svc, with_mac(discover, 3))
    assert third.file == b"undionly.kpxe"


async def test_a_policy_reload_reaches_the_next_client_of_a_kind(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("udhcpc-c2s-discover-1")
    await dora(svc, with_mac(discover, 1))
    svc.boot = BootPolicy(public_url=POLICY.public_url, next_server="10.77.0.9", bios_nbp="next.kpxe")
    offer, _, ack = await dora(svc, with_mac(discover, 2))
    assert offer.file == ack.file == b"next.kpxe" and offer.siaddr == ack.siaddr == "10.77.0.9"


async def test_ipxe_clients_each_get_their_own_script_url(store: SqliteNodeStore) -> None:
    svc = service(store)
    discover = golden_packet("ipxe-bios-c2s-discover-ipxe-1")
    urls = []
    for i in (1, 2):
        offer, _, ack = await dora(svc, with_mac(discover, i))
        assert offer.options[o.BOOTFILE_NAME] == ack.options[o.BOOTFILE_NAME]
        urls.append(offer.options[o.BOOTFILE_NAME])
    assert urls == [f"http://10.77.0.1:8080/boot/52-54-00-11-00-0{i}.ipxe".encode() for i in (1, 2)]
