"""bootd's DHCP server against real clients, across network namespaces.

Topology (all namespaces are ``bd-dhcp-<pid>-*`` and deleted after each test, also on failure):

    cli:eth0 ── veth ── srv:br0 (10.77.0.1/24, bootd) ── veth ── dhcpd:eth0 (10.77.0.2, dnsmasq; proxy test)
    rly:eth0 (10.78.0.2/30) ── veth ── srv:rly0 (10.78.0.1/30)       rly:cl0 10.77.9.1/24 = giaddr

bootd runs as ``bootd serve`` when the daemon wires DHCP in, otherwise as the same composition
(config -> SQLite store -> RegistryService -> DhcpService -> DhcpServer) in a small runner; either way
it is a separate process with the real SQLite store, and each test checks the lease, the next-server,
the boot file as the client saw them, and the node record in the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootd import config as config_mod
from bootd.lab.netns import kill_pid
from bootd.model import State
from bootd.store.sqlite import SqliteNodeStore
from tests.conftest import ROOT, need_root, need_tool, write_config

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PID = os.getpid()
DATA = ROOT / "tests" / "data" / "dhcp"
CLI_MAC = "52:54:00:77:10:01"
PXE_VC = "PXEClient:Arch:00000:UNDI:002001"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
    return proc


class Net:
    """The namespaces of one test; ``down()`` kills what we started (by pid) and deletes them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.names: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, tag: str) -> str:
        name = f"bd-dhcp-{PID}-{tag}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        # Created inside namespace a and moved straight to b: no interface ever appears on the host.
        sh("ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)
        sh("ip", "-n", a, "link", "set", a_if, "up")
        sh("ip", "-n", b, "link", "set", b_if, "up")

    def spawn(self, ns: str, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        fh = open(self.workdir / log, "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc

    def run(self, ns: str, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, timeout=timeout)

    def down(self) -> None:
        for proc in reversed(self.procs):
            kill_pid(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for name in self.names:
            for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
                kill_pid(int(pid))  # only our processes can be inside our namespaces
            sh("ip", "netns", "del", name, check=False)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    need_root()
    need_tool("ip", "busybox", "dhclient", "dnsmasq")
    n = Net(tmp_path)
    try:
        yield n
    finally:
        n.down()


def lan(net: Net, *, dhcpd: bool = False) -> tuple[str, str, str | None]:
    srv, cli = net.ns("srv"), net.ns("cli")
    sh("ip", "-n", srv, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", srv, "addr", "add", "10.77.0.1/24", "dev", "br0")
    sh("ip", "-n", srv, "link", "set", "br0", "up")
    net.veth(srv, "pcli", cli, "eth0")
    sh("ip", "-n", srv, "link", "set", "pcli", "master", "br0")
    sh("ip", "-n", cli, "link", "set", "eth0", "address", CLI_MAC)
    other = None
    if dhcpd:
        other = net.ns("dhcpd")
        net.veth(srv, "pdhcpd", other, "eth0")
        sh("ip", "-n", srv, "link", "set", "pdhcpd", "master", "br0")
        sh("ip", "-n", other, "addr", "add", "10.77.0.2/24", "dev", "eth0")
    return srv, cli, other


RUNNER = textwrap.dedent("""
    import asyncio, signal, sys
    from prometheus_client import CollectorRegistry
    from bootd import config
    from bootd.net.dhcp import DhcpServer
    from bootd.service.dhcp import DhcpService
    from bootd.service.registry import RegistryService
    from bootd.store.sqlite import SqliteNodeStore

    async def main() -> None:
        cfg = config.load(sys.argv[1])
        store = SqliteNodeStore(cfg.db_path, default_group=cfg.registry.default_group)
        svc = DhcpService.from_config(cfg, store, RegistryService(store, cfg.registry))
        server = DhcpServer(svc, listen=cfg.dhcp.listen, port=cfg.dhcp.port,
                            proxy_port=cfg.dhcp.proxy_port if cfg.dhcp.mode == "proxy" else None,
                            interface=cfg.dhcp.interface or cfg.server.interface,
                            queue_size=cfg.dhcp.queue_size, metrics=CollectorRegistry())
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()
        await store.close()

    asyncio.run(main())
""")


def daemon_wires_dhcp() -> bool:
    root = ROOT / "bootd" / "compose.py"
    return root.exists() and "bootd.net.dhcp" in root.read_text()


def start_bootd(net: Net, ns: str, *, address: str, interface: str | None, dhcp: dict[str, Any]) -> Path:
    state = net.workdir / "state"
    state.mkdir(exist_ok=True)
    server: dict[str, Any] = {"state_dir": str(state), "address": address, "graceful_timeout": 2}
    if interface:
        server["interface"] = interface
    cfg = write_config(net.workdir / "bootd.toml", {
        "server": server,
        # These tests drive the protocol with plain clients (udhcpc, dhclient) too: let them register.
        "registry": {"register_any_client": True},
        "dhcp": {"enabled": True, **dhcp},
        "http": {"enabled": daemon_wires_dhcp(), "port": 8080},
    })
    if daemon_wires_dhcp():
        cmd = [sys.executable, "-m", "bootd", "-c", str(cfg), "serve"]
    else:
        cmd = [sys.executable, "-c", RUNNER, str(cfg)]
    proc = net.spawn(ns, cmd, "bootd.log")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = net.run(ns, ["ss", "-lunH"]).stdout
        if any(line.split()[3].endswith(f":{dhcp.get('port', 67)}") for line in out.splitlines() if line.split()):
            return cfg
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"bootd did not start:\n{(net.workdir / 'bootd.log').read_text()[-3000:]}")


async def node_record(cfg: Path, mac: str) -> tuple[Any, Any]:
    store = SqliteNodeStore(config_mod.load(str(cfg)).db_path)
    try:
        return await store.get_node_by_mac(mac), await store.get_lease_by_mac(mac)
    finally:
        await store.close()


def env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip("'\"")
    return out


def script(net: Net, name: str, body: str) -> Path:
    path = net.workdir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


FULL = {"mode": "full", "pool_start": "10.77.0.100", "pool_end": "10.77.0.150", "netmask": "255.255.255.0",
        "router": "10.77.0.1", "lease_time": 600}


async def test_udhcpc_pxe_client_full_mode(net: Net) -> None:
    srv, cli, _ = lan(net)
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp=FULL)
    dump = script(net, "udhcpc.sh", f'env > {net.workdir}/udhcpc-"$1".env')
    net.run(cli, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(dump),
                  "-V", PXE_VC, "-x", "0x5d:0000"])
    env = env_file(net.workdir / "udhcpc-bound.env")
    assert env["ip"] == "10.77.0.100" and env["serverid"] == "10.77.0.1"
    assert env["siaddr"] == "10.77.0.1" and env["boot_file"] == "undionly.kpxe"
    assert env["subnet"] == "255.255.255.0" and env["router"] == "10.77.0.1" and env["lease"] == "600"
    node, lease = await node_record(cfg, CLI_MAC)
    assert node is not None and node.name == "n0000" and node.state is State.PXE and node.ip == "10.77.0.100"
    assert lease is not None and lease.ip == "10.77.0.100" and lease.expires > time.time() + 500

    # Restart bootd: the node asks again (INIT-REBOOT from udhcpc -r) and keeps its address.
    for proc in net.procs:
        kill_pid(proc.pid)
    net.procs.clear()
    start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp=FULL)
    (net.workdir / "udhcpc-bound.env").unlink()
    net.run(cli, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(dump),
                  "-V", PXE_VC, "-x", "0x5d:0000", "-r", "10.77.0.100"])
    assert env_file(net.workdir / "udhcpc-bound.env")["ip"] == "10.77.0.100"


async def test_isc_dhclient_full_mode(net: Net) -> None:
    srv, cli, _ = lan(net)
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp={**FULL, "dns": ["10.77.0.53"],
                                                                           "domain": "cluster.test"})
    dump = script(net, "dhclient.sh", f'env > {net.workdir}/dhclient-"$reason".env')
    w = net.workdir
    # dhclient does not export siaddr; asking for option 66 makes bootd name the next-server where it can see it.
    conf = w / "dhclient.conf"
    conf.write_text("also request tftp-server-name;\n")
    try:
        net.run(cli, ["dhclient", "-1", "-v", "-cf", str(conf), "-sf", str(dump), "-lf", str(w / "dhclient.leases"),
                      "-pf", str(w / "dhclient.pid"), "eth0"], timeout=40)
    finally:
        pid_file = w / "dhclient.pid"
        if pid_file.exists() and pid_file.read_text().strip().isdigit():
            kill_pid(int(pid_file.read_text().strip()))
    env = env_file(w / "dhclient-BOUND.env")
    assert env["new_ip_address"] == "10.77.0.100"
    assert env["new_dhcp_server_identifier"] == "10.77.0.1"
    assert env["new_subnet_mask"] == "255.255.255.0" and env["new_routers"] == "10.77.0.1"
    assert env["new_domain_name_servers"] == "10.77.0.53" and env["new_domain_name"] == "cluster.test"
    assert env["new_filename"] == "undionly.kpxe" and env["new_tftp_server_name"] == "10.77.0.1"
    assert 'filename "undionly.kpxe";' in (w / "dhclient.leases").read_text()
    node, lease = await node_record(cfg, CLI_MAC)
    # A plain DHCP client is registered but not a PXE boot: it stays "discovered".
    assert node is not None and node.state is State.DISCOVERED and node.ip == "10.77.0.100"
    assert lease is not None and lease.ip == "10.77.0.100"


CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    from bootd.proto.dhcp import options as o
    from bootd.proto.dhcp.packet import DhcpPacket, ip_to_bytes

    def summary(p):
        return {"type": int(o.message_type(p)), "yiaddr": p.yiaddr, "siaddr": p.siaddr, "giaddr": p.giaddr,
                "file": p.file.decode(), "server": o.server_id(p), "vc": (o.vendor_class(p) or ""),
                "opt67": (o.bootfile_name(p) or ""), "has43": 43 in p.options, "xid": p.xid}

    def collect(sock, xid, seconds, want):
        out, end = [], time.monotonic() + seconds
        while time.monotonic() < end and len(out) < want:
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = sock.recvfrom(2048)
            except socket.timeout:
                break
            p = DhcpPacket.parse(data)
            if p.xid == xid and p.op == 2:
                out.append(dict(summary(p), src=addr[0], sport=addr[1]))
        return out
""")


RELAY = CLIENT + textwrap.dedent("""
    giaddr, server, mac = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3].replace(":", ""))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((giaddr, 67))  # a relay agent listens on the server port at giaddr
    discover = DhcpPacket.parse(open(sys.argv[4], "rb").read())
    discover.chaddr, discover.giaddr, discover.hops, discover.xid = mac + bytes(10), giaddr, 1, 0x0bd0001
    sock.sendto(discover.encode(), (server, 67))
    offers = collect(sock, discover.xid, 3, 1)
    request = discover
    request.options[53] = b"\\x03"
    request.options[54] = ip_to_bytes(offers[0]["server"])
    request.options[50] = ip_to_bytes(offers[0]["yiaddr"])
    sock.sendto(request.encode(), (server, 67))
    print(json.dumps({"offers": offers, "acks": collect(sock, discover.xid, 3, 1)}))
""")


async def test_relayed_request_goes_back_to_relay(net: Net) -> None:
    srv, rly = net.ns("srv"), net.ns("rly")
    net.veth(srv, "rly0", rly, "eth0")
    sh("ip", "-n", srv, "addr", "add", "10.78.0.1/30", "dev", "rly0")
    sh("ip", "-n", rly, "addr", "add", "10.78.0.2/30", "dev", "eth0")
    # The relay's client-side interface (no dummy driver here: a veth pair inside the relay namespace).
    sh("ip", "-n", rly, "link", "add", "cl0", "type", "veth", "peer", "name", "cl1")
    sh("ip", "-n", rly, "addr", "add", "10.77.9.1/24", "dev", "cl0")
    sh("ip", "-n", rly, "link", "set", "cl0", "up")
    sh("ip", "-n", rly, "link", "set", "cl1", "up")
    sh("ip", "-n", srv, "route", "add", "10.77.9.0/24", "via", "10.78.0.2")
    # No interface binding: relayed traffic is plain unicast, routed both ways.
    cfg = start_bootd(net, srv, address="10.78.0.1", interface=None, dhcp={
        "mode": "full", "pool_start": "10.77.9.100", "pool_end": "10.77.9.150", "netmask": "255.255.255.0",
        "router": "10.77.9.1"})
    mac = "52:54:00:77:20:01"
    out = net.run(rly, [sys.executable, "-c", RELAY, "10.77.9.1", "10.78.0.1", mac,
                        str(DATA / "edk2-pxe-c2s-discover-1.bin")])
    result = json.loads(out.stdout)
    (offer,), (ack,) = result["offers"], result["acks"]
    for reply in (offer, ack):
        assert reply["src"] == "10.78.0.1" and reply["sport"] == 67 and reply["giaddr"] == "10.77.9.1"
        assert reply["yiaddr"] == "10.77.9.100" and reply["siaddr"] == "10.78.0.1"
        assert reply["file"] == "snponly.efi" and reply["vc"] == "PXEClient"
    assert (offer["type"], ack["type"]) == (2, 5)
    node, lease = await node_record(cfg, mac)
    assert node is not None and node.state is State.PXE and node.ip == "10.77.9.100"
    assert lease is not None and lease.ip == "10.77.9.100"


async def test_isc_dhcrelay_brings_a_client_its_second_subnets_address(net: Net) -> None:
    """client ns -- relay ns (ISC dhcrelay) -- server ns: a real client gets the second subnet's pool and options,
    while a giaddr in no subnet is refused (counted by reason)."""
    need_tool("dhcrelay")
    srv, rly, cli = net.ns("srv"), net.ns("rly"), net.ns("cli")
    net.veth(srv, "rly0", rly, "up0")
    net.veth(rly, "down0", cli, "eth0")
    sh("ip", "-n", srv, "addr", "add", "10.78.0.1/30", "dev", "rly0")
    sh("ip", "-n", rly, "addr", "add", "10.78.0.2/30", "dev", "up0")
    sh("ip", "-n", rly, "addr", "add", "10.78.1.1/24", "dev", "down0")
    sh("ip", "-n", cli, "link", "set", "eth0", "address", CLI_MAC)
    sh("ip", "-n", srv, "route", "add", "10.78.1.0/24", "via", "10.78.0.2")
    # The local pool (first subnet) is 10.77.0.0/24; the rack behind the relay is the second subnet.
    cfg = start_bootd(net, srv, address="10.78.0.1", interface=None, dhcp={
        **FULL, "subnets": [{"subnet": "10.78.1.0/24", "pool_start": "10.78.1.60", "pool_end": "10.78.1.70",
                             "router": "10.78.1.1", "dns": ["10.78.1.53"], "lease_time": 900,
                             "next_server": "10.78.0.1"}]})
    net.spawn(rly, ["dhcrelay", "-d", "-4", "-pf", str(net.workdir / "dhcrelay.pid"), "-id", "down0", "-iu", "up0",
                    "10.78.0.1"], "dhcrelay.log")
    dump = script(net, "udhcpc.sh", f'env > {net.workdir}/udhcpc-"$1".env')
    for _ in range(50):  # dhcrelay opens its sockets a moment after it starts
        if "down0" in (net.workdir / "dhcrelay.log").read_text():
            break
        time.sleep(0.1)
    net.run(cli, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "8", "-T", "1", "-i", "eth0", "-s", str(dump),
                  "-V", PXE_VC, "-x", "0x5d:0000"], timeout=60)
    env = env_file(net.workdir / "udhcpc-bound.env")
    assert env["ip"] == "10.78.1.60" and env["subnet"] == "255.255.255.0" and env["router"] == "10.78.1.1"
    assert env["dns"].split() == ["10.78.1.53"] and env["lease"] == "900" and env["serverid"] == "10.78.0.1"
    assert env["siaddr"] == "10.78.0.1" and env["boot_file"] == "undionly.kpxe"
    node, lease = await node_record(cfg, CLI_MAC)
    assert node is not None and node.ip == "10.78.1.60" and node.state is State.PXE
    assert lease is not None and lease.ip == "10.78.1.60"

    # A relay on a subnet bootd does not serve: refused, and the reason counted in /metrics.
    net.run(srv, [sys.executable, "-c", FOREIGN, str(DATA / "edk2-pxe-c2s-discover-1.bin")])
    counted = 'bootd_dhcp_dropped_total{reason="foreign-subnet"} 1.0'
    for _ in range(50):
        metrics = net.run(srv, ["curl", "-s", "http://127.0.0.1:8080/metrics"]).stdout
        if counted in metrics:
            break
        time.sleep(0.1)
    assert counted in metrics, metrics[-2000:]
    assert "giaddr 10.99.0.1 is in no subnet" in (net.workdir / "bootd.log").read_text()
    node, _ = await node_record(cfg, "52:54:00:77:20:09")
    assert node is None


async def test_a_subnet_on_its_own_interface_serves_the_clients_there(net: Net) -> None:
    """Two segments on one server (br0, br1): an unrelayed client gets the subnet of the interface it is on."""
    srv, cli = lan(net)[:2]
    cli2 = net.ns("cli2")
    sh("ip", "-n", srv, "link", "add", "br1", "type", "bridge")
    sh("ip", "-n", srv, "addr", "add", "10.79.0.1/24", "dev", "br1")
    sh("ip", "-n", srv, "link", "set", "br1", "up")
    net.veth(srv, "pcli2", cli2, "eth0")
    sh("ip", "-n", srv, "link", "set", "pcli2", "master", "br1")
    sh("ip", "-n", cli2, "link", "set", "eth0", "address", "52:54:00:77:10:02")
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp={
        **FULL, "subnets": [{"subnet": "10.79.0.0/24", "pool_start": "10.79.0.50", "pool_end": "10.79.0.60",
                             "router": "10.79.0.1", "next_server": "10.79.0.1", "interface": "br1"}]})
    out = net.workdir / "bound.env"
    dump = script(net, "udhcpc.sh", f'[ "$1" = bound ] && env > {out}')
    for ns_, want, router, siaddr in ((cli2, "10.79.0.50", "10.79.0.1", "10.79.0.1"),
                                      (cli, "10.77.0.100", "10.77.0.1", "10.77.0.1")):
        out.unlink(missing_ok=True)
        net.run(ns_, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(dump),
                      "-V", PXE_VC, "-x", "0x5d:0000"])
        env = env_file(out)
        assert (env["ip"], env["router"], env["serverid"], env["siaddr"]) == (want, router, "10.77.0.1", siaddr), env
    node, lease = await node_record(cfg, "52:54:00:77:10:02")
    assert node is not None and node.ip == "10.79.0.50" and lease is not None and lease.ip == "10.79.0.50"


FOREIGN = textwrap.dedent("""
    import socket, sys
    from bootd.proto.dhcp.packet import DhcpPacket
    discover = DhcpPacket.parse(open(sys.argv[1], "rb").read())
    discover.chaddr, discover.giaddr, discover.hops = bytes.fromhex("525400772009") + bytes(10), "10.99.0.1", 1
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(discover.encode(), ("10.78.0.1", 67))
""")


PXE_CLIENT = CLIENT + textwrap.dedent("""
    ifname, my_ip, mac = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3].replace(":", ""))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.bind(("0.0.0.0", 68))
    discover = DhcpPacket.parse(open(sys.argv[4], "rb").read())  # EDK2's own DISCOVER, our MAC
    discover.chaddr, discover.xid = mac + bytes(10), 0x0bd0002
    sock.sendto(discover.encode(), ("255.255.255.255", 67))
    offers = collect(sock, discover.xid, 3, 2)
    proxy = [x for x in offers if x["yiaddr"] == "0.0.0.0"]
    # PXE spec: with an address from the DHCP server, ask the proxy's boot server on 4011.
    request = DhcpPacket.parse(open(sys.argv[5], "rb").read())
    request.chaddr, request.xid, request.ciaddr = mac + bytes(10), 0x0bd0003, my_ip
    request.options.pop(50, None)
    request.options.pop(54, None)
    sock.sendto(request.encode(), (proxy[0]["server"], 4011))
    print(json.dumps({"offers": offers, "acks": collect(sock, request.xid, 3, 1)}))
""")


async def test_proxy_mode_next_to_dnsmasq(net: Net) -> None:
    srv, cli, dhcpd = lan(net, dhcpd=True)
    assert dhcpd is not None
    w = net.workdir
    net.spawn(dhcpd, ["dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts",
                      "--interface=eth0", "--bind-interfaces", "--dhcp-range=10.77.0.100,10.77.0.150,255.255.255.0,1h",
                      "--no-ping", "--dhcp-authoritative", f"--dhcp-leasefile={w}/dnsmasq.leases",
                      f"--pid-file={w}/dnsmasq.pid", "--user=root", "--log-dhcp", "--log-facility=-"], "dnsmasq.log")
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp={"mode": "proxy"})
    # The address comes from dnsmasq (bootd ignores the plain client: it is not PXE).
    dump = script(net, "udhcpc.sh", f'env > {w}/udhcpc-"$1".env')
    net.run(cli, ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(dump)])
    env = env_file(w / "udhcpc-bound.env")
    assert env["serverid"] == "10.77.0.2" and "boot_file" not in env
    my_ip = env["ip"]
    sh("ip", "-n", cli, "addr", "add", f"{my_ip}/24", "dev", "eth0")
    out = net.run(cli, [sys.executable, "-c", PXE_CLIENT, "eth0", my_ip, CLI_MAC,
                        str(DATA / "edk2-pxe-c2s-discover-1.bin"), str(DATA / "edk2-pxe-c2s-request-1.bin")])
    result = json.loads(out.stdout)
    by_server = {x["server"]: x for x in result["offers"]}
    assert set(by_server) == {"10.77.0.1", "10.77.0.2"}, result
    real, proxy = by_server["10.77.0.2"], by_server["10.77.0.1"]
    assert real["yiaddr"].startswith("10.77.0.1") and real["file"] == ""
    assert proxy["yiaddr"] == "0.0.0.0" and proxy["siaddr"] == "10.77.0.1" and proxy["file"] == "snponly.efi"
    assert proxy["vc"] == "PXEClient" and proxy["has43"] and proxy["opt67"] == "snponly.efi"
    (ack,) = result["acks"]
    assert ack["type"] == 5 and ack["src"] == "10.77.0.1" and ack["sport"] == 4011
    assert ack["file"] == "snponly.efi" and ack["siaddr"] == "10.77.0.1"
    node, lease = await node_record(cfg, CLI_MAC)
    assert node is not None and node.state is State.PXE
    assert lease is None  # proxy mode never hands out addresses


DISCOVER_ONLY = CLIENT + textwrap.dedent("""
    ifname, mac = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", ""))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    sock.bind(("0.0.0.0", 68))
    discover = DhcpPacket.parse(open(sys.argv[3], "rb").read())  # a BIOS PXE ROM's DISCOVER, our MAC
    discover.chaddr, discover.xid = mac + bytes(10), 0x0bd0004
    assert discover.options[93] == b"\\x00\\x00" and discover.options[60].startswith(b"PXEClient"), discover.options
    sock.sendto(discover.encode(), ("255.255.255.255", 67))
    print(json.dumps({"offers": collect(sock, discover.xid, 3, 1)}))
""")


async def test_sighup_changes_the_boot_file_dhcp_hands_out(net: Net) -> None:
    """README: boot settings take effect at once on SIGHUP; DHCP's boot program names included."""
    if not daemon_wires_dhcp():
        pytest.skip("bootd serve does not run DHCP in this tree")
    srv, cli, _ = lan(net)
    cfg = start_bootd(net, srv, address="10.77.0.1", interface="br0", dhcp=FULL)
    (bootd,) = net.procs  # `ip netns exec` execs bootd: this pid is the daemon's
    dump = script(net, "udhcpc.sh", f'env > {net.workdir}/udhcpc-"$1".env')
    udhcpc = ["busybox", "udhcpc", "-f", "-q", "-n", "-t", "5", "-T", "1", "-i", "eth0", "-s", str(dump),
              "-V", PXE_VC, "-x", "0x5d:0000"]
    net.run(cli, udhcpc)
    assert env_file(net.workdir / "udhcpc-bound.env")["boot_file"] == "undionly.kpxe"

    settings = tomllib.loads(cfg.read_text())
    settings["boot"] = {"bios_nbp": "reloaded.kpxe"}
    write_config(cfg, settings)
    log = net.workdir / "bootd.log"
    bootd.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "event=reloaded" not in log.read_text():
        assert time.monotonic() < deadline, f"bootd did not reload:\n{log.read_text()[-3000:]}"
        assert bootd.poll() is None, f"bootd exited on SIGHUP:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)

    out = net.run(cli, [sys.executable, "-c", DISCOVER_ONLY, "eth0", "52:54:00:77:10:02",
                        str(DATA / "udhcpc-c2s-discover-1.bin")])
    (offer,) = json.loads(out.stdout)["offers"]
    assert offer["type"] == 2 and offer["file"] == "reloaded.kpxe" and offer["opt67"] == "reloaded.kpxe"
    assert offer["siaddr"] == "10.77.0.1"
    (net.workdir / "udhcpc-bound.env").unlink()
    net.run(cli, udhcpc)  # the first client boots again: its next DORA names the new program too
    env = env_file(net.workdir / "udhcpc-bound.env")
    assert env["boot_file"] == "reloaded.kpxe" and env["ip"] == "10.77.0.100"
