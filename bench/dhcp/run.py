#!/usr/bin/env python3
"""DHCP benchmark: Kea's perfdhcp drives DORA exchanges against bootd and dnsmasq, same setup, same run.

Setup (root needed; everything inside namespaces ``bd-dhcp-<pid>-bsrv`` / ``-bcli`` that are deleted at
the end, also on failure): a veth pair, the server on 10.80.0.1/16 in one namespace, perfdhcp on
10.80.0.2/16 in the other. perfdhcp acts as a relay (giaddr = its address), so replies are unicast.
Each server starts from an empty state (bootd: fresh SQLite registry, first contact registers every
client as a node, leases persisted before each ACK; dnsmasq: fresh lease file, ``--no-ping``,
lease-max raised, a boot file, as fair a configuration as it gets).

For every offered rate in ``--rates``, each server gets ``--clients`` simulated clients (perfdhcp
``-R``) and the same number of exchanges (``-n``), bounded by ``--period`` seconds per step. Servers
run back to back per step (order alternating per run) so background load hits both alike. Reported:
completed 4-way exchanges/s (perfdhcp's "Rate"), drops (unanswered DISCOVERs + REQUESTs) and the
ratio bootd/dnsmasq per offered rate (medians over ``--runs``), and the headline: the ratio at the
highest offered rate bootd served with 0 drops.

Usage: sudo .venv/bin/python bench/dhcp/run.py [--clients 10000] [--rates 250,500,1000,2000] [--runs 1]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PID = os.getpid()
SRV, CLI = f"bd-dhcp-{PID}-bsrv", f"bd-dhcp-{PID}-bcli"
SERVER_IP, CLIENT_IP = "10.80.0.1", "10.80.0.2"
POOL = ("10.80.1.0", "10.80.200.255", "255.255.0.0")

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
        metrics = CollectorRegistry()
        server = DhcpServer(svc, listen=cfg.dhcp.listen, port=cfg.dhcp.port, interface=cfg.dhcp.interface,
                            queue_size=cfg.dhcp.queue_size, metrics=metrics)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()
        await store.close()
        for m in metrics.collect():
            for s in m.samples:
                if s.name.startswith("bootd_dhcp_dropped_total"):
                    print("DROPPED", s.labels.get("reason"), int(s.value), flush=True)

    asyncio.run(main())
""")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr}")
    return proc


def setup() -> None:
    for ns in (SRV, CLI):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", SRV, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", CLI)
    sh("ip", "-n", SRV, "addr", "add", f"{SERVER_IP}/16", "dev", "eth0")
    sh("ip", "-n", CLI, "addr", "add", f"{CLIENT_IP}/16", "dev", "eth0")
    sh("ip", "-n", SRV, "link", "set", "eth0", "up")
    sh("ip", "-n", CLI, "link", "set", "eth0", "up")


def teardown() -> None:
    for ns in (SRV, CLI):
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            try:
                os.kill(int(pid), 9)  # only processes this script started live in its namespaces
            except ProcessLookupError:
                pass
        sh("ip", "netns", "del", ns, check=False)


@dataclass
class Step:
    server: str
    rate: int
    achieved: float
    sent: int
    completed: int
    drops: int
    delay_ms: float
    seconds: float


def start_server(kind: str, work: Path) -> subprocess.Popen[bytes]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = open(work / f"{kind}.log", "wb")  # noqa: SIM115
    if kind == "bootd":
        (work / "bootd.toml").write_text(textwrap.dedent(f"""
            [server]
            state_dir = "{work / 'state'}"
            address = "{SERVER_IP}"
            log_level = "warning"
            [dhcp]
            enabled = true
            mode = "full"
            interface = "eth0"
            pool_start = "{POOL[0]}"
            pool_end = "{POOL[1]}"
            netmask = "{POOL[2]}"
            lease_time = 3600
            queue_size = 4096
            [http]
            enabled = false
        """))
        cmd = [sys.executable, "-c", RUNNER, str(work / "bootd.toml")]
    else:
        # dnsmasq rewrites its whole lease file on every change (quadratic in clients); "dnsmasq-ro"
        # (--leasefile-ro) keeps leases in memory only: faster, but a restart forgets every lease.
        cmd = ["dnsmasq", "--keep-in-foreground", "--port=0", "--no-resolv", "--no-hosts", "--interface=eth0",
               "--bind-interfaces", f"--dhcp-range={POOL[0]},{POOL[1]},{POOL[2]},1h", "--dhcp-lease-max=100000",
               "--no-ping", "--dhcp-authoritative", f"--dhcp-leasefile={work / 'leases'}",
               f"--pid-file={work / 'pid'}", "--user=root", f"--dhcp-boot=undionly.kpxe,,{SERVER_IP}"]
        if kind == "dnsmasq-ro":
            cmd.append("--leasefile-ro")
    proc = subprocess.Popen(["ip", "netns", "exec", SRV, *cmd], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = sh("ip", "netns", "exec", SRV, "ss", "-lunH").stdout
        if any(line.split()[3].endswith(":67") for line in out.splitlines() if line.split()):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"{kind} did not start: {(work / f'{kind}.log').read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def perfdhcp(rate: int, clients: int, period: float) -> tuple[float, int, int, int, float, float]:
    cmd = ["ip", "netns", "exec", CLI, "perfdhcp", "-4", "-g", "single", "-l", CLIENT_IP, "-R", str(clients),
           "-n", str(clients), "-r", str(rate), "-p", str(int(period)), "-d", "2", "-W", "2000000", SERVER_IP]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=period + 30, check=False).stdout
    seconds = time.monotonic() - t0
    achieved = float(re.search(r"Rate: ([\d.]+)", out).group(1)) if "Rate:" in out else 0.0  # type: ignore[union-attr]
    sent = [int(x) for x in re.findall(r"sent packets: (\d+)", out)]
    recv = [int(x) for x in re.findall(r"received packets: (\d+)", out)]
    drops = [int(x) for x in re.findall(r"drops: (\d+)", out)]
    delays = [float(x) for x in re.findall(r"avg delay: ([\d.]+) ms", out)]
    if len(sent) < 2 or len(recv) < 2:
        raise SystemExit(f"cannot parse perfdhcp output:\n{out}")
    return achieved, sent[0], recv[1], sum(drops), sum(delays), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rates", default="250,500,1000,2000")
    ap.add_argument("--period", type=int, default=45, help="upper bound in seconds for one step")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--servers", default="bootd,dnsmasq")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    for tool in ("perfdhcp", "dnsmasq", "ip"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    rates = [int(r) for r in args.rates.split(",")]
    servers = args.servers.split(",")
    steps: list[Step] = []
    tmp = Path(tempfile.mkdtemp(prefix="bd-dhcp-bench-"))
    try:
        setup()
        for run in range(args.runs):
            for rate in rates:
                # Alternate the order each run so background load does not always favour the same server.
                for server in servers if run % 2 == 0 else list(reversed(servers)):
                    proc = start_server(server, tmp / server)
                    try:
                        achieved, sent, done, drops, delay, secs = perfdhcp(rate, args.clients, args.period)
                    finally:
                        stop_server(proc)
                    steps.append(Step(server, rate, achieved, sent, done, drops, delay, secs))
                    print(f"run {run + 1} {server:10s} offered {rate:5d}/s: {achieved:8.1f} exchanges/s, "
                          f"{done}/{sent} completed, {drops} drops, avg delay {delay:.1f} ms", flush=True)
    finally:
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(steps, servers, rates, args.clients)


def report(steps: list[Step], servers: list[str], rates: list[int], clients: int) -> None:
    def med(server: str, rate: int, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in steps if s.server == server and s.rate == rate))

    print()
    print(f"perfdhcp DORA, {clients} simulated clients (-R), up to {clients} exchanges per step; medians over runs")
    head = f"{'offered/s':>9s}" + "".join(f" {s + ' exch/s':>18s} {'drops':>6s}" for s in servers)
    base = "dnsmasq" if "dnsmasq" in servers else None
    if "bootd" in servers and base:
        head += f" {'bootd/' + base:>14s}"
    print(head)
    headline: tuple[int, float, float] | None = None
    for rate in rates:
        line = f"{rate:9d}"
        for s in servers:
            line += f" {med(s, rate, 'achieved'):18.1f} {med(s, rate, 'drops'):6.0f}"
        if "bootd" in servers and base:
            b, d = med("bootd", rate, "achieved"), med(base, rate, "achieved")
            ratio = b / d if d else float("inf")
            line += f" {ratio:14.2f}"
            if med("bootd", rate, "drops") == 0:
                headline = (rate, ratio, med(base, rate, "drops"))
        print(line)
    print()
    if headline is not None:
        rate, ratio, other_drops = headline
        print(f"highest offered rate with 0 bootd drops: {rate}/s; ratio bootd/{base} exchanges/s there: "
              f"{ratio:.2f} ({base} dropped {other_drops:.0f})")
    elif "bootd" in servers:
        print("bootd dropped at every offered rate: lower --rates")


if __name__ == "__main__":
    main()
