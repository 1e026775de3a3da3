#!/usr/bin/env python3
"""DHCP benchmark: Kea's perfdhcp drives DORA exchanges against bootd, Kea's kea-dhcp4 and dnsmasq, same
setup, same run.

Setup (root needed; everything inside namespaces ``bd-dhcp-<pid>-bsrv`` / ``-bcli`` that are deleted at
the end, also on failure): a veth pair, the server on 10.80.0.1/16 in one namespace, perfdhcp on
10.80.0.2/16 in the other. perfdhcp acts as a relay (giaddr = its address), so replies are unicast.
Each server starts from an empty state in a private temporary directory:
- bootd: fresh SQLite registry; first contact registers every client as a node; each lease is committed
  (SQLite WAL, synchronous=NORMAL) before its ACK is sent.
- kea: kea-dhcp4 with its memfile lease backend, ``persist: true`` (each lease appended to a CSV file
  before the reply), lease file cleanup off; never a system service, only this process in the namespace.
- dnsmasq: fresh lease file, ``--no-ping``, lease-max raised, a boot file, as fair a configuration as it
  gets.

Two modes. ``--rates``: for every offered rate each server gets ``--clients`` simulated clients (perfdhcp
``-R``) and the same number of exchanges (``-n``), bounded by ``--period`` seconds per step; servers run
back to back per step (order alternating per run) so background load hits all alike. ``--capacity LO,HI``:
each server's capacity as issue 20 defines it, the highest offered rate on a grid of ``--grid`` (250/s)
answered with 0 drops and an average delay under 10 ms, found by a binary search per server with the
servers' probes interleaved. Every step also shows the client's and the server's CPU seconds. perfdhcp's
CPU is no sign of its ceiling: it polls while it waits for its last answers (about a core whatever the rate;
4 CPU-s for a 0.6 s step at 16,000/s offered), which is why an earlier version of this benchmark, reading
"110% of a core" at 8,000/s as perfdhcp's limit, capped its searches there. Kea and the floor answer 16,000/s
driven by either client, and the light client's own rate (completed / its run time) shows they really got it.

Two load clients (``--load``, either or both in one run). perfdhcp, Kea's, is the reference; near 8,000
exchanges/s it needs a core of its own, which on this 2-core machine leaves the server the other one.
``light`` is bench/dhcp/dora.c (built with gcc into the run's directory): the same exchanges (a new client
per exchange, relayed, the REQUEST sent as the OFFER arrives, no retransmission, a drop after 2 s unanswered,
delay = average DISCOVER->OFFER plus average REQUEST->ACK, as perfdhcp sums them), for a few system calls per
message, so the servers, not the client, find their limit (issue 20: "also drive both with a lighter client").
Its series are shown as ``server~light``.

perfdhcp runs single-threaded (``-g single``). ``BENCH_PERFDHCP_THREADS=multi`` gives it a receiver thread, its own
default on a machine of more than one CPU: here both servers do worse that way (3 Dec, one run: bootd 9,750/s, Kea
13,000/s, against 23,750 and 16,000 single-threaded the same morning), drops at the client from 10,000/s on, since
the receiver thread polls on the core the server needs. perfdhcp's own ceiling is not what stops either server: it
drives ``floor-mem`` (floor.py without SQLite) at 47,500/s with 0 drops (3 Dec, one run).

``floor-reg`` is floor.py with bootd's durable writes in bootd's schema (floor.py --register): with bootd's receive
buffer it answers about 1.6x what bootd does with perfdhcp (3 Dec, medians of 3: 38,250/s, bootd 23,250, Kea 24,000).
Both clients' MACs count up (perfdhcp's: 9,960 of 10,000 in order), so the registry's MAC indexes grow at their end.

Usage: sudo .venv/bin/python bench/dhcp/run.py [--clients 10000] [--rates 250,500,1000,2000] [--runs 1]
       sudo .venv/bin/python bench/dhcp/run.py --capacity 250,8000 [--servers bootd,kea,dnsmasq]
       sudo .venv/bin/python bench/dhcp/run.py --capacity 2000,16000 --servers bootd,kea,floor --load perfdhcp,light
       sudo .venv/bin/python bench/dhcp/run.py --rates 5000 --runs 3 --servers bootd@/path/to/old,bootd
           (an A/B: ``bootd@PATH`` runs bootd from another checkout, e.g. a git worktree of an earlier commit)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
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
    try:
        from bootd.daemon import tune_gc
    except ImportError:  # a checkout from before it (bootd@PATH)
        def tune_gc() -> None: ...
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
        tune_gc()  # as the daemon does once started
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


MAX_DELAY_MS = 10.0


def series_name(server: str, client: str) -> str:
    """The server and, when it is not perfdhcp, the client that drove it: what a capacity is searched for."""
    return server if client == "perfdhcp" else f"{server}~{client}"


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
    client_cpu: float  # the load client's CPU seconds (user + system) for the step
    server_cpu: float  # the server's CPU seconds over its life (start, step)
    client: str = "perfdhcp"  # the load client: perfdhcp, or "light" (bench/dhcp/dora.c)

    @property
    def series(self) -> str:
        return series_name(self.server, self.client)

    @property
    def ok(self) -> bool:
        """Issue 20's capacity criterion: every exchange answered, average delay under 10 ms."""
        return self.drops == 0 and self.completed >= self.sent and self.delay_ms < MAX_DELAY_MS

    def client_load(self) -> float:
        """The load client's CPU share of one core over the step (perfdhcp's includes its busy wait at the end)."""
        return self.client_cpu / max(self.seconds, 1e-3)


def start_server(kind: str, work: Path) -> subprocess.Popen[bytes]:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = open(work / "server.log", "wb")  # noqa: SIM115
    kind, _, tree = kind.partition("@")  # bootd@PATH: bootd from another checkout (an A/B of two versions, one run)
    cwd = Path(tree).resolve() if tree else ROOT
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
            [registry]
            # perfdhcp's clients carry no PXE vendor class; each registers as a node on first contact,
            # all of them at once (no first-contact rate limit), as a real rack's first power-on would.
            register_any_client = true
            register_rate = 1000000
            register_burst = 1000000
            max_nodes = 1000000
            [http]
            enabled = false
        """))
        cmd = [sys.executable, "-c", RUNNER, str(work / "bootd.toml")]
        spy = os.environ.get("BENCH_PYSPY")  # a py-spy binary: profile bootd's process (all threads) per step
        if spy:
            profile = Path(os.environ.get("BENCH_PYSPY_OUT", "/tmp")) / f"bootd-{time.strftime('%H%M%S')}.pyspy"
            rate = os.environ.get("BENCH_PYSPY_RATE", "200")  # samples a second
            cmd = [spy, "record", "-r", rate, "--threads", "-f", "raw", "-o", str(profile), "--", *cmd]
    elif kind == "kea":
        # Kea's own server, as its documentation sets up a memfile deployment: leases in memory and appended
        # to a CSV file (persist) as they are granted; the lease file cleanup (LFC) off so no second process
        # competes for the CPU mid-step. UDP sockets: perfdhcp relays, so every request arrives unicast.
        (work / "kea-dhcp4.json").write_text(json.dumps({"Dhcp4": {
            "interfaces-config": {"interfaces": [f"eth0/{SERVER_IP}"], "dhcp-socket-type": "udp"},
            "lease-database": {"type": "memfile", "persist": True, "name": str(work / "leases.csv"),
                               "lfc-interval": 0},
            "valid-lifetime": 3600, "renew-timer": 1800, "rebind-timer": 3150,
            "authoritative": True,
            "next-server": SERVER_IP, "boot-file-name": "undionly.kpxe",
            "subnet4": [{"id": 1, "subnet": "10.80.0.0/16", "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}]}],
            "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                         "output_options": [{"output": str(work / "kea.log")}]}],
        }}))
        # Kea's pid and lock files go where the bench's state goes, not to /run.
        os.environ["KEA_PIDFILE_DIR"] = str(work)
        os.environ["KEA_LOCKFILE_DIR"] = str(work)
        cmd = ["kea-dhcp4", "-c", str(work / "kea-dhcp4.json")]
    elif kind in ("floor", "floor-mem", "floor-reg"):
        # Not a server to compare with: the least any CPython DHCP server must do per exchange (floor.py).
        cmd = [sys.executable, str(ROOT / "bench" / "dhcp" / "floor.py"), "--listen", SERVER_IP, "--interface", "eth0",
               "--db", str(work / "floor.sqlite"), "--pool", POOL[0]]
        if kind == "floor-mem":
            cmd.append("--memory")
        elif kind == "floor-reg":
            cmd.append("--register")
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
                            stdin=subprocess.DEVNULL, cwd=cwd)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = sh("ip", "netns", "exec", SRV, "ss", "-lunH").stdout
        if any(line.split()[3].endswith(":67") for line in out.splitlines() if line.split()):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"{kind} did not start: {(work / 'server.log').read_text()[-2000:]}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds of a live process (ip netns exec execs the server, so the Popen pid is the server's): utime +
    stime, and stime alone (the kernel's share: the sockets, the veth pair, the files)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if os.environ.get("BENCH_PYSPY"):
        # py-spy writes its profile when the profiled process exits: stop bootd (py-spy's child), not py-spy.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            for kid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                os.kill(int(kid), signal.SIGTERM)
            proc.wait(timeout=30)
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


PERFDHCP_THREADS = os.environ.get("BENCH_PERFDHCP_THREADS", "single")  # perfdhcp -g: single, or multi (see above)


def perfdhcp_command(rate: int, clients: int, period: float, exchanges: int | None = None) -> list[str]:
    """perfdhcp in the client namespace, relaying (-l) to the server: ``rate`` new exchanges/s from ``clients``
    simulated clients for at most ``period`` s, and at most ``exchanges`` of them (None: until the period ends)."""
    count = ["-n", str(exchanges)] if exchanges is not None else []
    return ["ip", "netns", "exec", CLI, "perfdhcp", "-4", "-g", PERFDHCP_THREADS, "-l", CLIENT_IP, "-R", str(clients),
            *count, "-r", str(rate), "-p", str(int(period)), "-d", "2", "-W", "2000000", SERVER_IP]


def perfdhcp(rate: int, clients: int, period: float) -> tuple[float, int, int, int, float, float, float]:
    cmd = perfdhcp_command(rate, clients, period, exchanges=clients)
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=period + 30, check=False).stdout
    seconds, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    achieved = float(re.search(r"Rate: ([\d.]+)", out).group(1)) if "Rate:" in out else 0.0  # type: ignore[union-attr]
    sent = [int(x) for x in re.findall(r"sent packets: (\d+)", out)]
    recv = [int(x) for x in re.findall(r"received packets: (\d+)", out)]
    drops = [int(x) for x in re.findall(r"drops: (\d+)", out)]
    delays = [float(x) for x in re.findall(r"avg delay: ([\d.]+) ms", out)]
    if len(sent) < 2 or len(recv) < 2:
        raise SystemExit(f"cannot parse perfdhcp output:\n{out}")
    return achieved, sent[0], recv[1], sum(drops), sum(delays), seconds, cpu


LIGHT_SOURCE = Path(__file__).resolve().parent / "dora.c"
DROP_MS = 2000  # an exchange unanswered this long is a drop (perfdhcp -d 2)


def build_light(work: Path) -> Path:
    """The light client (bench/dhcp/dora.c), compiled into the run's private directory on first use."""
    binary = work / "dora"
    if not binary.exists():
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(LIGHT_SOURCE)], check=True)
    return binary


def light(binary: Path, rate: int, clients: int, period: float) -> tuple[float, int, int, int, float, float, float]:
    """The light client: ``clients`` exchanges, each a new client, ``rate`` a second; perfdhcp's figures."""
    cmd = ["ip", "netns", "exec", CLI, str(binary), SERVER_IP, CLIENT_IP, str(rate), str(clients), str(int(period)),
           str(DROP_MS)]
    t0, r0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=period + 30, check=False)
    seconds, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    got = dict(re.findall(r"(\w+)=([\d.]+)", out.stdout))
    if os.environ.get("BENCH_LIGHT_RAW"):  # the client's own line: DISCOVER->OFFER and REQUEST->ACK apart
        print(f"  light: {out.stdout.strip()}", flush=True)
    if out.returncode != 0 or "sent" not in got:
        raise SystemExit(f"the light client failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    sent, done = int(got["sent"]), int(got["completed"])
    return (done / float(got["seconds"]), sent, done, int(got["drops"]), float(got["do_ms"]) + float(got["ra_ms"]),
            seconds, cpu)


def rcvbuf_errors(namespace: str) -> int:
    """UDP datagrams the kernel dropped in this namespace because a socket's receive buffer was full."""
    snmp = sh("ip", "netns", "exec", namespace, "cat", "/proc/net/snmp").stdout
    head, values = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")][:2]
    return int(values[head.index("RcvbufErrors")])


def measure(server: str, rate: int, clients: int, period: float, work: Path, client: str = "perfdhcp") -> Step:
    proc = start_server(server, work / re.sub(r"[^\w.-]", "_", server))
    # Where a drop happened, when one did: a full receive buffer at the client (replies sent faster than it reads)
    # or at the server (requests arriving faster than it reads); the rest were dropped by the server itself.
    full = (rcvbuf_errors(CLI), rcvbuf_errors(SRV))
    try:
        if client == "light":
            achieved, sent, done, drops, delay, secs, client_cpu = light(build_light(work), rate, clients, period)
        else:
            achieved, sent, done, drops, delay, secs, client_cpu = perfdhcp(rate, clients, period)
        server_cpu, server_sys = cpu_seconds(proc.pid)
    finally:
        stop_server(proc)
    at_client, at_server = rcvbuf_errors(CLI) - full[0], rcvbuf_errors(SRV) - full[1]
    where = f" (receive buffer full: {at_client} at the client, {at_server} at the server)" if drops else ""
    step = Step(server, rate, achieved, sent, done, drops, delay, secs, client_cpu, server_cpu, client)
    print(f"{step.series:10s} offered {rate:5d}/s: {achieved:8.1f} exchanges/s, {done}/{sent} completed, "
          f"{drops} drops{where}, avg delay {delay:.1f} ms, {client} {step.client_load():.0%} of a core, "
          f"server {server_cpu:.2f} cpu-s ({server_sys:.2f} system): {'ok' if step.ok else 'FAIL'}", flush=True)
    return step


def capacity(servers: list[str], lo: int, hi: int, grid: int, clients: int, period: float,
             work: Path, loads: tuple[str, ...] = ("perfdhcp",)) -> tuple[list[Step], dict[str, int]]:
    """Each server's capacity on a grid of offered rates, with each load client: a binary search (capacity taken
    as monotone), the probes interleaved so background load hits them alike. 0 means even ``lo`` failed. Keyed by
    series: the server's name for perfdhcp, ``server~light`` for the light client."""
    steps: list[Step] = []
    pairs = [(server, client) for client in loads for server in servers]
    # (highest known ok, lowest known failing), by series
    bounds = {series_name(*p): (lo // grid - 1, hi // grid + 1) for p in pairs}
    while any(b[1] - b[0] > 1 for b in bounds.values()):
        for server, client in pairs:
            good, bad = bounds[series_name(server, client)]
            if bad - good <= 1:
                continue
            mid = (good + bad) // 2
            step = measure(server, mid * grid, clients, period, work, client)
            steps.append(step)
            bounds[step.series] = (mid, bad) if step.ok else (good, mid)
    return steps, {s: max(0, b[0] * grid) for s, b in bounds.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--rates", default="250,500,1000,2000")
    ap.add_argument("--period", type=int, default=45, help="upper bound in seconds for one step")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--servers", default="bootd,kea,dnsmasq")
    ap.add_argument("--capacity", metavar="LO,HI",
                    help=f"instead of --rates: search each server's capacity (highest offered rate on a grid of "
                         f"--grid with 0 drops and average delay under {MAX_DELAY_MS:g} ms) between LO and HI")
    ap.add_argument("--grid", type=int, default=250)
    ap.add_argument("--load", default="perfdhcp",
                    help="load clients, comma-separated: perfdhcp (Kea's), light (bench/dhcp/dora.c, built with gcc: "
                         "a few system calls per message, for when perfdhcp's own CPU is the ceiling)")
    args = ap.parse_args()
    loads = tuple(dict.fromkeys(args.load.split(",")))
    if not set(loads) <= {"perfdhcp", "light"}:
        raise SystemExit(f"unknown load client in {args.load!r}: choose from perfdhcp, light")
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    servers = args.servers.split(",")
    binaries = {"bootd": "", "kea": "kea-dhcp4", "dnsmasq": "dnsmasq", "dnsmasq-ro": "dnsmasq", "floor": "",
                "floor-mem": "", "floor-reg": ""}
    for server in servers:
        if server.startswith("bootd@") and (Path(server[6:]) / "bootd" / "__init__.py").is_file():
            binaries[server] = ""
        elif server not in binaries:
            raise SystemExit(f"unknown server {server!r}: choose from {', '.join(binaries)}")
    for tool in ("ip", *("gcc" if x == "light" else x for x in loads), *(binaries[s] for s in servers if binaries[s])):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (tools/setup.sh installs it)")
    for server in servers:  # which build of bootd each runs: the figures differ by a third
        if server == "bootd" or server.startswith("bootd@"):
            tree = Path(server[6:]).resolve() if "@" in server else ROOT
            said = subprocess.run([sys.executable, "-c", "import bootd; print(getattr(bootd, 'COMPILED', False))"],
                                  cwd=tree, capture_output=True, text=True, check=False).stdout.strip()
            how = {"True": "compiled (tools/compile.py)", "False": "interpreted (its sources)"}.get(said, "unknown")
            print(f"{server}: DHCP path {how}, from {tree}", flush=True)
    steps: list[Step] = []
    tmp = Path(tempfile.mkdtemp(prefix="bd-dhcp-bench-"))  # 0700 (mkdtemp)
    try:
        setup()
        if "light" in loads:
            build_light(tmp)
        if args.capacity:
            lo, hi = (int(x) for x in args.capacity.split(","))
            caps: list[dict[str, int]] = []
            for run in range(args.runs):
                order = servers if run % 2 == 0 else list(reversed(servers))
                print(f"run {run + 1}: capacity search {lo}..{hi}/s on a grid of {args.grid}/s", flush=True)
                found, cap = capacity(order, lo, hi, args.grid, args.clients, args.period, tmp, loads)
                steps += found
                caps.append(cap)
            for client in loads:
                report_capacity(steps, caps, servers, args.clients, client)
            return
        rates = [int(r) for r in args.rates.split(",")]
        for run in range(args.runs):
            for rate in rates:
                # Alternate the order each run so background load does not always favour the same server.
                for server in servers if run % 2 == 0 else list(reversed(servers)):
                    for client in loads:
                        print(f"run {run + 1} ", end="")
                        steps.append(measure(server, rate, args.clients, args.period, tmp, client))
    finally:
        teardown()
        shutil.rmtree(tmp, ignore_errors=True)
    report(steps, [series_name(x, c) for c in loads for x in servers], rates, args.clients)


def report_capacity(steps: list[Step], caps: list[dict[str, int]], servers: list[str], clients: int,
                    client: str = "perfdhcp") -> None:
    def series(server: str) -> str:
        return series_name(server, client)

    print()
    print(f"capacity with {client}: highest offered rate with 0 drops and avg delay < {MAX_DELAY_MS:g} ms, {clients} "
          f"clients, median over {len(caps)} run(s); the client's CPU share over the step there, the server's CPU")
    for server in servers:
        cap = statistics.median(c[series(server)] for c in caps)
        at = [s for s in steps if s.series == series(server) and s.rate == cap and s.ok]
        load = f"{statistics.median(s.client_load() for s in at):.0%}" if at else "-"
        delay = f"{statistics.median(s.delay_ms for s in at):.1f} ms" if at else "-"
        cpu = f"{statistics.median(s.server_cpu for s in at):.1f}" if at else "-"
        print(f"  {server:10s} {cap:6.0f}/s   avg delay there {delay:>9s}   {client} {load:>5s} of a core   "
              f"server {cpu:>4s} cpu-s   runs: {', '.join(str(c[series(server)]) for c in caps)}")
    if "bootd" in servers:
        b = statistics.median(c[series("bootd")] for c in caps)
        for other in servers:
            if other != "bootd":
                o = statistics.median(c[series(other)] for c in caps)
                print(f"  bootd/{other}: {b / o:.2f}x" if o else f"  bootd/{other}: {other} failed at the lowest rate")


def report(steps: list[Step], servers: list[str], rates: list[int], clients: int) -> None:
    def med(server: str, rate: int, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in steps if s.series == server and s.rate == rate))

    print()
    print(f"DORA from perfdhcp (series ~light: the light client), {clients} simulated clients, up to {clients} "
          "exchanges per step; medians over runs")
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
    elif "bootd" in servers and base:
        print("bootd dropped at every offered rate: lower --rates")


if __name__ == "__main__":
    main()
