"""Power control through the nodes' BMCs: IPMI 2.0 over LAN (RMCP+, "lanplus"), with pyghmi.

Where a node's BMC is, is configuration an administrator already knows how
to set: the variables ``bmc.address``, ``bmc.user``, and optionally
``bmc.port`` (623) and ``bmc.interface`` ("lanplus", the only one), on the
node or on its group (a node's own win).  Its password is not a variable:
variables are shown by ``node show`` and the API, so a password lives in a
file of its own under ``state_dir/bmc`` (0700), one per node or per group,
0600, written atomically, and nothing bootd prints ever reads it back.

pyghmi is synchronous (its sessions share one I/O thread and wait on it), so
each BMC gets a thread of its own, at most ``parallel`` at a time, daemon
threads: a BMC that never answers can delay its own result by the timeout,
never the command's exit.  Every node gets one result, ok or the reason in
words (unreachable, wrong password, unknown user, refused in this state).

``--stagger N`` is a rate, not a delay: the power-on commands themselves
(on, cycle, reset) leave at most N a second across the whole job, however
many BMCs are being logged into at once, because a rack's breakers and a
boot storm care about the moment power is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootd.config import Config, PowerConfig
from bootd.durable import fsync_path
from bootd.errors import BootdError, NotFound
from bootd.hostlist import compress
from bootd.service.audit import AuditLog
from bootd.service.nodes import Invalid, NodeAdmin
from bootd.store.base import NodeStore

log = logging.getLogger("bootd.power")

ACTIONS = ("on", "off", "cycle", "reset", "status")
POWERS_ON = frozenset({"on", "cycle", "reset"})  # what --stagger paces and --pxe goes with
ADDRESS, USER, PORT, INTERFACE = "bmc.address", "bmc.user", "bmc.port", "bmc.interface"
IPMI_PORT = 623
MAX_PASSWORD = 20  # IPMI 2.0 user passwords are at most 20 bytes
MAX_PARALLEL = 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# Chassis control (IPMI 2.0 section 28.3): data byte 0 is the action.
CHASSIS_NETFN, CHASSIS_CONTROL, POWER_CYCLE = 0x00, 0x02, 0x02
NOT_IN_PRESENT_STATE = 0xD5


class PowerBusy(BootdError):
    """As many power jobs as ``power.max_jobs`` are running; try again shortly."""


@dataclass(frozen=True, slots=True)
class BmcTarget:
    """One node's BMC, resolved from its variables, its group's, and the password files."""

    node: str
    address: str
    user: str
    password: str = field(repr=False)
    port: int = IPMI_PORT

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class PowerResult:
    node: str
    action: str
    ok: bool
    message: str
    state: str | None = None  # the power state after the action (or read, for status), when known
    bmc: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "action": self.action, "ok": self.ok, "state": self.state,
                "message": self.message, "bmc": self.bmc, "seconds": round(self.seconds, 3)}


# -- passwords ------------------------------------------------------------------------------------
class BmcSecrets:
    """BMC passwords, one file per node (``node.NAME``) or group (``group.NAME``) under state_dir/bmc."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "bmc"

    def path(self, kind: str, name: str) -> Path:
        if kind not in ("node", "group") or not _NAME.fullmatch(name):
            raise Invalid(f"{name!r} is not a valid {kind} name")
        return self.dir / f"{kind}.{name}"

    def set(self, kind: str, name: str, password: str) -> None:
        """Write atomically (temporary file, fsync, rename, fsync of the directory), 0600 in a 0700 directory."""
        check_password(password)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.dir.stat().st_mode & 0o077:
            self.dir.chmod(0o700)
        final = self.path(kind, name)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.write(fd, password.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_path(self.dir)

    def delete(self, kind: str, name: str) -> bool:
        try:
            self.path(kind, name).unlink()
        except FileNotFoundError:
            return False
        fsync_path(self.dir)
        return True

    def read(self, kind: str, name: str) -> str | None:
        try:
            return self.path(kind, name).read_bytes().decode("utf-8", "replace")
        except (FileNotFoundError, Invalid):
            return None

    def lookup(self, node: str, group: str) -> tuple[str, str] | None:
        """(password, where from): the node's own file wins over its group's."""
        for kind, name in (("node", node), ("group", group)):
            password = self.read(kind, name)
            if password is not None:
                return password, f"{kind} {name}"
        return None


def check_password(password: str) -> None:
    if not password:
        raise Invalid("the BMC password is empty")
    if any(c in password for c in "\r\n\0"):
        raise Invalid("the BMC password must be one line without NUL bytes")
    if len(password.encode()) > MAX_PASSWORD:
        raise Invalid(f"the BMC password is {len(password.encode())} bytes; IPMI 2.0 allows at most {MAX_PASSWORD}")


def split_target(target: str) -> tuple[str, str]:
    """``NODE`` or ``@GROUP`` (as ``bootd bmc set-password`` takes them) -> (kind, name)."""
    if target.startswith("@"):
        return "group", target[1:]
    return "node", target


# -- the pace of power-ons ------------------------------------------------------------------------
class Pacer:
    """At most ``rate`` power-ons a second: each caller gets the next slot, 1/rate after the previous one.

    Thread-safe (the BMC threads call it right before the power command).  ``wait`` returns how long
    the caller slept, so its timeout can leave that time out.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> float:
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            self.sleep(slot - now)
        return slot - now


# -- one BMC ----------------------------------------------------------------------------------------
def _ipmi_error(target: BmcTarget, exc: BaseException) -> str:
    """pyghmi's exceptions in an administrator's words: what is wrong, and with which BMC."""
    text = str(exc) if str(exc) not in ("", "None") else ""
    code = getattr(exc, "ipmicode", None)
    if isinstance(exc, socket.gaierror):
        return f"BMC address {target.address!r} does not resolve ({exc.strerror})"
    if "Incorrect password" in text:
        return f"BMC {target.where}: wrong password for user {target.user!r}"
    if "Unauthorized name" in text:
        return f"BMC {target.where}: the BMC knows no user {target.user!r}"
    if code == NOT_IN_PRESENT_STATE or "present state" in text.lower():
        return f"BMC {target.where}: refused in the machine's present state"
    if not text or text in ("timeout", "Session no longer connected", "Session failed to initialize"):
        return f"BMC {target.where}: no answer (unreachable, or no IPMI 2.0 on UDP port {target.port})"
    if "transmit" in text:
        return f"BMC {target.where}: cannot send to it ({text})"
    return f"BMC {target.where}: {text}"


def act(target: BmcTarget, action: str, *, pxe: bool = False, pacer: Pacer | None = None,
        paced: Callable[[float], None] | None = None) -> tuple[bool, str, str | None]:
    """One action on one BMC, synchronously: (ok, message, power state).  Runs in a BMC thread."""
    from pyghmi import exceptions as ipmi_exc
    from pyghmi.ipmi import command

    def pace() -> None:
        if pacer is not None:
            slept = pacer.wait()
            if paced is not None:
                paced(slept)

    cmd = None
    try:
        # Credentials as bytes: pyghmi keys its session table with what it is given and deletes with
        # bytes, so str credentials leave a stale entry that breaks the next session to the same BMC.
        cmd = command.Command(bmc=target.address, userid=target.user.encode(), password=target.password.encode(),
                              port=target.port)
        state = cmd.get_power()["powerstate"]
        if action == "status":
            return True, state, state
        if pxe:
            cmd.set_bootdev("network")
        nextboot = "; next boot from the network" if pxe else ""
        if action == "off":
            if state == "off":
                return True, "already off", "off"
            cmd.set_power("off")
            return True, "powered off", "off"
        if action == "on":
            if state == "on":
                return True, "already on" + nextboot, "on"
            pace()
            cmd.set_power("on")
            return True, "powered on" + nextboot, "on"
        if action == "cycle":
            pace()
            if state == "off":
                cmd.set_power("on")
                return True, "was off: powered on" + nextboot, "on"
            cmd.xraw_command(netfn=CHASSIS_NETFN, command=CHASSIS_CONTROL, data=(POWER_CYCLE,))
            return True, "power cycled" + nextboot, "on"
        if action == "reset":
            if state == "off":
                return False, "is off: a reset needs it running (use `bootd power on`)", "off"
            pace()
            cmd.set_power("reset")
            return True, "reset" + nextboot, "on"
        raise Invalid(f"unknown power action {action!r}")
    except (ipmi_exc.PyghmiException, OSError) as exc:
        return False, _ipmi_error(target, exc), None
    finally:
        if cmd is not None:
            with contextlib.suppress(Exception):
                cmd.ipmi_session.logout()


# -- Serial-over-LAN ------------------------------------------------------------------------------
class ConsoleRefused(BootdError):
    """The BMC did not give a Serial-over-LAN session (not offered, busy, or not reachable)."""


class SolConsole:
    """A Serial-over-LAN session with one node's BMC, driven by the caller's loop (``pump``).

    pyghmi delivers console output and errors from inside ``wait_for_rsp``, so the caller calls
    :meth:`pump` often (the CLI does, between reads of its terminal); output goes to ``output``.
    """

    def __init__(self, target: BmcTarget, output: Callable[[bytes], None], timeout: float) -> None:
        from pyghmi.ipmi import console

        self.target = target
        self.output = output
        self.error: str | None = None
        self._console_mod = console
        self._console = console.Console(bmc=target.address, userid=target.user.encode(),
                                        password=target.password.encode(), iohandler=self._handle,
                                        port=target.port)
        deadline = time.monotonic() + timeout
        while not self._console.connected and self.error is None:
            if time.monotonic() > deadline:
                self.close()
                raise ConsoleRefused(f"{target.node}: BMC {target.where} did not open Serial-over-LAN within "
                                     f"{timeout:g} s")
            self.pump(0.1)
        if self.error is not None:
            self.close()
            raise ConsoleRefused(f"{target.node}: BMC {target.where} does not give a Serial-over-LAN console: "
                                 f"{self._words(self.error)}")

    def _words(self, error: str) -> str:
        if "Incorrect password" in error or "Unauthorized name" in error:
            return _ipmi_error(self.target, Exception(error)).split(": ", 1)[1]
        return error

    def _handle(self, data: Any) -> None:
        if isinstance(data, dict):
            if "error" in data:
                self.error = str(data["error"])
            elif "info" in data:
                self.output(f"\r\n[{data['info']}]\r\n".encode())
            return
        self.output(data if isinstance(data, bytes) else str(data).encode())

    @property
    def broken(self) -> bool:
        return self.error is not None or bool(self._console.broken)

    def pump(self, timeout: float) -> None:
        self._console_mod.Console.wait_for_rsp(timeout)

    def send(self, data: bytes) -> None:
        self._console.send_data(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._console.close()
        with contextlib.suppress(Exception):
            if self._console.ipmi_session is not None:
                self._console.ipmi_session.logout()


# -- the service ------------------------------------------------------------------------------------
@dataclass
class _Running:
    """One node's action in flight: when it started, and how long it has waited for its --stagger slot."""

    started: float
    paced: float = 0.0


class PowerService:
    def __init__(self, store: NodeStore, nodes: NodeAdmin, config: Config, audit: AuditLog) -> None:
        self.store = store
        self.nodes = nodes
        self.audit = audit
        self.secrets = BmcSecrets(config.server.state_dir)
        self.config: PowerConfig = config.power
        self._jobs = 0

    def reload(self, config: Config) -> None:
        self.config = config.power

    # -- BMC settings ---------------------------------------------------------------------------
    async def targets(self, hostlist: str) -> list[tuple[str, BmcTarget | str]]:
        """Each named node with its BMC, or the reason it has none usable (every name must exist)."""
        nodes = await self.nodes.select(hostlist)
        groups: dict[str, Mapping[str, str]] = {}
        out: list[tuple[str, BmcTarget | str]] = []
        for node in nodes:
            if node.group not in groups:
                group = await self.store.get_group(node.group)
                groups[node.group] = group.vars if group is not None else {}
            values = {**groups[node.group], **node.vars}
            out.append((node.name, self._target(node.name, node.group, values)))
        return out

    def _target(self, name: str, group: str, values: Mapping[str, str]) -> BmcTarget | str:
        where = f"set it with `bootd node set {name} --var KEY=VALUE` or on group {group}"
        address = values.get(ADDRESS, "").strip()
        if not address:
            return f"no BMC address ({ADDRESS}): {where}"
        user = values.get(USER)
        if user is None:
            return f"no BMC user ({USER}): {where}"
        if len(user.encode()) > 16:
            return f"{USER}={user!r} is longer than the 16 bytes IPMI allows"
        port_text = values.get(PORT, str(IPMI_PORT)).strip()
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            return f"{PORT}={port_text!r} is not a UDP port (1-65535)"
        interface = values.get(INTERFACE, "lanplus").strip()
        if interface != "lanplus":
            return f"{INTERFACE}={interface!r}: bootd speaks IPMI 2.0 (lanplus) only"
        found = self.secrets.lookup(name, group)
        if found is None:
            return (f"no BMC password: set one with `bootd bmc set-password {name}` "
                    f"(or `bootd bmc set-password @{group}` for its group)")
        return BmcTarget(node=name, address=address, user=user, password=found[0], port=int(port_text))

    async def describe(self, hostlist: str) -> list[dict[str, Any]]:
        """What ``bootd bmc show`` prints: where each node's BMC is and where its password comes from,
        never the password itself."""
        nodes = {n.name: n for n in await self.nodes.select(hostlist)}
        out = []
        for name, target in await self.targets(hostlist):
            node = nodes[name]
            found = self.secrets.lookup(name, node.group)
            row: dict[str, Any] = {"node": name, "group": node.group, "password": found[1] if found else None}
            if isinstance(target, BmcTarget):
                row |= {"address": target.address, "port": target.port, "user": target.user, "problem": None}
            else:
                row |= {"address": None, "port": None, "user": None, "problem": target}
            out.append(row)
        return out

    async def set_password(self, target: str, password: str, *, who: str) -> str:
        """``NODE`` or ``@GROUP``; the node or group must exist.  Returns what was set, in words."""
        kind, name = split_target(target)
        await self._must_exist(kind, name)
        self.secrets.set(kind, name, password)
        self.audit.record(who, "bmc.password", f"{kind} {name}")  # that it changed, never the value
        return f"{kind} {name}"

    async def delete_password(self, target: str, *, who: str) -> bool:
        kind, name = split_target(target)
        self.secrets.path(kind, name)  # validates the name
        removed = self.secrets.delete(kind, name)
        if removed:
            self.audit.record(who, "bmc.password.delete", f"{kind} {name}")
        return removed

    async def _must_exist(self, kind: str, name: str) -> None:
        self.secrets.path(kind, name)  # validates the name
        if kind == "group":
            if await self.store.get_group(name) is None:
                raise NotFound(f"no group named {name!r}")
        elif await self.store.get_node(name) is None:
            raise NotFound(f"no node named {name!r} (a group is written @GROUP)")

    async def console_target(self, name: str) -> BmcTarget:
        if not _NAME.fullmatch(name):
            raise Invalid(f"{name!r} is not one node name")
        [(_, target)] = await self.targets(name)
        if isinstance(target, str):
            raise Invalid(f"{name}: {target}")
        return target

    # -- power ----------------------------------------------------------------------------------
    def check(self, action: str, *, pxe: bool, stagger: float | None, parallel: int | None) -> None:
        """Refuse a malformed request before any BMC is touched (the CLI and the API say the same)."""
        if action not in ACTIONS:
            raise Invalid(f"action: expected one of {', '.join(ACTIONS)}, got {action!r}")
        if pxe and action not in POWERS_ON:
            raise Invalid(f"pxe: the next boot device matters to on, cycle and reset, not to {action}")
        if stagger is not None and not (isinstance(stagger, int | float) and not isinstance(stagger, bool)
                                        and 0 <= stagger <= 10_000):
            raise Invalid(f"stagger: expected power-ons per second from 0 (no limit) to 10000, got {stagger!r}")
        if parallel is not None and not (isinstance(parallel, int) and not isinstance(parallel, bool)
                                         and 1 <= parallel <= MAX_PARALLEL):
            raise Invalid(f"parallel: expected an integer from 1 to {MAX_PARALLEL}, got {parallel!r}")

    async def run(self, hostlist: str, action: str, *, who: str, pxe: bool = False, stagger: float | None = None,
                  parallel: int | None = None, progress: Callable[[PowerResult], None] | None = None,
                  ) -> list[PowerResult]:
        """One result per node, in the hostlist's order; ``progress`` hears each as it completes."""
        self.check(action, pxe=pxe, stagger=stagger, parallel=parallel)
        if self._jobs >= self.config.max_jobs:
            raise PowerBusy(f"{self._jobs} power jobs are running (power.max_jobs); try again when one ends")
        self._jobs += 1
        try:
            return await self._run(hostlist, action, who=who, pxe=pxe,
                                   stagger=self.config.stagger if stagger is None else stagger,
                                   parallel=parallel or self.config.parallel, progress=progress)
        finally:
            self._jobs -= 1

    async def _run(self, hostlist: str, action: str, *, who: str, pxe: bool, stagger: float, parallel: int,
                   progress: Callable[[PowerResult], None] | None) -> list[PowerResult]:
        targets = await self.targets(hostlist)
        if action != "status":
            self.audit.record(who, f"power.{action}", compress([n for n, _ in targets]),
                              {"pxe": pxe, "stagger": stagger})
        pacer = Pacer(stagger) if stagger and action in POWERS_ON else None
        slots = asyncio.Semaphore(parallel)
        loop = asyncio.get_running_loop()
        timeout = self.config.timeout

        lingering: set[asyncio.Task[None]] = set()

        async def one(name: str, target: BmcTarget | str) -> PowerResult:
            if isinstance(target, str):
                result = PowerResult(name, action, False, target)
            else:
                await slots.acquire()
                result, finished = await self._one(loop, target, action, pxe, pacer, timeout)
                if finished.is_set():
                    slots.release()
                else:
                    # A thread past its deadline keeps its slot until it ends (pyghmi gives up on its own),
                    # at most one more timeout: a BMC that hangs pyghmi cannot hold the job's threads forever.
                    task = loop.create_task(_release_when(finished, slots, timeout))
                    lingering.add(task)
                    task.add_done_callback(lingering.discard)
            if not result.ok:
                log.info("event=power-failed node=%s action=%s error=%r", name, action, result.message)
            if progress is not None:
                progress(result)
            return result

        return list(await asyncio.gather(*(one(n, t) for n, t in targets)))

    async def _one(self, loop: asyncio.AbstractEventLoop, target: BmcTarget, action: str, pxe: bool,
                   pacer: Pacer | None, timeout: float) -> tuple[PowerResult, threading.Event]:
        """Run ``act`` on a daemon thread; answer at the timeout (plus any --stagger wait) if it has not."""
        running = _Running(time.monotonic())
        done: asyncio.Future[tuple[bool, str, str | None]] = loop.create_future()
        finished = threading.Event()

        def paced(slept: float) -> None:
            running.paced += slept

        def deliver(outcome: tuple[bool, str, str | None]) -> None:
            if not done.done():
                done.set_result(outcome)

        def work() -> None:
            try:
                outcome = act(target, action, pxe=pxe, pacer=pacer, paced=paced)
            except BaseException as exc:  # a pyghmi bug must not lose the node's result
                outcome = (False, f"BMC {target.where}: {type(exc).__name__}: {exc}", None)
            finally:
                finished.set()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(deliver, outcome)

        threading.Thread(target=work, name=f"bmc-{target.node}", daemon=True).start()
        while True:
            remaining = running.started + timeout + running.paced - time.monotonic()
            if remaining <= 0:
                ok, message, state = False, (f"BMC {target.where}: no answer within {timeout:g} s (unreachable, "
                                             f"or no IPMI 2.0 on UDP port {target.port})"), None
                break
            try:
                ok, message, state = await asyncio.wait_for(asyncio.shield(done), remaining)
                break
            except TimeoutError:
                continue  # the deadline moves by the time the thread waited for its --stagger slot
        return PowerResult(target.node, action, ok, message, state, target.where,
                           time.monotonic() - running.started), finished


async def _release_when(finished: threading.Event, slots: asyncio.Semaphore, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not finished.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    slots.release()
