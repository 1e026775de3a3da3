"""bench/boot: bootd against dnsmasq + nginx on the same boots, in one run.

1. Power-on to ``ready`` for one BIOS QEMU node served by ``bootd serve`` versus the same kernel,
   initramfs, iPXE script and capsule chunks served by dnsmasq (DHCP, TFTP, RA) + nginx (static files),
   alternating runs, medians. Target: bootd / peer <= 1.1.
2. The stage-one agent's fetch + verify + unpack throughput on this host, against bootd over loopback,
   versus ``curl`` fetching the same chunk URLs to /dev/null. Target: agent / curl >= 0.8.

The agent fetches chunks with the compiled bootd-fetch as the stage one does (``--shell-workers``: its
shell fallback). Also printed: the agent's own fetch+verify+unpack step time, and ``zstd -dc | tar`` of
the same chunks already in RAM (the floor for anything that really unpacks).

3. With --root-modes (or --only-root-modes): the Debian capsule in the tmpfs and squashfs root modes side
   by side, image RAM (idle: --idle seconds after ready, from the next heartbeat) and power-on to ready
   (bench/boot/rootmode.py).

Usage: python bench/boot/run.py [--runs 3] [--capsule-mb 64] [--skip-boot] [--skip-agent] [--shell-workers]
       [--root-modes | --only-root-modes [--idle 60]]
Everything runs in a private network namespace or on loopback and is torn down afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.boot.rootmode import IDLE, bench_root_modes
from bench.boot.rootmode import rows as root_mode_rows
from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.dnsmasq import start_reference, write_chain_root
from bootd.lab.netns import LabProcess
from bootd.lab.sample import make_busybox_root
from bootd.lab.serve import BootdServer
from bootd.stage1.build import HERE as STAGE1_SRC
from bootd.stage1.build import build, compile_fetcher

MAC = "52:54:00:77:20:01"
OPENSSL = False
SHELL_WORKERS = False
AGENT_ARGS = ""

NGINX_CONF = """daemon off;
worker_processes 1;
user root;
error_log {work}/nginx.err;
pid {work}/nginx.pid;
events {{ worker_connections 512; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 5;
    default_type application/octet-stream;
    client_body_temp_path {work}/nginx-body;
    server {{
        listen {ip}:{port};
        location /stage1/ {{ alias {stage1}/; }}
        location /boot/ {{ alias {scripts}/; }}
        location ~ "^/capsules/([0-9a-f]{{64}})/manifest$" {{ alias {store}/manifests/$1; }}
        location ~ "^/chunks/(([0-9a-f]{{2}})[0-9a-f]{{62}})$" {{ alias {store}/chunks/$2/$1; }}
        location /api/ {{ return 200 '{{}}'; }}
    }}
}}
"""


def boot_once(lab: Lab, name: str, timeout: float = 180.0) -> float:
    node = QemuNode(lab, name, MAC, firmware="bios").start()
    try:
        return node.wait_for(r"BOOTD-CAPSULE ready", timeout=timeout).t
    finally:
        node.stop()
        for tap in list(lab.taps):  # one tap per boot; drop it so the next boot starts clean
            lab.run(["ip", "link", "del", tap], check=False)
            lab.taps.remove(tap)


def bench_boot(work: Path, runs: int) -> tuple[list[float], list[float], str]:
    s1 = build(work / "stage1", log=lambda m: None)
    root = make_busybox_root(work / "root", filler_bytes=4_000_000)
    bootd_times: list[float] = []
    peer_times: list[float] = []
    with Lab(workdir=work / "lab", prefix="bd-s1b") as lab:
        bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=s1.out_dir)
        bootd.write_config()
        bootd.import_capsule("busybox", root)
        bootd.cli("group", "set", "default", "--capsule", "busybox", check=False)
        if bootd.cli("group", "show", "default", check=False).returncode != 0:
            bootd.cli("group", "add", "default", "--capsule", "busybox")
        bootd.cli("node", "add", "bench0", "--mac", MAC)
        bootd.start()
        mode = bootd.dhcp
        code, script = bootd.http_get(f"/boot/{MAC.replace(':', '-')}.ipxe")
        if code != 200:
            raise SystemExit(f"bootd did not give a boot script for {MAC}: {code} {script[:200]!r}")
        # The peer serves the identical script (same node name, token and capsule version).
        scripts = work / "scripts"
        scripts.mkdir()
        (scripts / f"{MAC.replace(':', '-')}.ipxe").write_bytes(script)
        peer_procs: list[LabProcess] = []

        def start_peer() -> None:
            tftp = write_chain_root(work / "peer-tftp", bootd.base_url)
            conf = work / "nginx.conf"
            conf.write_text(NGINX_CONF.format(work=work, ip=lab.server_ip, port=bootd.http_port,
                                              stage1=s1.out_dir, scripts=scripts, store=work / "state/capsules"))
            (work / "nginx-body").mkdir(exist_ok=True)
            nginx = lab.spawn("nginx", ["nginx", "-c", str(conf), "-p", str(work)])
            lab.wait_listening(bootd.http_port, proc=nginx)
            dns = start_reference(lab, http_base=bootd.base_url, tftp_root=tftp,
                                  ipxe_boot=f"tftp://{lab.server_ip}/chain.ipxe")
            lab.wait_listening(67, proto="udp", proc=dns)
            peer_procs[:] = [nginx, dns]

        def stop_peer() -> None:
            for p in peer_procs:
                p.stop()
            peer_procs.clear()
            time.sleep(0.3)

        for i in range(runs):
            if bootd.proc is None:
                bootd.start()
            t = boot_once(lab, f"bootd{i}")
            bootd_times.append(t)
            print(f"  run {i + 1}: bootd {t:.2f}s", flush=True)
            bootd.stop()
            if bootd.ra is not None and mode == "bootd":
                bootd.ra.stop()
                bootd.ra = None
            if bootd.dnsmasq is not None:
                bootd.dnsmasq.stop()
                bootd.dnsmasq = None
            start_peer()
            t = boot_once(lab, f"peer{i}")
            peer_times.append(t)
            print(f"  run {i + 1}: dnsmasq+nginx {t:.2f}s", flush=True)
            stop_peer()
    return bootd_times, peer_times, mode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Link:
    """Two private namespaces joined by a veth pair, the server's side shaped to ``mbit`` with tbf.

    Loopback makes a bare download nearly free, so it measures the agent's CPU cost, not whether
    the agent keeps up with a node's network. Over a shaped link both sides are limited by the wire,
    as on a cluster's 1 or 10 GbE. Nothing here touches a host interface; the namespaces are deleted
    on exit.
    """

    def __init__(self, mbit: int) -> None:
        self.mbit = mbit
        tag = f"{os.getpid() % 100000}"
        self.srv, self.cli = f"bd-blink-s{tag}", f"bd-blink-c{tag}"
        self.server_ip, self.client_ip = "10.78.0.1", "10.78.0.2"

    def __enter__(self) -> Link:
        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

        ip("netns", "add", self.srv)
        try:
            ip("netns", "add", self.cli)
            ip("-n", self.srv, "link", "add", "vs", "type", "veth", "peer", "name", "vc", "netns", self.cli)
            for ns, dev, addr in ((self.srv, "vs", self.server_ip), (self.cli, "vc", self.client_ip)):
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
            # The data flows server -> client: shape the server's egress. The burst must hold a
            # whole GSO segment (64 KiB) or tbf drops it.
            subprocess.run(["ip", "netns", "exec", self.srv, "tc", "qdisc", "add", "dev", "vs", "root", "tbf",
                            "rate", f"{self.mbit}mbit", "burst", "1mb", "latency", "50ms"],
                           check=True, capture_output=True, timeout=30)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.cli, self.srv):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)

    def server(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.srv, *cmd]

    def client(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.cli, *cmd]


def bench_agent(work: Path, capsule_mb: int, runs: int, link: Link | None = None) -> dict[str, list[float]]:
    """Agent vs curl against a bootd serve (HTTP only): over loopback, or over a shaped ``link``."""
    on_server = link.server if link else (lambda c: c)
    on_client = link.client if link else (lambda c: c)
    host = link.server_ip if link else "127.0.0.1"
    root = make_busybox_root(work / "aroot")
    # Half incompressible, half text-like data, so zstd and tar do real work.
    half = capsule_mb * 1024 * 1024 // 2
    (root / "root/random.bin").write_bytes(hashlib.shake_256(b"agent-bench").digest(half))
    line = b"bootd stage one agent throughput benchmark line with some repetition 0123456789\n"
    (root / "root/text.txt").write_bytes(line * (half // len(line)))
    state = work / "astate"
    port = free_port()
    conf = state / "bootd.toml"
    state.mkdir(parents=True)
    conf.write_text(
        f'[server]\nstate_dir = "{state}"\naddress = "{host}"\ngraceful_timeout = 1.0\n'
        f'[dhcp]\nenabled = false\n[tftp]\nenabled = false\n'
        f'[http]\nenabled = true\nlisten = "{host}"\nport = {port}\n'
        f'[boot]\nstage1_dir = "{work / "stage1"}"\n[capsule]\ndir = "{state / "capsules"}"\n'
    )
    py = [sys.executable, "-m", "bootd", "-c", str(conf)]
    subprocess.run([*py, "capsule", "import", "big", str(root)], check=True, capture_output=True)
    subprocess.run([*py, "node", "add", "agentbench", "--mac", "52:54:00:77:20:99", "--capsule", "big"], check=True,
                   capture_output=True)
    vid = (state / "capsules/refs/big").read_text().strip()
    manifest = (state / "capsules/manifests" / vid).read_bytes()
    (meta_len,) = struct.unpack(">I", manifest[8:12])
    off = 12 + meta_len
    (count,) = struct.unpack(">I", manifest[off : off + 4])
    recs = [manifest[off + 4 + 40 * i : off + 44 + 40 * i] for i in range(count)]
    hashes = [r[:32].hex() for r in recs]
    stored = sum(struct.unpack(">I", r[32:36])[0] for r in recs)
    log = (work / "abootd.log").open("wb")
    server = subprocess.Popen(on_server([*py, "serve"]), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if subprocess.run(on_client(["curl", "-s", "-o", "/dev/null", f"http://{host}:{port}/healthz"]),
                              check=False).returncode == 0:
                break
            time.sleep(0.1)
        base = f"http://{host}:{port}"
        # The node's credential comes from its iPXE script, as on a real boot (this server runs no DHCP,
        # so it asks no evidence).
        script = subprocess.run(on_client(["curl", "-sf", f"{base}/boot/52-54-00-77-20-99.ipxe"]), check=True,
                                capture_output=True, text=True).stdout
        found = re.search(r"bootd\.token=(\w+)", script)
        if found is None:
            raise SystemExit(f"bench: no credential in the iPXE script: {script!r}")
        token = found.group(1)
        cmdline = work / "cmdline"
        cmdline.write_text(f"bootd.url={base} bootd.node=agentbench bootd.capsule={vid} bootd.token={token} "
                           f"bootd.mac=52:54:00:77:20:99 {AGENT_ARGS}\n")
        urls = work / "urls.txt"
        urls.write_text("".join(f"url = \"{base}/chunks/{h}\"\noutput = \"/dev/null\"\n" for h in hashes))
        files = work / "files.txt"
        files.write_text("".join(f"url = \"{base}/chunks/{h}\"\noutput = \"/dev/shm/bench-chunks/{i:06d}\"\n"
                                 for i, h in enumerate(hashes)))
        fetcher = compile_fetcher(work / "bootd-fetch")  # the stage one's /usr/bin/bootd-fetch
        agent_t: list[float] = []
        curl_t: list[float] = []
        plain_t: list[float] = []
        phase_t: list[float] = []
        unpack_t: list[float] = []
        for _ in range(runs):
            target = Path(tempfile.mkdtemp(prefix="agent-target-", dir="/dev/shm"))
            # Chunks go through bootd-fetch, as in the stage one; `--shell-workers` measures the agent's
            # fallback (busybox hashing, or openssl with `--openssl` as in a --with-openssl image).
            env = dict(os.environ, BOOTD_HOST_MODE="1", BOOTD_CMDLINE_FILE=str(cmdline),
                       BOOTD_WORK=str(work / "awork"), BOOTD_TARGET=str(target),
                       BOOTD_FETCH="/nonexistent" if SHELL_WORKERS else str(fetcher),
                       BOOTD_OPENSSL="/usr/bin/openssl" if OPENSSL else "/nonexistent")
            t0 = time.monotonic()
            res = subprocess.run(on_client(["busybox", "sh", str(STAGE1_SRC / "agent.sh")]), env=env,
                                 capture_output=True, text=True, check=False)
            agent_t.append(time.monotonic() - t0)
            shutil.rmtree(target, ignore_errors=True)
            if res.returncode != 0:
                raise SystemExit(f"agent failed: {res.stderr[-2000:]}")
            phase = re.search(r"BOOTD-STAGE1 verified .* seconds=([0-9.]+)", res.stderr)
            if phase:  # the fetch + verify + unpack step alone, as the agent timed it
                phase_t.append(float(phase.group(1)))
            print("  agent: " + " | ".join(ln for ln in res.stderr.splitlines() if "verified" in ln or "booted" in ln))
            t0 = time.monotonic()
            subprocess.run(on_client(["curl", "-s", "-f", "-K", str(urls)]), check=True)
            curl_t.append(time.monotonic() - t0)
            # The same job without the agent's safety net of retries/reports: curl to files, sha256sum,
            # then zstd | tar. It shows what the verify + unpack work itself costs on this CPU.
            target = Path(tempfile.mkdtemp(prefix="plain-target-", dir="/dev/shm"))
            Path("/dev/shm/bench-chunks").mkdir(exist_ok=True)
            t0 = time.monotonic()
            subprocess.run(on_client(["curl", "-s", "-f", "-K", str(files)]), check=True)
            subprocess.run("sha256sum /dev/shm/bench-chunks/* > /dev/null && cat /dev/shm/bench-chunks/* | "
                           f"zstd -dcq | tar -C {target} -xf -", shell=True, check=True)
            plain_t.append(time.monotonic() - t0)
            # The floor for any agent that really unpacks: zstd | tar of the chunks already in RAM.
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            t0 = time.monotonic()
            subprocess.run(f"cat /dev/shm/bench-chunks/* | zstd -dcq | tar -C {target} -xf -", shell=True, check=True)
            unpack_t.append(time.monotonic() - t0)
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree("/dev/shm/bench-chunks", ignore_errors=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
    return {"agent": agent_t, "curl": curl_t, "plain": plain_t, "phase": phase_t, "unpack": unpack_t,
            "stored": [float(stored)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--capsule-mb", type=int, default=64)
    ap.add_argument("--skip-boot", action="store_true")
    ap.add_argument("--skip-agent", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--shell-workers", action="store_true",
                    help="agent without bootd-fetch (its shell fallback: wget + hash + mv per chunk)")
    ap.add_argument("--agent-args", default="", help='extra kernel command line words, e.g. "bootd.workers=2"')
    ap.add_argument("--link-mbit", type=int, default=0,
                    help="agent bench over a veth between two private namespaces shaped to this rate "
                         "(e.g. 1000 or 10000) instead of loopback")
    ap.add_argument("--openssl", action="store_true",
                    help="with --shell-workers: hash with openssl (stage1 --with-openssl)")
    ap.add_argument("--root-modes", action="store_true",
                    help="also boot the Debian capsule (capsules/debian-hpc) in the tmpfs and squashfs root modes, "
                         "side by side: image RAM and power-on to ready (bench/boot/rootmode.py)")
    ap.add_argument("--only-root-modes", action="store_true", help="only the root-mode comparison")
    ap.add_argument("--idle", type=float, default=IDLE,
                    help=f"root modes: seconds a node sits idle after ready before its image RAM is taken from "
                         f"the next heartbeat (default {IDLE:.0f})")
    args = ap.parse_args()
    if args.only_root_modes:
        args.root_modes = args.skip_boot = args.skip_agent = True
    global OPENSSL, SHELL_WORKERS, AGENT_ARGS
    AGENT_ARGS = args.agent_args
    OPENSSL = args.openssl
    SHELL_WORKERS = args.shell_workers
    work = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    rows: list[tuple[str, str, str, str, str]] = []
    try:
        if not args.skip_boot:
            reason = lab_available() or qemu_available("bios")
            if reason:
                print(f"boot bench skipped: {reason}")
            else:
                print(f"power-on to ready, BIOS iPXE node, {args.runs} runs each (alternating):", flush=True)
                b, p, mode = bench_boot(work, args.runs)
                mb, mp = statistics.median(b), statistics.median(p)
                rows.append((f"power-on -> ready (s), bootd DHCP={mode}", f"{mb:.2f}", f"{mp:.2f}",
                             f"{mb / mp:.2f}", "<= 1.10"))
        if not args.skip_agent:
            if not (work / "stage1").exists():
                (work / "stage1").mkdir()
            where = f"a veth shaped to {args.link_mbit} Mbit/s" if args.link_mbit else "loopback"
            print(f"agent fetch+verify+unpack vs curl, {args.capsule_mb} MB capsule, {where}:", flush=True)
            if args.link_mbit:
                with Link(args.link_mbit) as link:
                    t = bench_agent(work, args.capsule_mb, args.runs, link)
            else:
                t = bench_agent(work, args.capsule_mb, args.runs)
            stored = t["stored"][0]
            rate = {k: stored / statistics.median(v) / 1e6 for k, v in t.items() if v and k != "stored"}
            print(f"  stored bytes {stored:.0f}; " + "; ".join(
                f"{k} {[f'{x:.3f}' for x in v]}" for k, v in t.items() if k != "stored"))
            ta, tc = rate["agent"], rate["curl"]
            rows.append(("agent throughput (MB/s stored) vs curl", f"{ta:.1f}", f"{tc:.1f}", f"{ta / tc:.2f}",
                         ">= 0.80"))
            rows.append(("agent vs curl+sha256sum+zstd|tar (MB/s)", f"{ta:.1f}", f"{rate['plain']:.1f}",
                         f"{ta / rate['plain']:.2f}", "-"))
            if "phase" in rate:
                rows.append(("agent fetch+verify+unpack step vs curl", f"{rate['phase']:.1f}", f"{tc:.1f}",
                             f"{rate['phase'] / tc:.2f}", "-"))
            rows.append(("agent vs zstd|tar alone, chunks in RAM", f"{ta:.1f}", f"{rate['unpack']:.1f}",
                         f"{ta / rate['unpack']:.2f}", "-"))
        if args.root_modes:
            reason = lab_available() or qemu_available("bios")
            if reason:
                print(f"root-mode bench skipped: {reason}")
            else:
                print(f"Debian capsule, tmpfs vs squashfs root mode, {args.runs} runs each (alternating):",
                      flush=True)
                results = bench_root_modes(work, args.runs, idle=args.idle)
                for mode, got in results.items():
                    print(f"  {mode}: ready {[f'{x:.1f}' for x in got['ready']]} s, image RAM idle "
                          f"{[f'{x:.1f}' for x in got['image_mib']]} MiB, at ready "
                          f"{[f'{x:.1f}' for x in got['ready_image_mib']]} MiB")
                rows.extend(root_mode_rows(results))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"{'measure':52} {'bootd':>10} {'peer':>16} {'ratio':>7} {'target':>8}")
    for r in rows:
        print(f"{r[0]:52} {r[1]:>10} {r[2]:>16} {r[3]:>7} {r[4]:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
