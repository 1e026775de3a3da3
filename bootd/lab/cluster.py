"""``make cluster``: the seed's end state on one machine, three Debian nodes running MPI.

Builds (or reuses) the ``debian-hpc`` capsule, runs ``bootd serve`` in a private network namespace, powers
on QEMU nodes at once, follows them to ``ready``, then logs in from the master as an ordinary user and
runs ``mpirun`` across the nodes over ssh, as a person would on a real cluster. Nothing on this host is
changed: the lab user exists only in the lab's own passwd and group files, which bootd reads as the
master's accounts (``overlay.passwd`` and ``overlay.group``, the ``users`` overlay's source).

What reaches the nodes comes from bootd's overlays: the user and its home (``users``), /etc/hosts with
every node (``hosts``), root's key (``authorized-keys``, from the lab key in ``overlay.authorized_keys``),
each node's own ssh host keys (``ssh-host-keys``), and the lab user's key pair and authorized_keys, which
no shipped overlay carries, in a secret site overlay of the lab's own (``cluster-ssh``). The master checks
each node's host key against the one bootd made for it (``node-identity``), so a node that did not get
its overlay is refused rather than trusted on first use.

Two caches make the second run fast: the package cache of ``bootd capsule build`` (``BOOTD_BUILD_CACHE``,
the .debs and apt lists), and the built capsule itself, kept in a capsule store under
``~/.cache/bootd/cluster`` together with the sha256 of the recipe directory it was built from; an
unchanged recipe is not built again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from bootd.lab.demo import Out, follow, node_timelines, print_timelines
from bootd.lab.netns import Lab, LabError, lab_available
from bootd.lab.qemu import QemuError, QemuNode, qemu_available
from bootd.lab.sample import REPO_ROOT
from bootd.lab.serve import BootdServer
from bootd.overlay import RUNTIME_OVERLAYS, SYSTEM_OVERLAYS
from bootd.stage1.build import Stage1Error, build, default_cache_dir

RECIPE = REPO_ROOT / "capsules" / "debian-hpc" / "recipe.toml"
CAPSULE = "debian-hpc"
USER = "mpi"
UID = 20001  # inside overlay.uid_min..uid_max (the default 1000..59999), so the users overlay syncs it
SSH_OVERLAY = "cluster-ssh"
OVERLAYS = (*SYSTEM_OVERLAYS, *RUNTIME_OVERLAYS, SSH_OVERLAY)
# The lab's nodes are virtio QEMU machines: the cloud kernel boots them about 2x faster under TCG than the
# generic one (README, bench/boot/kernels.py), and it has every driver they need.
LAB_KERNEL = "linux-image-cloud-amd64"
MEMORY_MB = 1024  # the capsule unpacks into a tmpfs: about 300 MB of it, plus systemd and sshd
HEARTBEAT = 10
_RANK = re.compile(r"^mpi-hello: rank (\d+) of (\d+) on (\S+)$")


class ClusterError(LabError):
    """A step of the cluster run failed; the message says which, and what the node or tool answered."""


def cluster_cache() -> Path:
    """Where the built capsule is kept between runs: ``$BOOTD_CLUSTER_CACHE`` or ~/.cache/bootd/cluster."""
    env = os.environ.get("BOOTD_CLUSTER_CACHE")
    return Path(env) if env else default_cache_dir() / "cluster"


def package_cache() -> Path:
    """``bootd capsule build``'s package cache, shared with the capsule build tests (``BOOTD_BUILD_CACHE``)."""
    return Path(os.environ.get("BOOTD_BUILD_CACHE", "/var/tmp/bootd-build-cache"))


def recipe_key(recipe: Path) -> str:
    """The sha256 of everything the build reads from the recipe's directory (the recipe and its files)."""
    h = hashlib.sha256()
    base = recipe.parent
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = path.relative_to(base).as_posix().encode()
        h.update(len(rel).to_bytes(4, "big") + rel)
        data = path.read_bytes()
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per cache (``make cluster`` beside a test run): the second waits, then reuses."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_capsule(bootd: BootdServer, say: Out, log: Path, *, recipe: Path = RECIPE, name: str = CAPSULE,
                   timeout: float = 1800.0) -> tuple[str, bool]:
    """The capsule's version id, built from ``recipe`` unless the store already holds a build of the
    same recipe bytes; and whether it was reused. The store is ``capsule.dir`` of ``bootd``'s configuration
    (the cluster cache); the stamp beside it says which recipe made the current version. The build's
    whole output goes to ``log``."""
    store = Path(str(bootd.config()["capsule"]["dir"]))
    stamp = store.parent / f"{name}.recipe"
    key = recipe_key(recipe)
    with _locked(store.parent / f".{name}.lock"):
        ref = store / "refs" / name
        if stamp.exists() and ref.exists():
            built_key, _, built_vid = stamp.read_text().strip().partition(" ")
            if built_key == key and ref.read_text().strip() == built_vid:
                return built_vid, True
        cache = bootd.config()["capsule"].get("build_cache", "capsule.build_cache's default")
        say(f"building capsule {name} from {recipe} (package cache: {cache})")
        cmd = [bootd.python, "-m", "bootd", "-c", str(bootd.config_path), "capsule", "build", name,
               "--recipe", str(recipe)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        tail: list[str] = []
        deadline = time.monotonic() + timeout
        summary = False
        assert proc.stdout is not None
        with log.open("w") as fh:
            for line in proc.stdout:
                fh.write(line)
                line = line.rstrip()
                tail = [*tail[-30:], line]
                # mmdebstrap's own lines (I:, W:, E:) and bootd's steps are the progress; apt's and dpkg's
                # thousand lines go to the log only.
                summary = summary or line.startswith("built ")
                if summary or line.startswith(("bootd", "I: ", "W: ", "E: ")):
                    say(f"  build: {line}")
                if time.monotonic() > deadline:
                    proc.kill()
                    break
        if proc.wait() != 0:
            raise ClusterError(f"bootd capsule build {name} failed (exit {proc.returncode}; all of it in {log}):\n"
                               + "\n".join(tail))
        vid = bootd.capsule_vid(name)
        tmp = stamp.with_name(f".{stamp.name}.tmp")
        tmp.write_text(f"{key} {vid}\n")
        tmp.replace(stamp)
        return vid, False


def _mac(i: int) -> str:
    return f"52:54:00:77:20:{i + 1:02x}"


@dataclass
class NodeInfo:
    name: str
    ip: str
    mac: str


@dataclass
class Cluster:
    """A lab with bootd serving the Debian capsule to ``nodes`` QEMU machines; a context manager."""

    work: Path
    stage1_dir: Path
    nodes: int = 3
    memory_mb: int = MEMORY_MB
    heartbeat: int = HEARTBEAT
    root: str = "tmpfs"  # the nodes' root mode (boot.root): tmpfs or squashfs
    cache: Path = field(default_factory=cluster_cache)
    recipe: Path = RECIPE
    say: Out = print
    lab: Lab | None = None
    bootd: BootdServer | None = None
    machines: list[QemuNode] = field(default_factory=list)
    capsule_vid: str = ""
    capsule_reused: bool = False
    powered_on: float = 0.0
    ready_seconds: float = 0.0
    hosts: dict[str, NodeInfo] = field(default_factory=dict)

    @property
    def ssh_dir(self) -> Path:
        return self.work / "ssh"

    @property
    def ssh_config(self) -> Path:
        return self.ssh_dir / "config"

    # Setup --------------------------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            if self.bootd is None:
                self.prepare()
            self.start()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def prepare(self) -> None:
        """Everything before the namespace exists: config, lab accounts and keys, the capsule (long)."""
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        lab = self.lab = Lab(workdir=self.work / "lab", prefix="bd-cl")
        accounts = self._write_accounts()
        self._write_keys()
        self.bootd = BootdServer(
            lab, state_dir=self.work / "state", stage1_dir=self.stage1_dir,
            overrides={
                "capsule": {"dir": str(self.cache / "capsules"), "build_cache": str(package_cache())},
                "overlay": {"authorized_keys": str(self.ssh_dir / "authorized_keys"), "passwd": str(accounts[0]),
                            "group": str(accounts[1])},
                # Three TCG nodes share two cores: between switch_root and the agent's first report, systemd
                # start-up took over 60 s here under load, and a heartbeat may be late by many seconds.
                "registry": {"stale_after": 300.0, "dead_after": 900.0},
            })
        self.bootd.write_config()
        self.capsule_vid, self.capsule_reused = ensure_capsule(self.bootd, self.say, self.work / "capsule-build.log",
                                                                 recipe=self.recipe)
        self.say(f"capsule {CAPSULE} {self.capsule_vid[:16]}… "
                 f"({'reused: same recipe as the cached build' if self.capsule_reused else 'built'})")

    def _write_accounts(self) -> tuple[Path, Path]:
        """The lab master's passwd and group (overlay.passwd, overlay.group): the lab user, and root."""
        d = self.work / "accounts"
        d.mkdir(exist_ok=True)
        passwd, group = d / "passwd", d / "group"
        passwd.write_text("root:x:0:0:root:/root:/bin/sh\n"
                          f"{USER}:x:{UID}:{UID}:bootd cluster lab user:/home/{USER}:/bin/bash\n")
        group.write_text(f"root:x:0:\n{USER}:x:{UID}:{USER}\n")
        return passwd, group

    def _write_keys(self) -> None:
        """The lab key pair: the master logs in with it, and the nodes use it between themselves (mpirun)."""
        self.ssh_dir.mkdir(exist_ok=True, mode=0o700)
        key = self.ssh_dir / "id_ed25519"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{USER}@bootd-cluster",
                            "-f", str(key)], check=True, capture_output=True, timeout=30)
        public = key.with_name("id_ed25519.pub").read_text()
        (self.ssh_dir / "authorized_keys").write_text(public)
        # The site overlay that puts the pair into the user's home on every node (secret: a private key).
        ov = self.work / "overlay" / SSH_OVERLAY
        home = ov / "files" / "home" / USER / ".ssh"
        home.mkdir(parents=True, exist_ok=True)
        (home / "id_ed25519").write_text(key.read_text())
        (home / "id_ed25519.pub").write_text(public)
        (home / "authorized_keys").write_text(public)
        meta = {
            "kind": "runtime",
            "secret": True,
            "description": f"make cluster: {USER}'s ssh key pair and authorized_keys (ssh between nodes for mpirun)",
            "defaults": {"mode": "0600", "owner": UID, "group": UID},
            "files": {f"home/{USER}/.ssh/id_ed25519.pub": {"mode": "0644"}},
            "directories": [{"path": f"home/{USER}/.ssh", "mode": "0700", "owner": UID, "group": UID}],
        }
        (ov / "overlay.json").write_text(json.dumps(meta, indent=2) + "\n")

    def start(self) -> None:
        """The namespace, bootd with the capsule and overlays assigned to the default group, then power-on."""
        assert self.lab is not None and self.bootd is not None
        lab, bootd = self.lab, self.bootd
        lab.up()
        self.say(f"network namespace {lab.name}: bridge {lab.bridge} {lab.server_ip}/24")
        bootd.cli("overlay", "import", SSH_OVERLAY, str(self.work / "overlay" / SSH_OVERLAY))
        # The node agent refreshes runtime overlays (hosts, users, keys) every BOOTD_OVERLAY_INTERVAL: at the
        # heartbeat's pace here, so a node that got its address late is in every /etc/hosts soon.
        bootd.cli("group", "set", "default", "--capsule", CAPSULE, "--var", f"BOOTD_HEARTBEAT={self.heartbeat}",
                  "--var", f"BOOTD_OVERLAY_INTERVAL={self.heartbeat}", "--var", f"boot.root={self.root}",
                  *[arg for name in OVERLAYS for arg in ("--overlay", name)])
        bootd.start()
        self.say(f"bootd serve running in the namespace ({bootd.base_url}); overlays {', '.join(OVERLAYS)}")
        self.machines = [QemuNode(lab, f"vm{i}", _mac(i), memory_mb=self.memory_mb) for i in range(self.nodes)]
        self.powered_on = time.monotonic()
        for m in self.machines:
            m.start()
        self.say(f"powered on {self.nodes} QEMU nodes at once ({self.memory_mb} MiB, 1 vCPU, TCG): "
                 + ", ".join(f"{m.name} {m.mac}" for m in self.machines))

    def wait_ready(self, timeout: float) -> bool:
        """Follow every node to ``ready`` (one line per state change); then learn names and addresses."""
        assert self.bootd is not None
        ok = follow(self.bootd, self.machines, timeout, self.say, console=False)
        self.ready_seconds = time.monotonic() - self.powered_on
        by_mac = {m.mac for m in self.machines}
        self.hosts = {str(n["name"]): NodeInfo(str(n["name"]), str(n.get("ip") or ""), str(n["mac"]))
                      for n in self.bootd.nodes() if n.get("mac") in by_mac}
        if ok:
            self._write_ssh_config()
        return ok

    # ssh from the master ---------------------------------------------------------------------------
    def _write_ssh_config(self) -> None:
        """Host entries with each node's address, and known_hosts from the host keys bootd made for it."""
        assert self.bootd is not None
        known, blocks, unknown = [], [], []
        for info in self.hosts.values():
            pub = self.bootd.state_dir / "node-identity" / info.mac.replace(":", "-") / "ssh_host_ed25519_key.pub"
            if pub.exists():
                kind, key = pub.read_text().split()[:2]
                known.append(f"{info.name},{info.ip} {kind} {key}")
                check = "yes"
            else:  # the node never fetched its system overlay: no key of bootd's to check against
                unknown.append(info.name)
                check = "accept-new"
            blocks.append(f"Host {info.name}\n    HostName {info.ip}\n    StrictHostKeyChecking {check}\n")
        if unknown:
            self.say(f"note: bootd made no host key for {', '.join(unknown)}: accepting theirs on first use")
        (self.ssh_dir / "known_hosts").write_text("".join(f"{line}\n" for line in known))
        self.ssh_config.write_text(
            "# make cluster: the lab's nodes, reached from the lab namespace (ip netns exec NS ssh -F THIS ...)\n"
            + "\n".join(blocks)
            + f"\nHost *\n    User {USER}\n    IdentityFile {self.ssh_dir / 'id_ed25519'}\n    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.ssh_dir / 'known_hosts'}\n    HostKeyAlgorithms ssh-ed25519\n"
            # The lab's own link only: sntrup761's key exchange cost an emulated node 3 s of each login here.
            "    KexAlgorithms curve25519-sha256\n"
            "    BatchMode yes\n    ConnectTimeout 20\n    LogLevel ERROR\n")

    def ssh(self, host: str, command: str, *, user: str = USER, timeout: float = 120.0
            ) -> subprocess.CompletedProcess[str]:
        """``command`` run on ``host`` (a node name) as ``user``, from the master (the lab namespace)."""
        assert self.lab is not None
        return self.lab.run(["ssh", "-F", str(self.ssh_config), "-l", user, host, command], check=False,
                            timeout=timeout)

    def wait_logins(self, timeout: float = 600.0) -> dict[str, float]:
        """Seconds after ``ready`` until the lab user could log in to each node and every node name
        resolved there (the users, cluster-ssh and hosts overlays at work); all nodes asked at once, again
        every few seconds for those that failed (a refresh of the runtime overlays may still be due)."""
        names = sorted(self.hosts)
        probe = f"getent hosts {' '.join(names)} | wc -l"
        start = time.monotonic()
        done: dict[str, float] = {}
        answers: dict[str, tuple[int, str]] = {}
        while True:
            answers = self.fanout(probe, [n for n in names if n not in done])
            for name, (rc, text) in answers.items():
                if rc == 0 and text == str(len(names)):
                    done[name] = time.monotonic() - start
                    self.say(f"{name}: {USER} logs in with the lab key, every node name resolves "
                             f"(+{done[name]:.1f}s after ready)")
            if len(done) == len(names):
                return done
            if time.monotonic() - start > timeout:
                raise ClusterError(f"no login as the lab user within {timeout:.0f}s: "
                                   + "; ".join(f"{n}: {text[-300:]}" for n, (_, text) in answers.items()
                                               if n not in done))
            time.sleep(3)

    def fanout(self, command: str = "hostname", names: list[str] | None = None,
               timeout: float = 300.0) -> dict[str, tuple[int, str]]:
        """pdsh-style: ``command`` on every node (or ``names``) by name, as the lab user, all at once;
        each node's exit status and output (stdout and stderr)."""
        assert self.lab is not None
        procs = {name: subprocess.Popen(self.lab.ns_cmd(["ssh", "-F", str(self.ssh_config), name, command]),
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                 for name in (sorted(self.hosts) if names is None else names)}
        out = {}
        deadline = time.monotonic() + timeout
        for name, proc in procs.items():
            try:
                text, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                text, _ = proc.communicate()
                text += f" (timed out after {timeout:.0f} s)"
            out[name] = (proc.returncode, text.strip())
        return out

    def mpirun(self, program: str = "mpi-hello", timeout: float = 900.0) -> tuple[list[tuple[int, int, str]], float,
                                                                                    str]:
        """``mpirun --host <every node>`` started on the first node as the lab user: the ranks (rank, size,
        node name) sorted by rank, the wall time, and everything it printed."""
        first, names = sorted(self.hosts)[0], ",".join(sorted(self.hosts))
        t0 = time.monotonic()
        res = self.ssh(first, f"mpirun --host {names} {program}", timeout=timeout)
        took = time.monotonic() - t0
        text = (res.stdout + res.stderr).strip()
        if res.returncode != 0:
            raise ClusterError(f"mpirun on {first} failed (exit {res.returncode}):\n{text[-3000:]}")
        ranks = sorted((int(m.group(1)), int(m.group(2)), m.group(3))
                       for m in (_RANK.match(line.strip()) for line in res.stdout.splitlines()) if m)
        return ranks, took, text

    def memory(self) -> dict[str, dict[str, int]]:
        """Per node, MiB: what ``free -m`` says is used, and the node agent's last report (mem_used_kb)."""
        assert self.bootd is not None
        out: dict[str, dict[str, int]] = {}
        for name, (_, text) in self.fanout("free -m").items():
            entry: dict[str, int] = {}
            for line in text.splitlines():
                cols = line.split()
                if cols and cols[0] == "Mem:" and len(cols) >= 3:
                    entry["free_used_mib"], entry["total_mib"] = int(cols[2]), int(cols[1])
            for ev in reversed(self.bootd.events(name)):
                used = _event_field(ev, "mem_used_kb")
                if used:
                    entry["agent_used_mib"] = used // 1024
                    break
            out[name] = entry
        return out

    def timelines(self) -> dict[str, list[tuple[str, float]]]:
        assert self.bootd is not None
        return node_timelines(self.bootd, self.machines)

    def login_hint(self) -> str:
        """The commands a person runs on this host to use the kept cluster."""
        assert self.lab is not None and self.bootd is not None
        names = sorted(self.hosts)
        ssh = f"ip netns exec {self.lab.name} ssh -F {self.ssh_config}"
        return "\n".join([
            f"  {ssh} {names[0]}                # as {USER}; '-l root' for root",
            f"  {ssh} {names[0]} mpirun --host {','.join(names)} mpi-hello",
            f"  {self.bootd.python} -m bootd -c {self.bootd.config_path} node list",
        ])

    def down(self) -> None:
        """Power off every machine and delete the namespace (every process by its pid, then the netns)."""
        for m in self.machines:
            with contextlib.suppress(Exception):
                m.stop()
        if self.lab is not None:
            self.lab.down()


def _event_field(event: dict[str, Any], key: str) -> int:
    """A number the node agent sent with an event: the timeline keeps them as JSON in ``detail``."""
    detail = event.get("detail") or {}
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return 0
    value = detail.get(key) if isinstance(detail, dict) else None
    return int(value) if isinstance(value, int | float) else 0


@dataclass
class ClusterReport:
    ok: bool
    ready_seconds: float = 0.0
    mpi_seconds: float = 0.0
    ranks: list[tuple[int, int, str]] = field(default_factory=list)
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    total_seconds: float = 0.0


def run_cluster(*, nodes: int = 3, workdir: Path | None = None, keep: bool = False, timeout: float = 900.0,
                memory_mb: int = MEMORY_MB, kernel_package: str = LAB_KERNEL, out: Out = print) -> ClusterReport:
    reason = lab_available() or qemu_available("bios")
    if reason:
        raise LabError(f"make cluster cannot run here: {reason}")
    for tool in ("ssh", "ssh-keygen", "mmdebstrap", "unshare"):
        if shutil.which(tool) is None:
            raise LabError(f"make cluster needs {tool} (tools/setup.sh installs it)")
    own_dir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="bootd-cluster-")) if workdir is None else workdir
    t0 = time.monotonic()
    report = ClusterReport(ok=False)

    def say(msg: str) -> None:
        out(f"[{time.monotonic() - t0:6.1f}s] {msg}")

    try:
        say(f"stage one ({kernel_package}) into {work / 'stage1'} (kernel .deb cached in {default_cache_dir()})")
        s1 = build(work / "stage1", kernel_package=kernel_package, log=lambda m: None)
        say(f"stage one ready: kernel {s1.kernel.kver}")
        with Cluster(work=work, stage1_dir=s1.out_dir, nodes=nodes, memory_mb=memory_mb, say=say) as cl:
            if not cl.wait_ready(timeout):
                say(f"FAILED: not every node reached ready within {timeout:.0f}s")
                print_timelines(cl.timelines(), out)
                return report
            report.ready_seconds = cl.ready_seconds
            say(f"all {nodes} nodes ready {cl.ready_seconds:.1f}s after power-on: "
                + ", ".join(f"{i.name} {i.ip}" for i in sorted(cl.hosts.values(), key=lambda i: i.name)))
            cl.wait_logins()
            answers = cl.fanout("hostname")
            for name, (_, text) in answers.items():
                say(f"ssh {name} hostname -> {text}")
            if any(name != text for name, (_, text) in answers.items()):
                raise ClusterError(f"ssh fan-out: a node answered with another name or an error: {answers}")
            first = sorted(cl.hosts)[0]
            say(f"ssh {first} mpirun --host {','.join(sorted(cl.hosts))} mpi-hello   (as {USER})")
            report.ranks, report.mpi_seconds, text = cl.mpirun()
            for line in text.splitlines():
                out(f"    {line}")
            say(f"mpirun: {len(report.ranks)} ranks on {len({r[2] for r in report.ranks})} nodes "
                f"in {report.mpi_seconds:.1f}s")
            report.memory = cl.memory()
            for name, mem in report.memory.items():
                say(f"{name} memory: {mem.get('free_used_mib', '?')} MiB used of {mem.get('total_mib', '?')} "
                    f"(free -m), node agent: {mem.get('agent_used_mib', '?')} MiB")
            print_timelines(cl.timelines(), out)
            report.ok = len({r[2] for r in report.ranks}) == nodes
            if keep:
                out("the cluster stays up; from this host:\n" + cl.login_hint())
                _wait_for_person(out)
            say("tearing down (VMs, bootd, namespace)")
        report.total_seconds = time.monotonic() - t0
        say(f"done in {report.total_seconds:.0f}s" if report.ok else "FAILED: MPI did not run on every node")
        return report
    finally:
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)


def _wait_for_person(out: Out) -> None:
    """Until Enter (on a terminal), Ctrl-C or SIGTERM (both raise KeyboardInterrupt, see main)."""
    try:
        if sys.stdin.isatty():
            out("press Enter (or Ctrl-C) to tear it down")
            sys.stdin.readline()
        else:
            out("send SIGINT or SIGTERM to tear it down")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make cluster", description="Boot QEMU nodes from bootd with the debian-hpc "
                                 "capsule and run MPI across them as an ordinary user.")
    ap.add_argument("-n", "--nodes", type=int, default=3, help="QEMU nodes to boot at once (default 3)")
    ap.add_argument("--keep", action="store_true", help="keep the cluster up after the MPI run, for a person to "
                    "log in (prints how); Enter, Ctrl-C or SIGTERM tears it down")
    ap.add_argument("--workdir", type=Path, help="work here and keep it (logs, consoles, keys); default: a "
                    "temporary directory, removed at the end")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every node to be ready")
    ap.add_argument("--memory", type=int, default=MEMORY_MB, help=f"MiB per node (default {MEMORY_MB})")
    ap.add_argument("--kernel-package", default=LAB_KERNEL, help=f"stage-one kernel (default {LAB_KERNEL})")
    args = ap.parse_args(argv)
    if not 1 <= args.nodes <= 16:
        print("make cluster: --nodes must be 1..16 (each node is one TCG core)", file=sys.stderr)
        return 2
    if args.memory < 768:
        print("make cluster: --memory must be at least 768 MiB (the capsule unpacks into RAM)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM tears down too (the with blocks run), as Ctrl-C does
    try:
        report = run_cluster(nodes=args.nodes, workdir=args.workdir, keep=args.keep, timeout=args.timeout,
                             memory_mb=args.memory, kernel_package=args.kernel_package)
    except (LabError, QemuError, Stage1Error) as exc:
        print(f"make cluster: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make cluster: interrupted; everything was torn down", file=sys.stderr)
        return 130
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

