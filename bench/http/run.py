"""Chunk streaming: bootd vs nginx on the same chunk files, same client (wrk), same run.

    .venv/bin/python bench/http/run.py [--seconds 4] [--reps 3] [--clients 1,8,64] [--mib 64]
                                       [--chunk-avg-kib 1024] [--no-pin] [--plain] [--compare-tree DIR]

Imports one capsule (random-ish data, ~MIB MiB, FastCDC chunks of ~1 MiB, zstd) into a temporary
store, starts bootd's HTTP server (one process, asyncio) and nginx (Debian package; worker_processes 1,
sendfile on, tcp_nopush on, open_file_cache, access_log off; stopped through its PID file) on loopback
ports, and drives both with wrk cycling over every chunk URL, interleaving the runs.  By default the
servers are pinned to CPU 0 and wrk to CPU 1.  For each client count it prints the median GB/s and the
server's CPU seconds per GB (utime+stime from /proc/<pid>/stat; for nginx master + worker), the ratios,
and how noisy the machine was (load average, timeouts, runs that completed nothing).
Targets: throughput >= 1.0x nginx at 8 and 64 clients, CPU/GB <= 1.5x nginx.
With ``--compare-tree DIR`` (another checkout of bootd, e.g. a worktree of main) a second bootd runs
from DIR on the same store, in the same rounds, and the table compares the two ("new" is this tree,
"old" is DIR), with nginx's column beside both: a change must not regress against its base.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bootd.capsule.chunker import ChunkParams  # noqa: E402
from bootd.capsule.importer import ImportOptions, import_capsule  # noqa: E402
from bootd.capsule.objects import CapsuleStore  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")

WRK_LUA = r"""
local paths = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do paths[#paths + 1] = line end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
  i = math.random(#paths)
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"bytes": %d, "requests": %d, "duration_us": %d, "errors": %d, "bad_status": %d, ' ..
    '"p50_us": %d, "p99_us": %d}\n',
    summary.bytes, summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  open_file_cache max=4096 inactive=60s;
  open_file_cache_valid 60s;
  types {{ }}
  default_type application/octet-stream;
  client_body_temp_path {work}/nginx-tmp;
  proxy_temp_path {work}/nginx-tmp;
  fastcgi_temp_path {work}/nginx-tmp;
  uwsgi_temp_path {work}/nginx-tmp;
  scgi_temp_path {work}/nginx-tmp;
  server {{
    listen 127.0.0.1:{port} reuseport;
    root {root};
    location /chunks/ {{
      add_header Cache-Control "public, max-age=31536000, immutable";
    }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / TICK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def make_capsule(work: Path, mib: int, chunk_avg_kib: int = 1024) -> tuple[CapsuleStore, list[str]]:
    """A tree of random-ish data (3/4 incompressible, 1/4 text-like) imported as one capsule."""
    tree = work / "tree"
    (tree / "boot").mkdir(parents=True)
    rng = random.Random(42)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(2000)]
    for i in range(mib // 4):
        path = tree / f"d{i % 8}" / f"f{i:04d}.bin"
        path.parent.mkdir(exist_ok=True)
        if i % 4 == 3:
            data = b" ".join(rng.choices(words, k=4 * 1024 * 1024 // 6))[: 4 * 1024 * 1024]
        else:
            data = rng.randbytes(4 * 1024 * 1024)
        path.write_bytes(data)
    store = CapsuleStore(work / "capsules")
    avg = chunk_avg_kib * 1024
    params = ChunkParams(min_size=min(avg // 4, 1 << 20), avg_size=avg, max_size=avg * 4)
    res = import_capsule(store, "bench", tree, options=ImportOptions(chunk=params, durable=False))
    shutil.rmtree(tree)
    hashes = sorted({c.sha256 for c in store.load_manifest(res.version).chunks})
    return store, hashes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    pidfile: Path | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        if self.pidfile is not None and self.pidfile.exists():
            pid = int(self.pidfile.read_text().split()[0])
            if pid == self.proc.pid:
                os.kill(pid, signal.SIGQUIT)
        elif self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


PIN: dict[str, set[int]] = {}


def _pin(role: str) -> None:
    cpus = PIN.get(role)
    if cpus:
        os.sched_setaffinity(0, cpus)


def start_bootd(work: Path, store: CapsuleStore, plain: bool = False, tree: Path = ROOT, name: str = "bootd") -> Server:
    """bootd's HTTP server from the checkout ``tree`` (its own serve_bootd.py and bootd package)."""
    port = free_port()
    log = (work / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(tree / "bench/http/serve_bootd.py"), str(store.root), str(work / f"state-{name}"),
         str(port), *(["plain"] if plain else [])],
        stdout=subprocess.PIPE, stderr=log, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
        preexec_fn=lambda: _pin("server"),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("READY"):
        raise RuntimeError(f"{name} did not start: {line!r}; see {work / f'{name}.log'}")
    return Server(name, proc, port)


def start_nginx(work: Path, store: CapsuleStore) -> Server:
    port = free_port()
    (work / "nginx-tmp").mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, root=store.root))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work), "-e", str(work / "nginx-error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: _pin("server"))
    wait_port(port)
    return Server("nginx", proc, port, work / "nginx.pid")


def run_wrk(work: Path, server: Server, paths_file: Path, clients: int, seconds: float) -> dict[str, float] | None:
    """One wrk run; None when it completed no request at all (a stalled machine, see the load average)."""
    threads = 1 if clients == 1 or PIN else 2
    cmd = ["wrk", "-t", str(threads), "-c", str(clients), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(work / "cycle.lua"), f"http://127.0.0.1:{server.port}", "--", str(paths_file)]
    pids = server.pids()
    cpu0 = cpu_seconds(pids)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True,
                         preexec_fn=lambda: _pin("client")).stdout
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = cpu_seconds(pids)
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[7:])
    if r["bad_status"]:
        raise RuntimeError(f"{server.name}: wrk got non-2xx answers: {r}\n{out}")
    if not r["bytes"]:
        return None
    gbytes = r["bytes"] / 1e9
    return {
        "timeouts": r["errors"],
        "gbps": gbytes / (r["duration_us"] / 1e6),
        "cpu_per_gb": (cpu1 - cpu0) / gbytes,
        # The client's side of the same transfer: on loopback the kernel work of a TCP stream is
        # split between sender and receiver, and how the server writes moves it (see README).
        "client_cpu_per_gb": (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / gbytes,
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p99_ms": r["p99_us"] / 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--mib", type=int, default=64, help="size of the imported tree")
    ap.add_argument("--chunk-avg-kib", type=int, default=1024,
                    help="capsule chunker average (min = avg/4, max = 4*avg); bootd's default is 1024")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--plain", action="store_true",
                    help="bootd without its inline-sendfile/TCP_CORK fast path (loop.sendfile only), for A/B")
    ap.add_argument("--compare-tree", type=Path, metavar="DIR",
                    help="also run bootd from this checkout (e.g. a worktree of main) and compare new vs old")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the server to CPU 0 and wrk to CPU 1 (pinning keeps the two from "
                         "competing for one core, which otherwise decides the result more than the server)")
    args = ap.parse_args()
    if args.compare_tree is not None and not (args.compare_tree / "bench/http/serve_bootd.py").is_file():
        sys.exit(f"--compare-tree {args.compare_tree}: no bench/http/serve_bootd.py there (not a bootd checkout)")
    if not args.no_pin and (os.cpu_count() or 1) >= 2:
        PIN.update(server={0}, client={1})
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="bd-http-bench-"))
    work.chmod(0o755)  # nginx workers run as www-data/nobody when started as root
    servers: list[Server] = []
    try:
        t0 = time.monotonic()
        load_at_start = f"{os.getloadavg()[0]:.2f}"
        store, hashes = make_capsule(work, args.mib, args.chunk_avg_kib)
        sizes = [store.chunk_path(h).stat().st_size for h in hashes]
        print(f"capsule: {len(hashes)} chunks, {sum(sizes) / 2**20:.1f} MiB stored, "
              f"median chunk {statistics.median(sizes) / 2**20:.2f} MiB (import {time.monotonic() - t0:.1f} s)")
        (work / "cycle.lua").write_text(WRK_LUA)
        bootd_paths = work / "bootd-paths.txt"
        bootd_paths.write_text("".join(f"/chunks/{h}\n" for h in hashes))
        nginx_paths = work / "nginx-paths.txt"
        nginx_paths.write_text("".join(f"/chunks/{h[:2]}/{h}\n" for h in hashes))
        bootd = start_bootd(work, store, args.plain)
        servers.append(bootd)
        old: Server | None = None
        if args.compare_tree is not None:
            old = start_bootd(work, store, args.plain, args.compare_tree.resolve(), "old")
            servers.append(old)
        nginx = start_nginx(work, store)
        servers.append(nginx)
        # Warm the page cache and both open-file caches: every object once from each server.
        rounds = [(bootd, bootd_paths), *([(old, bootd_paths)] if old else []), (nginx, nginx_paths)]
        for srv, pf in rounds:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            for path in pf.read_text().split():
                conn.request("GET", path)
                resp = conn.getresponse()
                if resp.status != 200 or not resp.read():
                    raise RuntimeError(f"{srv.name}: GET {path} -> {resp.status}")
            conn.close()
        h = hashes[0]
        got = {
            srv.name: hashlib.sha256(subprocess.run(
                ["curl", "-sS", f"http://127.0.0.1:{srv.port}{p}"], capture_output=True, check=True).stdout
            ).hexdigest()
            for srv, p in ((bootd, f"/chunks/{h}"), *([(old, f"/chunks/{h}")] if old else []),
                           (nginx, f"/chunks/{h[:2]}/{h}"))
        }
        assert set(got.values()) == {h}, got
        print(f"nginx {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}, "
              f"worker_processes 1; {args.reps} x {args.seconds:g} s per cell, medians; "
              + ("servers pinned to CPU 0, wrk -t1 pinned to CPU 1" if PIN else
                 f"wrk -t1 (1 client) / -t2 (more), {os.cpu_count()} CPUs shared by client and server"))
        if old is not None:
            compare(work, rounds, args, bootd_paths, nginx_paths)
            return
        header = (f"{'clients':>7} | {'bootd GB/s':>10} {'nginx GB/s':>10} {'ratio':>6} | "
                  f"{'bootd cpu s/GB':>14} {'nginx cpu s/GB':>14} {'ratio':>6} | "
                  f"{'bootd p99 ms':>12} {'nginx p99 ms':>12} | {'wrk cpu s/GB bootd/nginx':>24}")
        print(header)
        print("-" * len(header))
        for clients in (int(c) for c in args.clients.split(",")):
            res: dict[str, list[dict[str, float]]] = {"bootd": [], "nginx": []}
            empty = {"bootd": 0, "nginx": 0}
            for _ in range(args.reps):  # interleaved so drift affects both alike
                for srv, pf in ((bootd, bootd_paths), (nginx, nginx_paths)):
                    sample = run_wrk(work, srv, pf, clients, args.seconds)
                    if sample is None:
                        empty[srv.name] += 1
                    else:
                        res[srv.name].append(sample)
            if not res["bootd"] or not res["nginx"]:
                print(f"{clients:>7} | no complete run (empty runs: {empty}); the machine is too busy")
                continue
            med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in res.items()}
            noise = [f"{k}: {sum(int(r['timeouts']) for r in v)} timeouts, {empty[k]} empty runs"
                     for k, v in res.items() if empty[k] or any(r["timeouts"] for r in v)]
            b, n = med["bootd"], med["nginx"]
            print(f"{clients:>7} | {b['gbps']:>10.2f} {n['gbps']:>10.2f} {b['gbps'] / n['gbps']:>5.2f}x | "
                  f"{b['cpu_per_gb']:>14.3f} {n['cpu_per_gb']:>14.3f} {b['cpu_per_gb'] / n['cpu_per_gb']:>5.2f}x | "
                  f"{b['p99_ms']:>12.1f} {n['p99_ms']:>12.1f} | "
                  f"{b['client_cpu_per_gb']:>11.3f} / {n['client_cpu_per_gb']:<10.3f}"
                  + (f"   ({'; '.join(noise)})" if noise else ""),
                  flush=True)
        print(f"load average during the run: {load_at_start} -> {os.getloadavg()[0]:.2f} "
              "(other work on this machine shows up as noise in both columns)")
    finally:
        for srv in servers:
            srv.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def compare(work: Path, rounds: list[tuple[Server, Path]], args: argparse.Namespace, bootd_paths: Path,
            nginx_paths: Path) -> None:
    """New (this tree) vs old (--compare-tree) bootd, with nginx beside both, all in the same rounds."""
    print(f"new: {ROOT}  old: {args.compare_tree}")
    header = (f"{'clients':>7} | {'new GB/s':>8} {'old GB/s':>8} {'new/old':>7} | {'nginx GB/s':>10} "
              f"{'new/nginx':>9} {'old/nginx':>9} | {'cpu s/GB new':>12} {'old':>6} {'nginx':>6}")
    print(header)
    print("-" * len(header))
    for clients in (int(c) for c in args.clients.split(",")):
        res: dict[str, list[dict[str, float]]] = {srv.name: [] for srv, _ in rounds}
        empty = dict.fromkeys(res, 0)
        for i in range(args.reps):  # interleaved, and the order rotates, so drift affects all alike
            for srv, pf in rounds[i % len(rounds):] + rounds[:i % len(rounds)]:
                sample = run_wrk(work, srv, pf, clients, args.seconds)
                if sample is None:
                    empty[srv.name] += 1
                else:
                    res[srv.name].append(sample)
        if not all(res.values()):
            print(f"{clients:>7} | no complete run (empty runs: {empty}); the machine is too busy")
            continue
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in res.items()}
        noise = [f"{k}: {sum(int(r['timeouts']) for r in v)} timeouts, {empty[k]} empty runs"
                 for k, v in res.items() if empty[k] or any(r["timeouts"] for r in v)]
        b, o, n = med["bootd"], med["old"], med["nginx"]
        print(f"{clients:>7} | {b['gbps']:>8.2f} {o['gbps']:>8.2f} {b['gbps'] / o['gbps']:>6.3f}x | "
              f"{n['gbps']:>10.2f} {b['gbps'] / n['gbps']:>8.2f}x {o['gbps'] / n['gbps']:>8.2f}x | "
              f"{b['cpu_per_gb']:>12.3f} {o['cpu_per_gb']:>6.3f} {n['cpu_per_gb']:>6.3f}"
              + (f"   ({'; '.join(noise)})" if noise else ""), flush=True)
        print("        runs GB/s: " + "; ".join(
            f"{k} " + " ".join(f"{r['gbps']:.2f}" for r in v) for k, v in res.items()), flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (other work on this machine is noise in every column)")


if __name__ == "__main__":
    main()
