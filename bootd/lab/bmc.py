"""A BMC simulator for tests and demos: real IPMI 2.0 (RMCP+, lanplus) on UDP, one port per simulated node.

It is pyghmi's own server class (:class:`pyghmi.ipmi.bmc.Bmc`) with the
machine behind it kept in memory: power state, the next boot device, and an
optional Serial-over-LAN console that echoes what is typed.  ``ipmitool -I
lanplus`` and pyghmi's client both talk to it, so a test can check bootd
against a client written by others.  Every chassis command a BMC receives is
appended to a JSON-lines log (with the wall-clock time it arrived), which is
how tests see what bootd asked for and when (``--stagger``).

It runs as its own process (``python -m bootd.lab.bmc``): pyghmi keeps its
sessions in process-wide state, and a simulator sharing a process with the
client under test would share that state too.  On start it prints one JSON
line, ``{"ports": [...]}``, then serves until killed.

Like real BMCs it refuses ``cycle`` and ``reset`` of a machine that is off
(completion code 0xd5, "not supported in present state").

With ``--qemu SPEC.json`` (one a BMC) the machine behind a BMC is a real QEMU
that the simulator owns, as a BMC owns its board's power: the spec gives the
command line and the QMP socket.  Power on launches that command line, off is
QMP ``quit`` (the cord pulled), soft-off is ``system_powerdown`` (ACPI), reset
is ``system_reset`` and cycle is off, a second, on.  Status is "on" while the
process runs and QMP ``query-status`` does not say it shut down.  Such a
machine reboots in place like a board (the lab leaves out ``-no-reboot`` for
it): with ``-no-reboot`` a reset would end QEMU, since SeaBIOS answers a reset
with a reboot of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyghmi.ipmi import bmc as pyghmi_bmc
from pyghmi.ipmi.private import constants, serversession

NOT_IN_PRESENT_STATE = 0xD5
HMAC_SHA1 = 1
INVALID_AUTH_ALGORITHM = 0x11  # RMCP+ status codes (IPMI 2.0 table 13-15)
UNAUTHORIZED_NAME = 0x0D
SOL_DISABLED = 0x81  # activate payload completion code: "payload type is disabled"


class SimSession(serversession.ServerSession):  # type: ignore[misc]
    """pyghmi's server session, honest about the one cipher suite it speaks (3: HMAC-SHA1, AES).

    pyghmi's server accepts any proposal and then answers in SHA-1, so a client that proposes SHA-256
    first (pyghmi's own, suite 17) fails on a hash of the wrong length.  A real BMC refuses what it
    does not offer; the client then falls back to suite 3 (ipmitool asks for the list and picks 3).
    """

    def create_open_session_response(self, request: bytearray) -> bytearray:
        if len(request) >= 13 and request[12] != HMAC_SHA1:
            self.clientsessionid = request[4:8]
            return bytearray([request[0], INVALID_AUTH_ALGORITHM, 0, 0]) + self.clientsessionid
        response: bytearray = super().create_open_session_response(request)
        return response

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """pyghmi hands a session a packet its client's entry no longer routes; the BMC decides (upstream
        calls this on the session, which has no such method, and the whole server dies)."""
        self.bmc.sessionless_data(data, sockaddr)

    def _got_rakp1(self, data: bytearray) -> None:
        """An unknown user gets RAKP2 status 0x0d (unauthorized name), as from a real BMC, not silence."""
        name = bytes(data[28:]).decode("utf-8", "replace")
        if data[27] and self.authdata.get(name) is None:
            self.send_payload(bytearray([data[0], UNAUTHORIZED_NAME, 0, 0]) + self.clientsessionid,
                              constants.payload_types["rakp2"], retry=False)
            return
        super()._got_rakp1(data)


class QmpError(RuntimeError):
    """QEMU's monitor refused a command or did not answer."""


def qmp_command(path: Path, *commands: tuple[str, dict[str, Any] | None], timeout: float = 5.0) -> list[Any]:
    """Run commands over a fresh QMP connection, in order; each one's ``return`` value.

    A connection per call: QEMU's monitor takes one client at a time, and a power command is rare.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def answer() -> Any:
            while True:  # events (SHUTDOWN, RESET, ...) arrive on the same stream; skip them
                line = reader.readline()
                if not line:
                    raise QmpError(f"QMP {path}: QEMU closed the monitor")
                msg = json.loads(line)
                if "error" in msg:
                    raise QmpError(f"QMP {path}: {msg['error'].get('desc', msg['error'])}")
                if "return" in msg:
                    return msg["return"]

        if "QMP" not in json.loads(reader.readline() or b"{}"):
            raise QmpError(f"QMP {path}: no greeting")
        results = []
        for name, arguments in [("qmp_capabilities", None), *commands]:
            request: dict[str, Any] = {"execute": name}
            if arguments:
                request["arguments"] = arguments
            sock.sendall(json.dumps(request).encode() + b"\n")
            results.append(answer())
        return results[1:]


class QemuMachine:
    """The board behind one BMC: a QEMU process the simulator launches, and its QMP socket."""

    def __init__(self, argv: list[str], qmp: Path, log: Path | None = None) -> None:
        self.argv = argv
        self.qmp = qmp
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.launches = 0

    def running(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            status = qmp_command(self.qmp, ("query-status", None), timeout=2.0)[0]
        except (OSError, QmpError, ValueError):
            return True  # running but its monitor not up yet (just launched) or busy: the board has power
        return str(status.get("status")) not in ("shutdown", "guest-panicked")

    def launch(self) -> int:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.qmp.unlink()  # a stale socket file would make the new QEMU's bind fail
        out = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        finally:
            if not isinstance(out, int):
                out.close()
        self.launches += 1
        return self.proc.pid

    def stop(self, grace: float = 5.0) -> None:
        """Pull the cord: QMP ``quit``, then SIGTERM and SIGKILL by pid if QEMU does not go."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError, QmpError, ValueError):
            qmp_command(self.qmp, ("quit", None), timeout=2.0)
        for how in (None, proc.terminate, proc.kill):
            if how is not None:
                how()
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def powerdown(self) -> None:
        qmp_command(self.qmp, ("system_powerdown", None))

    def reset(self) -> None:
        qmp_command(self.qmp, ("system_reset", None))

    @classmethod
    def from_spec(cls, spec: Path) -> QemuMachine:
        data = json.loads(spec.read_text())
        log = data.get("log")
        return cls([str(a) for a in data["argv"]], Path(data["qmp"]), Path(log) if log else None)


class SimBmc(pyghmi_bmc.Bmc):  # type: ignore[misc]
    def __init__(self, name: str, authdata: dict[str, str], *, address: str = "127.0.0.1", port: int = 0,
                 sol: bool = True, log: Any = None, lock: threading.Lock | None = None,
                 machine: QemuMachine | None = None) -> None:
        super().__init__(authdata, port=port, address=address)
        self.machine = machine
        self.port = self.serversocket.getsockname()[1]  # the kernel's choice when port was 0
        self.name = name
        self.powerstate = "off"
        self.bootdevice = "default"
        self.sol_offered = sol
        self._log = log
        self._lock = lock or threading.Lock()

    def record(self, what: str, **extra: Any) -> None:
        if self._log is None:
            return
        line = json.dumps({"ts": time.time(), "bmc": self.name, "port": self.port, "what": what, **extra})
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()

    def sessionless_data(self, data: bytes, sockaddr: Any) -> None:
        """An RMCP+ open-session request starts a :class:`SimSession`; anything else as pyghmi does."""
        if len(data) >= 22 and data[0] == 6 and data[2:4] == b"\xff\x07" and data[4] == 6 and data[5] == 16:
            SimSession(self.authdata, self.kg, sockaddr, self.serversocket, bytearray(data)[16:], self.uuid,
                       bmc=self)
            return
        super().sessionless_data(data, sockaddr)

    # -- what pyghmi's server asks the machine --------------------------------------------
    def get_power_state(self) -> str:
        if self.machine is not None:
            self.powerstate = "on" if self.machine.running() else "off"
        return self.powerstate

    def power_on(self) -> int:
        self.record("on", bootdev=self.bootdevice, was=self.get_power_state())
        if self.machine is not None and self.powerstate != "on":
            self.record("launch", pid=self.machine.launch())
        self.powerstate = "on"
        return 0

    def power_off(self) -> int:
        self.record("off", was=self.get_power_state())
        if self.machine is not None:
            self.machine.stop()
        self.powerstate = "off"
        return 0

    def power_shutdown(self) -> int:
        self.record("shutdown", was=self.get_power_state())
        if self.machine is not None:
            if self.powerstate == "on":
                self.machine.powerdown()  # ACPI: the guest decides; the state follows what QEMU does
            return 0
        self.powerstate = "off"
        return 0

    def power_cycle(self) -> int:
        if self.get_power_state() != "on":
            self.record("cycle-refused", was=self.powerstate)
            return NOT_IN_PRESENT_STATE
        self.record("cycle", bootdev=self.bootdevice)
        if self.machine is not None:
            # Off, a pause, on, after the answer: the client is not kept waiting on QEMU (a slow answer
            # would be retried, and the retry cycle the machine twice).
            threading.Thread(target=self._cycle, name=f"cycle-{self.name}", daemon=True).start()
        return 0

    def _cycle(self) -> None:
        assert self.machine is not None
        time.sleep(0.2)
        self.machine.stop()
        time.sleep(1.0)
        self.record("launch", pid=self.machine.launch())

    def power_reset(self) -> int:
        if self.get_power_state() != "on":
            self.record("reset-refused", was=self.powerstate)
            return NOT_IN_PRESENT_STATE
        self.record("reset", bootdev=self.bootdevice)
        if self.machine is not None:
            try:
                self.machine.reset()
            except (OSError, QmpError, ValueError) as exc:
                self.record("reset-failed", error=str(exc))
                return NOT_IN_PRESENT_STATE
        return 0

    def get_boot_device(self) -> str:
        return self.bootdevice

    def set_boot_device(self, bootdevice: str) -> None:
        # A QEMU machine boots from the network anyway (the lab starts it with -boot order=n): recorded only.
        self.record("bootdev", device=bootdevice)
        self.bootdevice = bootdevice

    def cold_reset(self) -> int:
        return 0

    # -- Serial-over-LAN: offered only when ``sol`` ----------------------------------------------------
    def is_active(self) -> bool:
        return self.sol_offered

    def iohandler(self, data: Any) -> None:
        """What the console's user typed: echo it, as a login prompt's terminal would."""
        if isinstance(data, dict):  # pyghmi's way of saying the session ended
            return
        self.record("sol-input", size=len(data))
        if self.sol is not None:
            self.sol.send_data(data)

    def activate_payload(self, request: Any, session: Any) -> None:
        if not self.sol_offered:
            session.send_ipmi_response(code=SOL_DISABLED)
            return
        super().activate_payload(request, session)
        if self.sol is not None:
            self.record("sol-activated")
            self.sol.send_data(f"[{self.name} serial console]\r\n".encode())


@dataclass(frozen=True)
class Simulator:
    """A running simulator process: its BMCs' UDP ports on 127.0.0.1, in order, and its command log."""

    ports: list[int]
    pid: int
    log: Path | None

    def records(self, what: str | None = None) -> list[dict[str, Any]]:
        if self.log is None or not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        return [r for r in rows if what is None or r["what"] == what]


@contextlib.contextmanager
def simulator(count: int = 1, *, user: str = "admin", password: str = "password", sol: bool = True,
              log: Path | None = None, name: str = "bmc", start_timeout: float = 30.0,
              machines: Sequence[Path] = ()) -> Iterator[Simulator]:
    """Run ``count`` simulated BMCs in a child process for the length of the ``with`` block.

    ``machines``: QEMU specs (see the module docstring), one a BMC; then ``count`` is their number.
    """
    cmd = [sys.executable, "-m", "bootd.lab.bmc", "--count", str(len(machines) or count), "--user", user,
           "--name", name]
    for spec in machines:
        cmd += ["--qemu", str(spec)]
    if not sol:
        cmd.append("--no-sol")
    if log is not None:
        cmd += ["--log", str(log)]
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "BMC_PASSWORD": password,
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, cwd=root)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], start_timeout)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"the BMC simulator did not start within {start_timeout:g} s (exit code {proc.poll()})")
        yield Simulator(json.loads(line)["ports"], proc.pid, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootd.lab.bmc", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1, help="simulated BMCs (each on its own UDP port)")
    parser.add_argument("--port", type=int, action="append", help="a fixed port (repeatable; else ephemeral)")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--user", default="admin")
    parser.add_argument("--password-file", type=Path, help="the password (default: $BMC_PASSWORD, else 'password')")
    parser.add_argument("--name", default="bmc", help="name prefix in the log")
    parser.add_argument("--no-sol", action="store_true", help="refuse Serial-over-LAN, as some BMCs do")
    parser.add_argument("--log", type=Path, help="append every chassis command here (JSON lines)")
    parser.add_argument("--qemu", type=Path, action="append", default=[],
                        help='a real machine behind the next BMC: JSON {"argv": [...], "qmp": PATH, "log": PATH}'
                             " (repeatable; the simulator launches and stops that QEMU)")
    args = parser.parse_args(argv)
    if args.password_file is not None:
        password = args.password_file.read_text().strip()
    else:
        password = os.environ.get("BMC_PASSWORD", "password")
    machines = [QemuMachine.from_spec(spec) for spec in args.qemu]
    ports = args.port or [0] * (len(machines) or args.count)
    if machines and len(machines) != len(ports):
        parser.error(f"{len(machines)} --qemu machines for {len(ports)} ports: give one machine a BMC")
    log = args.log.open("a") if args.log else None
    lock = threading.Lock()
    bmcs = [SimBmc(f"{args.name}{i}", {args.user: password}, address=args.address, port=p, sol=not args.no_sol,
                   log=log, lock=lock, machine=machines[i] if machines else None) for i, p in enumerate(ports)]

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)  # so the machines below are stopped, not orphaned
    try:
        sys.stdout.write(json.dumps({"ports": [b.port for b in bmcs], "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        pyghmi_bmc.Bmc.listen(timeout=30)
    finally:
        for machine in machines:
            machine.stop(grace=3.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
