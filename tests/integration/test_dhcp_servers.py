"""Two `bootd serve` processes on one PostgreSQL registry, on one network segment, split real DHCP clients by
the RFC 3074 hash (each client answered by its bucket's owner only), and one takes over when the other is
killed (SIGKILL by PID: its heartbeat stops).

    srv-a:eth0 10.77.0.1 ──┐
    srv-b:eth0 10.77.0.2 ──┼── lan:br0 ── cli:eth0..ethN (busybox udhcpc, one MAC per interface)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootd import config as config_mod
from bootd.proto.dhcp.loadbalance import lb_hash
from bootd.store.factory import open_url
from tests.conftest import need_root, need_tool, write_config
from tests.integration.test_dhcp_netns import PXE_VC, Net, env_file, script, sh
from tests.pgserver import PgServer

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

SERVERS = {"a": "10.77.0.1", "b": "10.77.0.2"}  # sorted ids: bucket % 2 == 0 -> a, 1 -> b
TAKEOVER = 3.0


def owner(mac: str) -> str:
    """Whose client this is: udhcpc sends option 61 = 0x01 + MAC, the key of the hash (RFC 3074 section 5)."""
    return "ab"[lb_hash(b"\x01" + bytes.fromhex(mac.replace(":", ""))) % 2]


def macs(want: str, count: int, start: int = 0) -> list[str]:
    out = [f"52:54:00:77:30:{i:02x}" for i in range(start, 256)]
    return [m for m in out if owner(m) == want][:count]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    need_root()
    need_tool("ip", "busybox")
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.down()


def start(net: Net, ns: str, ident: str, url: str, secret: Path) -> subprocess.Popen[bytes]:
    address = SERVERS[ident]
    state = net.workdir / f"state-{ident}"
    state.mkdir()
    cfg = write_config(net.workdir / f"bootd-{ident}.toml", {
        "server": {"state_dir": str(state), "address": address, "interface": "eth0", "graceful_timeout": 2},
        "registry": {"register_any_client": True},
        "store": {"url": url, "password_file": str(secret)},
        "cluster": {"id": ident, "heartbeat": 0.5, "takeover_after": TAKEOVER},
        "dhcp": {"enabled": True, "mode": "full", "pool_start": "10.77.0.100", "pool_end": "10.77.0.199",
                 "netmask": "255.255.255.0", "lease_time": 600},
        "http": {"port": 8080},
    })
    proc = net.spawn(ns, [sys.executable, "-m", "bootd", "-c", str(cfg), "serve"], f"bootd-{ident}.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "event=ready" in (net.workdir / f"bootd-{ident}.log").read_text():
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"bootd {ident} did not start:\n{(net.workdir / f'bootd-{ident}.log').read_text()[-3000:]}")


def udhcpc(net: Net, cli: str, iface: str, *extra: str) -> dict[str, str]:
    out = net.workdir / f"udhcpc-{iface}-bound.env"
    out.unlink(missing_ok=True)
    # -T 3: a retransmission only after 3 s, so a loaded machine does not make a client ask (and get) twice.
    net.run(cli, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "3", "-i", iface, "-s",
                  str(net.workdir / "dump.sh"), "-V", PXE_VC, "-x", "0x5d:0000", *extra], timeout=60)
    return env_file(out)


def metric(net: Net, ns: str, needle: str) -> float:
    text = net.run(ns, ["curl", "-s", "http://127.0.0.1:8080/metrics"]).stdout
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(needle))


def server_list(net: Net, ident: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "bootd", "-c", str(net.workdir / f"bootd-{ident}.toml"), "server",
                          "list", "--json"], capture_output=True, text=True, timeout=60, check=True)
    return list(json.loads(out.stdout))


async def test_two_servers_split_clients_and_one_takes_over_when_the_other_is_killed(
        net: Net, postgres_server: PgServer) -> None:
    url = postgres_server.new_schema_url()
    secret = net.workdir / "db-password"
    secret.write_text(postgres_server.password + "\n")
    secret.chmod(0o600)
    lan, cli = net.ns("lan"), net.ns("cli")
    sh("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", lan, "link", "set", "br0", "up")
    ns = {}
    for ident, address in SERVERS.items():
        ns[ident] = net.ns(f"srv{ident}")
        net.veth(lan, f"p{ident}", ns[ident], "eth0")
        sh("ip", "-n", lan, "link", "set", f"p{ident}", "master", "br0")
        sh("ip", "-n", ns[ident], "addr", "add", f"{address}/24", "dev", "eth0")
    clients = {**dict.fromkeys(macs("a", 3), "a"), **dict.fromkeys(macs("b", 4), "b")}
    ifaces = {}
    for k, mac in enumerate(clients):
        ifaces[mac] = f"eth{k}"
        net.veth(lan, f"c{k}", cli, f"eth{k}")
        sh("ip", "-n", lan, "link", "set", f"c{k}", "master", "br0")
        sh("ip", "-n", cli, "link", "set", f"eth{k}", "address", mac)
    script(net, "dump.sh", f'env > {net.workdir}/udhcpc-"$interface"-"$1".env')
    procs = {ident: start(net, ns[ident], ident, url, secret) for ident in SERVERS}
    # Both heartbeat into one registry; wait until each sees the other (the split is in place).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        views = server_list(net, "a")
        if sum(1 for v in views if v["alive"]) == 2:
            break
        time.sleep(0.5)
    assert [(v["id"], v["alive"], v["buckets"]) for v in views] == [("a", True, 128), ("b", True, 128)], views
    time.sleep(1.5)  # each server's own view refreshes on its heartbeat timer (0.5 s)
    # The admin API says the same as the CLI (same service), with the admin token only.
    admin = f"http://127.0.0.1:{config_mod.load(str(net.workdir / 'bootd-a.toml')).admin.port}/api/v1/servers"
    token = (net.workdir / "state-a" / "admin-token").read_text().strip()
    refused = net.run(ns["a"], ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", admin]).stdout
    assert refused == "401"
    body = json.loads(net.run(ns["a"], ["curl", "-s", "-H", f"Authorization: Bearer {token}", admin]).stdout)
    assert [(v["id"], v["alive"], v["share"], v["public_url"]) for v in body["servers"]] == [
        ("a", True, 0.5, "http://10.77.0.1:8080"), ("b", True, 0.5, "http://10.77.0.2:8080")]
    text = subprocess.run([sys.executable, "-m", "bootd", "-c", str(net.workdir / "bootd-b.toml"), "server", "list"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert text.splitlines()[0].split() == ["SERVER", "STATUS", "HEARTBEAT", "LOAD", "SHARE", "NODES", "ADDRESSES",
                                            "URL"]
    assert "128/256 (50%)" in text.splitlines()[1] and text.splitlines()[2].startswith("b ")

    for mac, expected in clients.items():
        env = udhcpc(net, cli, ifaces[mac])
        assert env["serverid"] == SERVERS[expected], (mac, expected, env)
    acks = {ident: metric(net, ns[ident], 'bootd_dhcp_replies_total{type="ack"}') for ident in SERVERS}
    assert acks == {"a": 3.0, "b": 4.0}  # each client answered once, by its owner only
    for ident in SERVERS:
        assert metric(net, ns[ident], 'bootd_dhcp_dropped_total{reason="peer-share"}') >= 3.0
    store = await open_url(url, password=postgres_server.password)
    try:
        leases = await store.list_leases()
        assert len(leases) == len(clients) and len({x.ip for x in leases}) == len(clients)
        nodes = {n.mac: n for n in await store.list_nodes()}
        assert {m: nodes[m].server for m in clients} == clients  # each node shown with the server that booted it
        assert len({n.name for n in nodes.values()}) == len(clients)
        b_client = next(m for m, who in clients.items() if who == "b")
        b_ip = nodes[b_client].ip

        # Crash b (SIGKILL by PID): its heartbeat stops; after takeover_after, a answers b's clients too.
        os.kill(procs["b"].pid, signal.SIGKILL)
        procs["b"].wait(timeout=10)
        killed = time.monotonic()
        deadline = killed + 20
        while time.monotonic() < deadline:
            views = server_list(net, "a")
            if [(v["id"], v["alive"]) for v in views] == [("a", True), ("b", False)]:
                break
            time.sleep(0.5)
        assert [(v["id"], v["alive"], v["buckets"]) for v in views] == [("a", True, 256), ("b", False, 0)], views
        assert time.monotonic() - killed >= TAKEOVER - 0.5
        time.sleep(1.0)  # a's own view: its next heartbeat
        # b's client, asking again for its address (INIT-REBOOT), gets it from a; a new client of b's share too.
        env = udhcpc(net, cli, ifaces[b_client], "-r", str(b_ip))
        assert env["ip"] == b_ip and env["serverid"] == SERVERS["a"]
        newcomer = macs("b", 1, start=0x80)[0]
        net.veth(lan, "cnew", cli, "ethnew")
        sh("ip", "-n", lan, "link", "set", "cnew", "master", "br0")
        sh("ip", "-n", cli, "link", "set", "ethnew", "address", newcomer)
        env = udhcpc(net, cli, "ethnew")
        assert env["serverid"] == SERVERS["a"] and env["ip"] not in {x.ip for x in leases}
        node = await store.get_node_by_mac(newcomer)
        assert node is not None and node.server == "a" and node.ip == env["ip"]
        assert "event=cluster-changed live=a was=a,b" in (net.workdir / "bootd-a.log").read_text()
    finally:
        await store.close()
