"""Several `bootd serve` processes on one bridge, the storm client on the same segment.

    srv-a:eth0 10.78.0.1 ──┐
    srv-b:eth0 10.78.0.3 ──┼── lan:br0 ── cli:eth0 10.78.0.2 (storm.py: every simulated node)

Used by run.py's --modes (one server on SQLite, one on PostgreSQL, two on PostgreSQL) and by the failover
drill (tests/integration/test_failover_drill.py).  Each server is its own namespace, so a SIGKILL of one
(by PID) is a crashed machine; the survivor takes its RFC 3074 share after takeover_after.  Every
namespace is deleted afterwards, with anything still running in it (ours by construction).  The segment
is run.py's /20 (POOL_SIZE addresses), so several storms can share one registry (the drill's runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.storm.run import CLIENT_IP, NETMASK, POOL_END, POOL_START, PREFIX, sh

ROOT = Path(__file__).resolve().parents[2]
ADDRESSES = {"a": "10.78.0.1", "b": "10.78.0.3"}
TAKEOVER = 3.0
CLIENT_NICE = -10  # the storm client's scheduling priority (see Segment.storm)


@dataclass
class Server:
    ident: str
    ns: str
    address: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}:8080"


@dataclass
class Segment:
    """The namespaces and servers of one run; ``servers`` by id (a, b)."""

    workdir: Path
    tag: str
    lan: str
    client_ns: str
    servers: dict[str, Server] = field(default_factory=dict)

    def add_server(self, ident: str, store_url: str = "", password: str = "", upstream: str = "",
                   sources: tuple[str, ...] = (), stage1_dir: Path | None = None) -> Server:
        """A namespace joined to the bridge and a config for it (not started: see start); ``stage1_dir``
        (a built stage one) for real nodes, which the simulated ones do without."""
        address = ADDRESSES[ident]
        ns = f"bd-cl-{self.tag}-{ident}"
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.lan, "link", "add", f"p{ident}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.lan, "link", "set", f"p{ident}", "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        state = self.workdir / f"state-{ident}"
        state.mkdir(mode=0o700)
        store = ""
        if store_url:
            secret = self.workdir / "db-password"
            secret.write_text(password + "\n")
            secret.chmod(0o600)
            store = f'[store]\nurl = "{store_url}"\npassword_file = "{secret}"\n'
        boot = "[boot]\n" + (f"sources = {json.dumps(list(sources))}\n" if sources else "") + (
            f'stage1_dir = "{stage1_dir}"\nkernel_args = "console=ttyS0 quiet panic=-1"\n' if stage1_dir is not None
            else "")
        text = f"""
[server]
state_dir = "{state}"
address = "{address}"
interface = "eth0"
graceful_timeout = 3
log_level = "info"

{store}
[cluster]
id = "{ident}"
heartbeat = 0.5
takeover_after = {TAKEOVER}

[registry]
# The simulated nodes share one source address: lease evidence cannot be checked (test_credentials does).
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
listen = "{address}"
# The simulated nodes share one source address, where a real rack has one per node: the per-source bounds
# (a defence against one host) would throttle the whole storm to 8 transfers, as if every node sat behind
# one NAT. Per-source up to the global bound here; over HTTP the storm's address is trusted (below).
max_sessions_per_source = 1000

[http]
listen = "{address}"
trusted = ["{CLIENT_IP}/32"]
port = 8080
max_bulk_streams = 64
bulk_queue = 4096

{boot}
[capsule]
chunk_min = 16384
chunk_avg = 65536
chunk_max = 262144
{f'upstream = "http://{ADDRESSES[upstream]}:8080"' if upstream else ""}
"""
        config = self.workdir / f"bootd-{ident}.toml"
        config.write_text(text)
        server = Server(ident, ns, address, config, self.workdir / f"bootd-{ident}.log")
        self.servers[ident] = server
        return server

    def cli(self, ident: str, *args: str) -> str:
        server = self.servers[ident]
        cmd = ["ip", "netns", "exec", server.ns, sys.executable, "-m", "bootd", "-c", str(server.config), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"bootd {' '.join(args)} on {ident} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self, ident: str, timeout: float = 60.0) -> Server:
        server = self.servers[ident]
        with server.log.open("ab") as log:
            server.proc = subprocess.Popen(["ip", "netns", "exec", server.ns, sys.executable, "-m", "bootd", "-c",
                                            str(server.config), "serve"], cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"bootd {ident} exited early ({server.proc.returncode}):\n"
                                   + server.log.read_text()[-3000:])
            if self.healthy(ident):
                return server
            time.sleep(0.2)
        self.kill(ident)
        raise RuntimeError(f"bootd {ident} did not answer /healthz within {timeout:g} s:\n"
                           + server.log.read_text()[-3000:])

    def healthy(self, ident: str) -> bool:
        server = self.servers[ident]
        probe = subprocess.run(["ip", "netns", "exec", server.ns, "curl", "-sf", "-o", "/dev/null", "-m", "5",
                                f"{server.url}/healthz"], timeout=20, check=False)
        return probe.returncode == 0

    def kill(self, ident: str) -> None:
        """SIGKILL by PID (`ip netns exec` exec()s python: the same process is bootd)."""
        proc = self.servers[ident].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)

    def stop(self, ident: str) -> None:
        proc = self.servers[ident].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def wait_live(self, ident: str, want: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until `bootd server list` shows exactly ``want`` alive, plus one heartbeat for each view."""
        deadline = time.monotonic() + timeout
        views: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            views = json.loads(self.cli(ident, "server", "list", "--json"))
            if {v["id"] for v in views if v["alive"]} == want:
                time.sleep(1.5)  # each server refreshes its own view on its heartbeat timer
                return views
            time.sleep(0.5)
        raise RuntimeError(f"live servers never became {sorted(want)}: {views}")

    def storm(self, nodes: int, deadline: float, first_index: int = 0, heartbeat: float = 0.0, linger: float = 0.0,
              ) -> subprocess.Popen[bytes]:
        """The storm client in the client namespace (results as JSON on its stdout: see collect); with
        ``heartbeat``, ready nodes heartbeat every so many seconds, as the agent does, until ``linger`` s
        after the last node finished."""
        first = next(iter(self.servers.values()))
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.client_ns, sys.executable, str(ROOT / "bench" / "storm" / "run.py"),
             "--client", "--follow", "--nodes", str(nodes), "--first-index", str(first_index), "--server",
             first.address, "--interface", "eth0", "--deadline", str(deadline), "--heartbeat", str(heartbeat),
             "--linger", str(linger)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The client stands for every node's own CPU, which no server shares on a real cluster. On this machine it
        # shares the cores with the servers and PostgreSQL, and with one server it already needs most of a core
        # (2,000 nodes: 33.6 CPU-s in a 34.9 s storm), so a storm's time is the simulator's ceiling, and with two
        # servers the simulator starved of CPU: scheduling, not serving. It runs first; the servers get what it
        # leaves, in every mode alike (ip netns exec execs the client, so the pid is the client's).
        with contextlib.suppress(OSError):  # not root: every process at the same priority, as before
            os.setpriority(os.PRIO_PROCESS, client.pid, CLIENT_NICE)
        return client


def collect(client: subprocess.Popen[bytes], timeout: float) -> tuple[list[dict[str, Any]], float]:
    """The storm client's results and duration; raises with its stderr if it failed."""
    try:
        out, err = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
        raise
    if client.returncode != 0:
        raise RuntimeError(f"storm client failed ({client.returncode}):\n{err.decode()[-3000:]}")
    data = json.loads(out)
    return list(data["results"]), float(data["duration"])


@contextlib.contextmanager
def segment(workdir: Path) -> Iterator[Segment]:
    tag = f"{os.getpid() % 100000}{random.randrange(100)}"
    seg = Segment(workdir, tag, f"bd-cl-{tag}-lan", f"bd-cl-{tag}-cli")
    try:
        for ns in (seg.lan, seg.client_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", seg.lan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", seg.lan, "link", "set", "br0", "up")
        sh("ip", "-n", seg.lan, "link", "add", "pc", "type", "veth", "peer", "name", "eth0", "netns", seg.client_ns)
        sh("ip", "-n", seg.lan, "link", "set", "pc", "master", "br0", "up")
        sh("ip", "-n", seg.client_ns, "addr", "add", f"{CLIENT_IP}/{PREFIX}", "dev", "eth0")
        sh("ip", "-n", seg.client_ns, "link", "set", "eth0", "up")
        # Simulated nodes broadcast DHCP from 0.0.0.0 and all share one address afterwards.
        sh("ip", "-n", seg.client_ns, "route", "add", "255.255.255.255/32", "dev", "eth0", check=False)
        yield seg
    finally:
        for ident in list(seg.servers):
            with contextlib.suppress(Exception):
                seg.stop(ident)
        namespaces = [seg.client_ns, *(s.ns for s in seg.servers.values()), seg.lan]
        for ns in namespaces:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
