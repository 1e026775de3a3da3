#!/usr/bin/env python3
"""bootd TFTP vs tftpd-hpa on loopback: same file, same client (atftp), same run.

For every (blksize, windowsize, clients) case, both servers serve the same
file to N concurrent atftp processes, alternating which server goes first in
each repetition; MB/s = N * file size / wall time until the last client exits.
The table shows medians and the ratio bootd / tftpd-hpa.

tftpd-hpa has no windowsize support: atftp asks for it, tftpd-hpa leaves it out
of the OACK and the transfer runs lock-step. That is the comparison the issue
asks for (what a client gets from each server when it asks for a window).

Bounded: each run is killed after --run-timeout seconds and the whole bench
stops starting runs after --budget seconds. Servers are killed by PID.

    .venv/bin/python bench/tftp/run.py [--size-mib 64] [--reps 3] [--budget 900]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HOST = "127.0.0.1"


class CpuMeter:
    """CPU seconds used by a process and all its children, via a cgroup-v1 cpuacct group.

    tftpd-hpa forks one child per transfer and ignores SIGCHLD, so /proc cutime
    never sees them; a cgroup does. On a loaded machine wall-clock MB/s swings a
    lot, CPU per GB much less, so both are printed. Unavailable -> None.
    """

    BASE = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, name: str) -> None:
        self.path: Path | None = self.BASE / f"bd-tftp-bench-{os.getpid()}-{name}"
        try:
            self.path.mkdir()
        except OSError:
            self.path = None

    def add(self, pid: int) -> None:
        if self.path is not None:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:
                self.close()

    def seconds(self) -> float | None:
        if self.path is None:
            return None
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if self.path is None:
            return
        try:
            for pid in (self.path / "cgroup.procs").read_text().split():
                (self.BASE / "cgroup.procs").write_text(pid)
            self.path.rmdir()
        except OSError:
            pass
        self.path = None


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_hpa(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("in.tftpd") or "/usr/sbin/in.tftpd"
    port = free_udp_port()
    # -L: stay in the foreground (listen mode, one forked child per transfer); -s: chroot to root.
    cmd = [exe, "-L", "-a", f"{HOST}:{port}", "-s", str(root)]
    if os.geteuid() == 0:
        cmd[1:1] = ["-u", "nobody"] if _no_tftp_user() else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    if proc.poll() is not None:
        raise SystemExit(f"in.tftpd exited at once with {proc.returncode}: {cmd}")
    return proc, port


def _no_tftp_user() -> bool:
    import pwd

    try:
        pwd.getpwnam("tftp")
        return False
    except KeyError:
        return True


def start_bootd(root: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "serve_bootd.py"), str(root), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"bootd server did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    return proc, int(line)


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    return err.strip().splitlines()[-1] if err.strip() else ""


def run_clients(
    port: int, name: str, blksize: int, windowsize: int, clients: int, timeout: float, verify_to: Path | None
) -> float | None:
    """Start ``clients`` atftp downloads at once; return wall seconds, or None if any failed."""
    procs = []
    t0 = time.perf_counter()
    for i in range(clients):
        out = str(verify_to) if (verify_to is not None and i == 0) else "/dev/null"
        cmd = [
            "atftp",
            "--option",
            f"blksize {blksize}",
            "--option",
            f"windowsize {windowsize}",
            "-g",
            "-r",
            name,
            "-l",
            out,
            HOST,
            str(port),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    ok = True
    deadline = t0 + timeout
    for p in procs:
        try:
            rc = p.wait(max(0.1, deadline - time.perf_counter()))
            ok = ok and rc == 0
        except subprocess.TimeoutExpired:
            ok = False
    elapsed = time.perf_counter() - t0
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    return elapsed if ok else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--blksizes", default="512,1468,8192")
    ap.add_argument("--windows", default="1,16")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--run-timeout", type=float, default=120.0)
    ap.add_argument("--budget", type=float, default=900.0, help="stop starting runs after this many seconds")
    ap.add_argument("--bootd-args", default="", help="extra serve_bootd.py flags, e.g. '--no-gso'")
    args = ap.parse_args()
    if shutil.which("atftp") is None:
        raise SystemExit("atftp is not installed (apt-get install atftp)")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bd-tftp-bench-"))
    tmp.chmod(0o755)  # tftpd-hpa drops privileges before reading
    name = "bench.bin"
    path = tmp / name
    size = args.size_mib << 20
    with path.open("wb") as out:
        for _ in range(args.size_mib):
            out.write(os.urandom(1 << 20))
    path.chmod(0o644)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    verify = Path(tempfile.mkdtemp(prefix="bd-tftp-bench-out-"))

    hpa, hpa_port = start_hpa(tmp)
    bootd, bootd_port = start_bootd(tmp, args.bootd_args.split())
    servers = {"tftpd-hpa": hpa_port, "bootd": bootd_port}
    meters = {"tftpd-hpa": CpuMeter("hpa"), "bootd": CpuMeter("bootd")}
    meters["tftpd-hpa"].add(hpa.pid)
    meters["bootd"].add(bootd.pid)
    rows: list[dict[str, Any]] = []
    skipped = 0
    try:
        cases = [
            (b, w, c)
            for c in map(int, args.clients.split(","))
            for b in map(int, args.blksizes.split(","))
            for w in map(int, args.windows.split(","))
        ]
        for blksize, windowsize, clients in cases:
            res: dict[str, list[float]] = {s: [] for s in servers}
            cpu: dict[str, list[float]] = {s: [] for s in servers}
            fails: dict[str, int] = {s: 0 for s in servers}
            load0 = loadavg()
            for rep in range(args.reps):
                order = list(servers) if rep % 2 == 0 else list(reversed(servers))
                for srv in order:
                    if time.perf_counter() - started > args.budget:
                        skipped += 1
                        continue
                    target = verify / f"{srv}.bin" if rep == 0 else None
                    cpu0 = meters[srv].seconds()
                    dt = run_clients(servers[srv], name, blksize, windowsize, clients, args.run_timeout, target)
                    if target is not None and dt is not None:
                        got = hashlib.sha256(target.read_bytes()).hexdigest()
                        target.unlink()
                        if got != want:
                            print(
                                f"!! {srv} delivered a corrupt file at blksize {blksize} window {windowsize}",
                                file=sys.stderr,
                            )
                            dt = None
                    cpu1 = meters[srv].seconds()
                    if dt is None:
                        fails[srv] += 1
                    else:
                        res[srv].append(clients * size / dt / 1e6)
                        if cpu0 is not None and cpu1 is not None:
                            cpu[srv].append((cpu1 - cpu0) / (clients * size / 1e9))
            med = {s: (statistics.median(v) if v else float("nan")) for s, v in res.items()}
            cpu_med = {s: (statistics.median(v) if v else float("nan")) for s, v in cpu.items()}
            ratio = med["bootd"] / med["tftpd-hpa"] if med["tftpd-hpa"] > 0 else float("nan")
            rows.append(
                {
                    "case": f"{blksize:7d} {windowsize:6d} {clients:7d}",
                    "hpa": med["tftpd-hpa"],
                    "bootd": med["bootd"],
                    "ratio": ratio,
                    "cpu_hpa": cpu_med["tftpd-hpa"],
                    "cpu_bootd": cpu_med["bootd"],
                    "load": f"{load0}-{loadavg()}",
                    "runs": len(res["bootd"]),
                    "fails": fails["bootd"] + fails["tftpd-hpa"],
                }
            )
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        hpa.kill()
        hpa.wait()
        stats = stop(bootd)
        for m in meters.values():
            m.close()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(verify, ignore_errors=True)

    print(
        f"\nTFTP, {args.size_mib} MiB file, loopback, client atftp, medians of {args.reps} runs; "
        f"MB/s = clients x size / wall time; CPU = server CPU seconds per GB served (children included)"
    )
    print(
        f"{'blksize':>7} {'window':>6} {'clients':>7} | {'hpa MB/s':>9} {'bootd MB/s':>10} {'bootd/hpa':>9} | "
        f"{'hpa CPU':>7} {'bootd CPU':>9} | {'load avg':>11} | runs fails"
    )
    for r in rows:
        print(
            f"{r['case']} | {r['hpa']:9.1f} {r['bootd']:10.1f} {r['ratio']:8.2f}x | "
            f"{r['cpu_hpa']:7.2f} {r['cpu_bootd']:9.2f} | {r['load']:>11} | {r['runs']:4d} {r['fails']:5d}"
        )
    if skipped:
        print(f"({skipped} runs skipped: --budget {args.budget:.0f}s reached)")
    print(f"bootd counters: {stats}")
    print(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
