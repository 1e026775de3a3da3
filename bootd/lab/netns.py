"""A private network for real boots: one network namespace, one bridge, one tap per virtual machine.

Everything a test, a benchmark or ``bootd demo`` starts lives inside the namespace, so no DHCP offer ever
leaves it and the host's interfaces are never touched. Teardown is the point of this module: every
process started through a :class:`Lab` is killed by its pid (never by name), any other process still
inside the namespace is ours by construction and is killed too, and the namespace is deleted, which takes
the bridge and the taps with it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bootd.errors import BootdError

_counter = itertools.count()


class LabError(BootdError):
    """The lab could not be set up (missing root, tool or kernel feature); the message says which."""


def _run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie counts as dead (PID 1 here does not reap promptly, pitfall 12)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the parenthesised command name, which itself may contain spaces or parentheses.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def kill_pid(pid: int, *, grace: float = 3.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL: only ever for a pid this lab started."""
    if pid <= 1 or not process_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and process_alive(pid):
        time.sleep(0.05)


def lab_available() -> str | None:
    """Why a lab cannot run here, or None when it can (tests turn the reason into a skip)."""
    if os.geteuid() != 0:
        return "network lab needs root (ip netns, taps)"
    if not Path("/dev/net/tun").exists():
        return "network lab needs /dev/net/tun for QEMU taps"
    for tool in ("ip",):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "/usr/sbin:/usr/bin").split(":")):
            return f"network lab needs the '{tool}' command (iproute2)"
    return None


@dataclass
class LabProcess:
    """A process started inside the namespace; ``log`` receives its stdout and stderr."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    pidfile: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None and process_alive(self.pid)

    def stop(self, grace: float = 3.0) -> int | None:
        """Stop it by pid and reap it, so no zombie outlives the lab."""
        kill_pid(self.pid, grace=grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.pidfile is not None:
            with contextlib.suppress(FileNotFoundError):
                other = int(self.pidfile.read_text().strip() or "0")
                if other and other != self.pid:
                    kill_pid(other, grace=grace)
        return self.popen.returncode

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Lab:
    """One namespace with a bridge on a private /24; use as a context manager so teardown always runs.

    ``prefix`` should name the area (tests use ``bd-s1``) so that helpers working on the same machine never
    collide; the pid and a counter complete the name.
    """

    workdir: Path
    prefix: str = "bd-s1"
    subnet: int = 0
    bridge: str = "br0"
    ipv6_ra: bool = True
    name: str = ""
    processes: list[LabProcess] = field(default_factory=list)
    taps: list[str] = field(default_factory=list)
    _created: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"{self.prefix}-{os.getpid()}-{next(_counter)}"
        if not 0 <= self.subnet <= 255:
            raise LabError(f"subnet index must be 0..255 (10.77.<index>.0/24), got {self.subnet}")
        self.workdir = Path(self.workdir)

    # Addressing -------------------------------------------------------------------------------------
    @property
    def server_ip(self) -> str:
        """The bridge's address: where bootd (or a stand-in) listens and what nodes use to reach it."""
        return f"10.77.{self.subnet}.1"

    @property
    def netmask(self) -> str:
        return "255.255.255.0"

    def host_ip(self, index: int) -> str:
        return f"10.77.{self.subnet}.{index}"

    @property
    def server_ip6(self) -> str:
        return f"fd77:{self.subnet:x}::1"

    # Lifecycle --------------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        reason = lab_available()
        if reason:
            raise LabError(reason)
        reap_stale(self.prefix)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            ns = ["ip", "-n", self.name]
            _run([*ns, "link", "set", "lo", "up"])
            # A bridge with STP off forwards from the first frame, so firmware DHCP is not delayed.
            _run([*ns, "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            _run([*ns, "addr", "add", f"{self.server_ip}/24", "dev", self.bridge])
            if self.ipv6_ra:
                _run([*ns, "addr", "add", f"{self.server_ip6}/64", "dev", self.bridge, "nodad"])
            _run([*ns, "link", "set", self.bridge, "up"])
        except BaseException:
            self.down()
            raise

    def add_tap(self, name: str | None = None) -> str:
        """A persistent tap on the bridge; QEMU attaches to it by name with script=no."""
        tap = name or f"tap{len(self.taps)}"
        ns = ["ip", "-n", self.name]
        _run([*ns, "tuntap", "add", "dev", tap, "mode", "tap"])
        self.taps.append(tap)
        _run([*ns, "link", "set", tap, "master", self.bridge])
        _run([*ns, "link", "set", tap, "up"])
        return tap

    def add_veth(self, name: str, address: str | None = None) -> str:
        """A veth pair whose one end is on the bridge and the other ``name`` in the namespace.

        Useful when a peer must own an address of its own on the lab network (a second server).
        """
        peer = f"{name}-br"[:15]
        ns = ["ip", "-n", self.name]
        _run([*ns, "link", "add", name, "type", "veth", "peer", "name", peer])
        _run([*ns, "link", "set", peer, "master", self.bridge])
        _run([*ns, "link", "set", peer, "up"])
        if address:
            _run([*ns, "addr", "add", address, "dev", name])
        _run([*ns, "link", "set", name, "up"])
        return name

    def ns_cmd(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace and wait for it."""
        proc = subprocess.run(
            self.ns_cmd(cmd), capture_output=True, text=True, timeout=timeout, check=False,
            env=dict(env) if env is not None else None,
        )
        if check and proc.returncode != 0:
            raise LabError(f"in {self.name}: {' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pidfile: Path | None = None,
    ) -> LabProcess:
        """Start a long-running process inside the namespace; the lab stops it on teardown."""
        log = self.workdir / f"{name}.log"
        fh = log.open("ab")
        try:
            popen = subprocess.Popen(
                self.ns_cmd(cmd), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            )
        finally:
            fh.close()
        proc = LabProcess(name=name, popen=popen, log=log, pidfile=pidfile)
        self.processes.append(proc)
        (self.workdir / f"{name}.pid").write_text(f"{popen.pid}\n")
        return proc

    def wait_listening(self, port: int, *, proto: str = "tcp", timeout: float = 15.0,
                       proc: LabProcess | None = None) -> None:
        """Block until something in the namespace listens on ``port``; fail early if ``proc`` died."""
        flag = "-ltnH" if proto == "tcp" else "-lunH"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["ss", flag], check=False).stdout
            for line in out.splitlines():
                cols = line.split()
                if len(cols) >= 4 and cols[3].rsplit(":", 1)[-1] == str(port):
                    return
            if proc is not None and not proc.alive():
                raise LabError(f"{proc.name} exited before listening on {proto}/{port}:\n{proc.log_text()[-3000:]}")
            time.sleep(0.1)
        raise LabError(f"nothing listens on {proto}/{port} in {self.name} after {timeout:.0f}s")

    def pids(self) -> list[int]:
        """Processes inside the namespace: all of them were started by this lab."""
        proc = _run(["ip", "netns", "pids", self.name], check=False)
        return [int(p) for p in proc.stdout.split() if p.isdigit()]

    def down(self) -> None:
        """Stop everything and delete the namespace; safe to call twice and after a failed ``up``."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()
        self.processes.clear()
        if not self._created:
            return
        for pid in self.pids():
            kill_pid(pid, grace=1.0)
        for _ in range(20):
            res = _run(["ip", "netns", "del", self.name], check=False)
            if res.returncode == 0 or self.name not in list_namespaces():
                break
            time.sleep(0.25)
        self._created = False


def list_namespaces() -> list[str]:
    """Exact namespace names (``grep -w`` would also match longer names sharing a prefix, pitfall 16)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def reap_stale(prefix: str) -> list[str]:
    """Delete ``<prefix>-<pid>-<n>`` namespaces whose creating process is gone (a run that was SIGKILLed
    could not tear down). Namespaces of live processes, and any other name, are never touched."""
    removed = []
    rx = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+$")
    for name in list_namespaces():
        m = rx.match(name)
        if not m or process_alive(int(m.group(1))):
            continue
        out = _run(["ip", "netns", "pids", name], check=False).stdout
        for pid in (int(p) for p in out.split() if p.isdigit()):
            kill_pid(pid, grace=1.0)
        if _run(["ip", "netns", "del", name], check=False).returncode == 0:
            removed.append(name)
    return removed


@contextlib.contextmanager
def lab(workdir: Path, **kwargs: object) -> Iterator[Lab]:
    """``with lab(tmp_path) as net:`` for callers that prefer a function."""
    net = Lab(workdir=workdir, **kwargs)  # type: ignore[arg-type]
    with net:
        yield net
