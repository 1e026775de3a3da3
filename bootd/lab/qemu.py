"""Run a QEMU machine that network-boots from the lab bridge, and watch its serial console.

The console is logged raw by QEMU (``-chardev file``) and polled by a thread that stamps every line with
the time since power-on. Raw polling matters: firmware prompts (OVMF's boot manager, the EFI shell) end
without a newline, so a line reader would wait forever on exactly the screens that mean "this boot is
stuck". Those dead-end strings stop the wait at once instead of after the full timeout (notes pitfall 10).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bootd.lab.netns import Lab, LabProcess

OVMF_PATHS = ("/usr/share/ovmf/OVMF.fd", "/usr/share/qemu/OVMF.fd", "/usr/share/OVMF/OVMF_CODE.fd")

# Strings that mean the boot cannot succeed any more; the value explains it to whoever reads the failure.
DEAD_ENDS: dict[str, str] = {
    "No bootable device": "SeaBIOS found nothing to boot",
    "PXE-E18": "EDK2 PXE gave up (no DHCP/boot server answered)",
    "Shell>": "OVMF fell through to the EFI shell",
    "startup.nsh": "OVMF fell through to the EFI shell",
    "Boot Failed. EFI Misc Device": "OVMF found nothing to boot",
    "Kernel panic": "the kernel panicked",
    "No more network devices": "iPXE could not boot from any network device",
}


class QemuError(RuntimeError):
    """The machine did not reach what the caller waited for; the message carries the console tail."""


@dataclass(frozen=True)
class ConsoleLine:
    t: float  # seconds since QEMU start
    text: str


def find_ovmf() -> str | None:
    for candidate in OVMF_PATHS:
        if Path(candidate).exists():
            return candidate
    return None


def qemu_available(firmware: str = "bios") -> str | None:
    """Why this machine cannot run the lab's QEMU nodes, or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 missing (apt-get install qemu-system-x86 ipxe-qemu)"
    if not Path("/usr/lib/ipxe/qemu/efi-virtio.rom").exists():
        return "iPXE option ROMs missing (apt-get install ipxe-qemu)"
    if firmware.startswith("uefi") and find_ovmf() is None:
        return "OVMF missing (apt-get install ovmf)"
    return None


@dataclass
class QemuNode:
    """One virtual machine on its own tap.

    ``firmware`` is ``bios`` (SeaBIOS + iPXE ROM), ``uefi`` (OVMF + iPXE EFI ROM) or ``uefi-pxe`` (OVMF with
    the NIC ROM removed, so EDK2's own PXE client runs and fetches an NBP over TFTP first).
    """

    lab: Lab
    name: str
    mac: str
    firmware: str = "bios"
    memory_mb: int = 512
    nic: str = "virtio-net-pci"
    extra_args: Sequence[str] = ()
    # A QMP socket (``-qmp unix:PATH``) for whoever powers the machine (bootd.lab.bmc); the console file is
    # then appended to, so it keeps every boot of the machine across relaunches, and a guest reboot does
    # not end QEMU (no -no-reboot). Keep the path short
    # (a unix socket path has at most 107 bytes).
    qmp: Path | None = None
    dead_ends: dict[str, str] = field(default_factory=lambda: dict(DEAD_ENDS))
    proc: LabProcess | None = None
    tap: str = ""
    started_at: float = 0.0
    lines: list[ConsoleLine] = field(default_factory=list)
    _raw: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _partial: str = ""

    @property
    def serial_path(self) -> Path:
        return self.lab.workdir / f"{self.name}.serial.raw"

    @property
    def timeline_path(self) -> Path:
        return self.lab.workdir / f"{self.name}.serial.log"

    def command(self) -> list[str]:
        pidfile = self.lab.workdir / f"{self.name}.qemu.pid"
        device = f"{self.nic},netdev=n0,mac={self.mac}"
        cmd = [
            "qemu-system-x86_64", "-name", self.name, "-accel", "tcg", "-m", str(self.memory_mb), "-smp", "1",
            # -nographic makes SeaBIOS and iPXE write to the serial port; the monitor must not share it.
            "-nographic", "-monitor", "none",
            "-chardev", f"file,id=ser0,path={self.serial_path}" + (",append=on" if self.qmp else ""),
            "-serial", "chardev:ser0",
            # Without reboot-timeout=0 + -no-reboot, "No bootable device" would hang forever.  A machine with
            # a BMC (qmp) reboots in place instead, as a board does: SeaBIOS answers a BMC's reset with a
            # reboot of its own, which -no-reboot would turn into power off (a dead end still fails wait_for).
            *(() if self.qmp else ("-no-reboot",)), "-boot", "order=n,reboot-timeout=0",
            "-netdev", f"tap,id=n0,ifname={self.tap},script=no,downscript=no",
            "-pidfile", str(pidfile),
        ]
        if self.qmp is not None:
            cmd += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if self.firmware in ("uefi", "uefi-pxe"):
            ovmf = find_ovmf()
            if ovmf is None:
                raise QemuError("OVMF firmware not found (apt-get install ovmf)")
            cmd += ["-bios", ovmf]
        elif self.firmware != "bios":
            raise QemuError(f"unknown firmware {self.firmware!r}: expected bios, uefi or uefi-pxe")
        if self.firmware == "uefi-pxe":
            device += ",romfile="
        cmd += ["-device", device, *self.extra_args]
        return cmd

    def start(self) -> QemuNode:
        self.watch()
        self.proc = self.lab.spawn(f"{self.name}.qemu", self.command(),
                                   pidfile=self.lab.workdir / f"{self.name}.qemu.pid")
        return self

    def watch(self) -> QemuNode:
        """Make the tap and follow the console, without starting QEMU: for a machine something else
        powers on (a simulated BMC launches :meth:`ns_command`); then ``proc`` stays None."""
        if not self.tap:
            self.tap = self.lab.add_tap()
        self.serial_path.write_bytes(b"")
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._poll, name=f"serial-{self.name}", daemon=True)
        self._thread.start()
        return self

    def ns_command(self) -> list[str]:
        """The command line that runs this machine inside the lab's namespace."""
        if not self.tap:
            self.tap = self.lab.add_tap()
        return self.lab.ns_cmd(self.command())

    # Console polling ------------------------------------------------------------------------------
    def _poll(self) -> None:
        offset = 0
        with self.timeline_path.open("w", encoding="utf-8") as out:
            while True:
                stopping = self._stop.is_set()
                try:
                    with self.serial_path.open("rb") as fh:
                        fh.seek(offset)
                        data = fh.read()
                except FileNotFoundError:
                    data = b""
                if data:
                    offset += len(data)
                    now = time.monotonic() - self.started_at
                    text = data.decode("utf-8", errors="replace")
                    with self._lock:
                        self._raw += text
                        self._partial += text
                        *complete, self._partial = re.split(r"\r\n|\n|\r", self._partial)
                        for raw_line in complete:
                            line = _strip_ansi(raw_line).rstrip()
                            if line:
                                self.lines.append(ConsoleLine(now, line))
                                out.write(f"[{now:7.2f}] {line}\n")
                    out.flush()
                if stopping:
                    return
                time.sleep(0.05)

    def console(self) -> str:
        with self._lock:
            return self._raw

    def tail(self, n: int = 40) -> str:
        with self._lock:
            return "\n".join(f"[{ln.t:7.2f}] {ln.text}" for ln in self.lines[-n:]) + (
                f"\n(partial) {_strip_ansi(self._partial)[-300:]}" if self._partial.strip() else ""
            )

    def first(self, pattern: str, nth: int = 1) -> ConsoleLine | None:
        """The first (or ``nth``) console line matching ``pattern`` (a regex), with its time since power-on."""
        rx = re.compile(pattern)
        with self._lock:
            found = [line for line in self.lines if rx.search(line.text)]
        return found[nth - 1] if len(found) >= nth else None

    def wait_for(self, pattern: str, timeout: float = 120.0, *, ignore_dead_ends: Iterable[str] = (),
                 nth: int = 1) -> ConsoleLine:
        """Wait until a console line matches ``pattern`` (the ``nth`` such line: a later boot of a machine
        that was powered again); fail fast on a dead end or if QEMU exits."""
        rx = re.compile(pattern)
        skip = set(ignore_dead_ends)
        deadline = time.monotonic() + timeout
        while True:
            found = self.first(pattern, nth)
            if found is not None:
                return found
            raw = self.console()
            partial_matches = list(rx.finditer(_strip_ansi(raw)))
            if len(partial_matches) >= nth:  # a prompt without a trailing newline
                return ConsoleLine(time.monotonic() - self.started_at, partial_matches[nth - 1].group(0))
            for needle, why in self.dead_ends.items():
                if needle not in skip and needle in raw:
                    raise QemuError(f"{self.name}: dead end ({why}) while waiting for {pattern!r}\n{self.tail()}")
            if self.proc is not None and not self.proc.alive():
                time.sleep(0.2)  # let the poller read the last bytes
                if self.first(pattern, nth) is not None:
                    return self.first(pattern, nth)  # type: ignore[return-value]
                raise QemuError(
                    f"{self.name}: QEMU exited (code {self.proc.popen.returncode}) before {pattern!r}\n"
                    f"{self.tail()}\n{self.proc.log_text()[-1500:]}"
                )
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: no {pattern!r} within {timeout:.0f}s\n{self.tail()}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float) -> int | None:
        """QEMU's exit code, or None if it still runs after ``timeout``.

        Waits on the child itself: a multi-threaded QEMU shows as a zombie (state Z) while its other
        threads are still exiting, and waitpid() cannot reap it until they have, so "not alive" is no
        proof that an exit code is there yet (CI saw wait_exit return None 0.1 s after the reboot).
        """
        if self.proc is None:
            return None
        try:
            return self.proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace=1.0)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>c]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text).replace("\x00", "")
