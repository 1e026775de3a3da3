"""Boot storm against one `bootd serve` in a private network namespace.

    .venv/bin/python bench/storm/run.py [--nodes 500] [--kill-at SECONDS] [--json OUT]

Two namespaces joined by a veth pair: bootd (DHCP full mode on a /20, TFTP, HTTP) in one, the
simulated nodes (storm.py) in the other.  With --kill-at, bootd is killed with SIGKILL that many
seconds into the storm and started again; the storm must still complete and nothing registered
before the kill may be lost.  Prints names, addresses, failures, duration, the p99 of script
requests, and the bytes the master sent.  Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.storm.storm import StormConfig, percentile, storm  # noqa: E402

SERVER_IP = "10.78.0.1"
CLIENT_IP = "10.78.0.2"
# One addressing for every storm segment (this bench's and cluster.py's): a storm larger than the pool cannot
# finish (2,000 nodes once ran into a /22 of 762 addresses and spent their deadline on pool-exhausted drops).
PREFIX = 20
NETMASK = "255.255.240.0"
POOL_START, POOL_END = "10.78.1.0", "10.78.15.250"
POOL_SIZE = int(ipaddress.ip_address(POOL_END)) - int(ipaddress.ip_address(POOL_START)) + 1


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


@dataclass
class Net:
    server_ns: str
    client_ns: str
    server_if: str = "bds0"
    client_if: str = "bdc0"


@contextlib.contextmanager
def network(prefix: str = "bd-storm") -> Iterator[Net]:
    tag = f"{os.getpid()}-{random.randrange(1000)}"
    net = Net(f"{prefix}-{tag}-srv", f"{prefix}-{tag}-cli")
    try:
        sh("ip", "netns", "add", net.server_ns)
        sh("ip", "netns", "add", net.client_ns)
        for ns in (net.server_ns, net.client_ns):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", net.server_ns, "link", "add", net.server_if, "type", "veth", "peer", "name", net.client_if,
           "netns", net.client_ns)
        sh("ip", "-n", net.server_ns, "addr", "add", f"{SERVER_IP}/{PREFIX}", "dev", net.server_if)
        sh("ip", "-n", net.client_ns, "addr", "add", f"{CLIENT_IP}/{PREFIX}", "dev", net.client_if)
        sh("ip", "-n", net.server_ns, "link", "set", net.server_if, "up")
        sh("ip", "-n", net.client_ns, "link", "set", net.client_if, "up")
        # Simulated nodes broadcast DHCP from 0.0.0.0 and all share one address afterwards.
        sh("ip", "-n", net.client_ns, "route", "add", "255.255.255.255/32", "dev", net.client_if, check=False)
        yield net
    finally:
        for ns in (net.client_ns, net.server_ns):
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)


def write_config(workdir: Path, net: Net, http_port: int = 8080) -> Path:
    state = workdir / "state"
    text = f"""
[server]
state_dir = "{state}"
address = "{SERVER_IP}"
interface = "{net.server_if}"
graceful_timeout = 5
log_level = "info"

[registry]
# The simulated nodes share one source address (they do not configure their leases), so the lease
# evidence a real node brings cannot be checked here: tests/integration/test_credentials.py covers it.
evidence = "none"

[dhcp]
enabled = true
mode = "full"
pool_start = "{POOL_START}"
pool_end = "{POOL_END}"
netmask = "{NETMASK}"
lease_time = 3600
queue_size = 4096

[tftp]
enabled = true
listen = "{SERVER_IP}"
# The simulated nodes share one source address, where a real rack has one per node: the per-source bounds
# (a defence against one host) would throttle the whole storm to 8 transfers, as if every node sat behind
# one NAT. Per-source up to the global bound here; over HTTP the storm's address is trusted (below).
max_sessions_per_source = 1000

[http]
listen = "{SERVER_IP}"
trusted = ["{CLIENT_IP}/32"]
port = {http_port}
max_bulk_streams = 64
bulk_queue = 4096

[capsule]
chunk_min = 16384
chunk_avg = 65536
chunk_max = 262144
"""
    path = workdir / "bootd.toml"
    path.write_text(text)
    return path


def make_capsule(workdir: Path, config: Path, size_mib: int = 2, kernel: bool = True) -> None:
    """``kernel=False`` for a server with a stage one (real nodes too): it refuses a capsule kernel whose
    modules it cannot match, and the simulated nodes never load one."""
    tree = workdir / "tree"
    rng = random.Random(7)
    for d in ("bin", "etc", "usr/lib", "boot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "hostname").write_text("storm\n")
    if kernel:
        (tree / "boot" / "vmlinuz-storm").write_bytes(rng.randbytes(64 * 1024))
    for i in range(size_mib * 4):
        half = rng.randbytes(128 * 1024)
        (tree / "usr/lib" / f"lib{i}.so").write_bytes(half + bytes(128 * 1024))
    cli(config, "capsule", "import", "storm", str(tree))
    cli(config, "group", "set", "default", "--capsule", "storm")


def cli(config: Path, *args: str, ns: str | None = None) -> str:
    cmd = [sys.executable, "-m", "bootd", "-c", str(config), *args]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"bootd {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def start_bootd(config: Path, net: Net, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["ip", "netns", "exec", net.server_ns, sys.executable, "-m", "bootd", "-c", str(config),
                             "serve"], cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bootd exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        probe = subprocess.run(["ip", "netns", "exec", net.server_ns, "curl", "-sf", "-o", "/dev/null",
                                f"http://{SERVER_IP}:8080/healthz"], timeout=10)
        if probe.returncode == 0:
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("bootd did not answer /healthz within 30 s:\n" + log.read_text()[-3000:])


def wire_tx_bytes(net: Net) -> int:
    """Bytes the master put on the wire (every frame, headers included), from the veth's counters."""
    text = subprocess.run(["ip", "netns", "exec", net.server_ns, "cat", "/proc/net/dev"], capture_output=True,
                          text=True, timeout=30).stdout
    for line in text.splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == net.server_if:
            return int(counters.split()[8])
    return 0


@dataclass
class Report:
    nodes: int
    ok: int
    failed: int
    distinct_names: int
    distinct_ips: int
    duration: float
    script_p50_ms: float
    script_p99_ms: float
    client_bytes: int
    master_tx_bytes: int
    client_retries: int
    probe_requests: int
    probe_failed: int
    probe_p50_ms: float
    probe_p99_ms: float
    registry_ready: int
    registry_nodes: int
    leases: int
    errors: list[str] = field(default_factory=list)
    killed_at: float | None = None
    lost_after_kill: list[str] = field(default_factory=list)


PROBE = """
import http.client, sys, time
host, path, until = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, 8080, timeout=10)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
    except OSError:
        status = 0
    print(f"{status} {time.monotonic() - t0:.6f}", flush=True)
    time.sleep(0.05)
"""


def client_main(args: argparse.Namespace) -> None:
    """Runs inside the client namespace: the storm itself, results as JSON on stdout."""
    server = args.server or SERVER_IP
    cfg = StormConfig(nodes=args.nodes, server=server, deadline=args.deadline, http_base=f"http://{server}:8080",
                      follow_server=args.follow, first_index=args.first_index, heartbeat=args.heartbeat,
                      linger=args.linger)
    results, duration = asyncio.run(storm(cfg, cfg.http_base, interface=args.interface))
    print(json.dumps({"duration": duration, "results": [asdict(r) for r in results]}))


def run(nodes: int, workdir: Path, kill_at: float | None = None, deadline: float = 240.0) -> Report:
    workdir.mkdir(parents=True, exist_ok=True)
    with network() as net:
        config = write_config(workdir, net)
        make_capsule(workdir, config)
        log = workdir / "bootd.log"
        bootd = start_bootd(config, net, log)
        # A separate process asks for one registered node's script every 50 ms during the storm: the
        # latency an administrator's or a late node's small request sees, apart from the storm client's
        # own event loop.
        cli(config, "node", "add", "probe", "--mac", "52:54:ff:00:00:01")
        probe = subprocess.Popen(["ip", "netns", "exec", net.client_ns, sys.executable, "-c", PROBE, SERVER_IP,
                                  "/boot/52-54-ff-00-00-01.ipxe", str(deadline)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        client = subprocess.Popen(
            ["ip", "netns", "exec", net.client_ns, sys.executable, __file__, "--client", "--nodes", str(nodes),
             "--interface", net.client_if, "--deadline", str(deadline)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lost: list[str] = []
        try:
            if kill_at is not None:
                time.sleep(kill_at)
                before = json.loads(cli(config, "node", "list", "--json"))
                bootd.send_signal(signal.SIGKILL)
                bootd.wait(timeout=10)
                # Our pid is `ip netns exec`, which exec()s python: the same process, so this killed bootd.
                bootd = start_bootd(config, net, log)
                after = {n["mac"]: n["name"] for n in json.loads(cli(config, "node", "list", "--json"))}
                lost = [n["name"] for n in before if after.get(n["mac"]) != n["name"]]
            out, err = client.communicate(timeout=deadline + 60)
        finally:
            probe.terminate()
            probe_out = probe.communicate(timeout=30)[0]
            if client.poll() is None:
                client.kill()
                client.wait()
            bootd.send_signal(signal.SIGTERM)
            try:
                bootd.wait(timeout=15)
            except subprocess.TimeoutExpired:
                bootd.kill()
                bootd.wait()
        if client.returncode != 0:
            raise RuntimeError(f"storm client failed ({client.returncode}):\n{err.decode()[-3000:]}")
        data = json.loads(out)
        results: list[dict[str, Any]] = data["results"]
        registry = json.loads(cli(config, "node", "list", "--json"))
        leases = json.loads(cli(config, "lease", "list", "--json"))
        master_tx = wire_tx_bytes(net)
    samples = [line.split() for line in probe_out.splitlines() if line.strip()]
    probe_ms = [float(t) * 1000 for status, t in samples if status == "200"]
    probe_failed = sum(1 for status, _ in samples if status != "200")
    ok = [r for r in results if r["ok"]]
    latencies = [r["script_latency"] for r in ok]
    errors = sorted({r["error"] for r in results if not r["ok"]})
    return Report(
        nodes=nodes, ok=len(ok), failed=nodes - len(ok),
        distinct_names=len({r["name"] for r in ok}), distinct_ips=len({r["ip"] for r in ok if r["ip"]}),
        duration=data["duration"], script_p50_ms=percentile(latencies, 50) * 1000,
        script_p99_ms=percentile(latencies, 99) * 1000, client_bytes=sum(r["bytes"] for r in results),
        client_retries=sum(r["retries"] for r in results), master_tx_bytes=master_tx,
        probe_requests=len(samples), probe_failed=probe_failed, probe_p50_ms=percentile(probe_ms, 50),
        probe_p99_ms=percentile(probe_ms, 99),
        registry_ready=sum(1 for n in registry if n["state"] == "ready"),
        registry_nodes=sum(1 for n in registry if n["name"] != "probe"),
        leases=len(leases), errors=errors[:20], killed_at=kill_at, lost_after_kill=lost,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds the storm may take (bounded)")
    parser.add_argument("--kill-at", type=float, help="SIGKILL bootd this many seconds in, then restart it")
    parser.add_argument("--workdir", type=Path, help="keep state and logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--linger", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args)
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bootd-storm-") as tmp:
        report = run(args.nodes, args.workdir or Path(tmp), args.kill_at, args.deadline)
    for key, value in asdict(report).items():
        print(f"{key:18} {value}")
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
