"""Power control through the nodes' BMCs: IPMI 2.0 over LAN (RMCP+, "lanplus"), with pyghmi.

Where a node's BMC is, is configuration an administrator already knows how
to set: the variables ``bmc.address``, ``bmc.user``, and optionally
``bmc.port`` (623) and ``bmc.interface`` ("lanplus", the only one), on the
node or on its group (a node's own win).  Its password is not a variable:
variables are shown by ``node show`` and the API, so a password lives in a
file of its own under ``state_dir/bmc`` (0700), one per node or per group,
0600, written atomically, and nothing bootd prints ever reads it back.

pyghmi is synchronous, and its sessions share process-wide state that is not
safe across threads, so BMCs are worked on in processes (forked from a
forkserver with pyghmi loaded), one BMC at a time each and at most
``parallel`` of them: the worker of a BMC that never answers is killed at the
timeout, and nothing it held outlives it.
Every node gets one result, ok or the reason in words (unreachable, wrong
password, unknown user, refused in this state).

``--stagger N`` is a rate, not a delay: the power-on commands themselves
(on, cycle, reset) leave at most N a second across the whole job, however
many BMCs are being logged into at once, because a rack's breakers and a
boot storm care about the moment power is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootd.config import Config, PowerConfig
from bootd.durable import fsync_path, replace_private
from bootd.errors import BootdError, NotFound
from bootd.hostlist import compress
from bootd.service.audit import AuditLog
from bootd.service.checks import Invalid
from bootd.service.nodes import NodeAdmin
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
CHASSIS_NETFN, CHASSIS_CONTROL = 0x00, 0x02
POWER_UP, POWER_CYCLE, HARD_RESET = 0x01, 0x02, 0x03
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
        replace_private(self.path(kind, name), password.encode())

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
    """At most ``rate`` power-ons a second, as the BMCs receive them.

    A power-on may go when the previous one has been answered by its BMC and 1/rate has passed since:
    so consecutive commands arrive at least 1/rate apart whatever the processes' and the network's
    jitter (a slot counted from when "go" was sent would not be: a slow sender and a fast one arrive
    together).  One power-on is in flight at a time; at 0.1 s per BMC round trip that allows 10 a second.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self._lock = asyncio.Lock()
        self._last = -self.interval

    async def acquire(self) -> float:
        """Wait for the turn of the next power-on; returns how long that took."""
        start = self.clock()
        await self._lock.acquire()
        delay = self._last + self.interval - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return self.clock() - start

    def release(self) -> None:
        """The power-on was answered (or given up on): the next one's interval starts now."""
        self._last = self.clock()
        self._lock.release()


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


Outcome = tuple[bool, str, "str | None"]  # ok, message, power state


def act(target: BmcTarget, action: str, *, pxe: bool = False, pace: Callable[[], None] = lambda: None) -> Outcome:
    """One action on one BMC, synchronously; ``pace`` is called right before a power-on command."""
    from pyghmi import exceptions as ipmi_exc
    from pyghmi.ipmi import command

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
        # Power-ons are one chassis control command right after ``pace``: nothing in between (pyghmi's
        # set_power would read the state again first), so the pace is the pace at the BMC.
        if action == "on":
            if state == "on":
                return True, "already on" + nextboot, "on"
            pace()
            cmd.xraw_command(netfn=CHASSIS_NETFN, command=CHASSIS_CONTROL, data=(POWER_UP,))
            return True, "powered on" + nextboot, "on"
        if action == "cycle":
            pace()
            if state == "off":
                cmd.xraw_command(netfn=CHASSIS_NETFN, command=CHASSIS_CONTROL, data=(POWER_UP,))
                return True, "was off: powered on" + nextboot, "on"
            cmd.xraw_command(netfn=CHASSIS_NETFN, command=CHASSIS_CONTROL, data=(POWER_CYCLE,))
            return True, "power cycled" + nextboot, "on"
        if action == "reset":
            if state == "off":
                return False, "is off: a reset needs it running (use `bootd power on`)", "off"
            pace()
            cmd.xraw_command(netfn=CHASSIS_NETFN, command=CHASSIS_CONTROL, data=(HARD_RESET,))
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


# -- BMC workers: processes ------------------------------------------------------------------------
# pyghmi's sessions share process-wide state and run each other's callbacks inside whichever thread
# waits; two logins in two threads can deadlock (seen here: a login stuck in another thread's
# privilege request).  So BMCs are worked on in processes, one BMC at a time each, forked from a
# forkserver that has pyghmi loaded; a worker serves BMC after BMC for one job, and one past its
# deadline is killed, not left running.
_CONTEXT: Any = None
WORKER_START = 120  # seconds a worker process may take to start (it queues behind the others' forks)


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        # "__main__": a script's main module is imported once, in the forkserver, not again in every
        # child (multiprocessing re-runs it otherwise); `python -m bootd` and the `bootd` script are safe.
        ctx.set_forkserver_preload(["__main__", "pyghmi.ipmi.command", "bootd.service.power"])
        _CONTEXT = ctx
    return _CONTEXT


def _serve(conn: Any) -> None:
    """A worker: one request at a time until the parent closes the pipe."""
    conn.send(("up",))
    while True:
        try:
            _, target, action, pxe, paced = conn.recv()
        except (EOFError, OSError):
            return
        _work(conn, target, action, pxe, paced)


def _work(conn: Any, target: BmcTarget, action: str, pxe: bool, paced: bool) -> None:
    """Act on one BMC, asking the parent for a --stagger turn ("ready" -> "go") first."""

    def pace() -> None:
        if paced:
            conn.send(("ready",))
            conn.recv()

    conn.send(("started",))  # the BMC's time starts now, not when the worker was asked for
    try:
        outcome = act(target, action, pxe=pxe, pace=pace)
    except BaseException as exc:  # a pyghmi bug must not lose the node's result
        outcome = (False, f"BMC {target.where}: {type(exc).__name__}: {exc}", None)
    conn.send(("done", outcome))


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), name="bmc-worker", daemon=True)
        self._child = child

    async def start(self) -> None:
        """Fork it and wait until it runs: a worker queued behind others' forks on a busy machine must not
        eat into its first BMC's timeout."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.proc.start)  # a round trip to the forkserver: not on the loop
        self._child.close()
        up: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(self.conn.fileno())
            try:
                self.conn.recv()
                up.set_result(None)
            except (EOFError, OSError) as exc:
                up.set_exception(PowerBusy(f"a BMC worker process did not start: {exc!r}"))

        loop.add_reader(self.conn.fileno(), readable)
        try:
            await asyncio.wait_for(up, WORKER_START)
        except TimeoutError:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.conn.fileno())
            raise PowerBusy(f"no BMC worker process started within {WORKER_START} s: the machine is overloaded") \
                from None

    async def stop(self, kill: bool = False) -> None:
        self.conn.close()  # the worker sees the end of its pipe and returns
        if self.proc.pid is None:  # never started
            return
        if kill and self.proc.is_alive():
            self.proc.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()


class _Pool:
    """At most ``size`` workers, made when first needed; a killed one is replaced on demand."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ctx = _context()
        self.idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self.live = 0
        self.workers: list[_Worker] = []

    async def get(self) -> _Worker:
        if self.idle.empty() and self.live < self.size:
            self.live += 1
            worker = _Worker(self.ctx)
            try:
                await worker.start()
            except BaseException:
                self.live -= 1
                await worker.stop(kill=True)
                raise
            self.workers.append(worker)
            return worker
        return await self.idle.get()

    def put(self, worker: _Worker) -> None:
        self.idle.put_nowait(worker)

    async def discard(self, worker: _Worker) -> None:
        self.live -= 1
        self.workers.remove(worker)
        await worker.stop(kill=True)

    async def close(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))
        self.workers.clear()


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
        pool = _Pool(min(parallel, max(1, sum(1 for _, t in targets if not isinstance(t, str)))))
        timeout = self.config.timeout

        async def one(name: str, target: BmcTarget | str) -> PowerResult:
            if isinstance(target, str):
                result = PowerResult(name, action, False, target)
            else:
                worker = await pool.get()
                result, healthy = await _one(worker, target, action, pxe, pacer, timeout)
                if healthy:
                    pool.put(worker)
                else:
                    await pool.discard(worker)
            if not result.ok:
                log.info("event=power-failed node=%s action=%s error=%r", name, action, result.message)
            if progress is not None:
                progress(result)
            return result

        try:
            return list(await asyncio.gather(*(one(n, t) for n, t in targets)))
        finally:
            await pool.close()


async def _one(worker: _Worker, target: BmcTarget, action: str, pxe: bool, pacer: Pacer | None,
               timeout: float) -> tuple[PowerResult, bool]:
    """One BMC on a worker; answer at the timeout (plus any --stagger wait) if it has not.

    Returns the result and whether the worker can take the next BMC (not when it was killed or died).
    """
    loop = asyncio.get_running_loop()
    conn = worker.conn
    paced = 0.0
    pacing = False  # this node holds the pacer: its power-on is on its way
    healthy = False
    messages: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def readable() -> None:
        try:
            messages.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            messages.put_nowait(("eof",))

    started = time.monotonic()
    loop.add_reader(conn.fileno(), readable)
    try:
        conn.send(("act", target, action, pxe, pacer is not None))
        while True:
            remaining = started + timeout + paced - time.monotonic()
            try:
                message = await asyncio.wait_for(messages.get(), max(0.0, remaining))
            except TimeoutError:
                outcome: Outcome = (False, f"BMC {target.where}: no answer within {timeout:g} s (unreachable, "
                                           f"or no IPMI 2.0 on UDP port {target.port})", None)
                break
            if message[0] == "started":
                started = time.monotonic()
            elif message[0] == "ready" and pacer is not None:
                paced += await pacer.acquire()  # the time waited for a turn is not the BMC's
                pacing = True
                conn.send(("go",))
            elif message[0] == "done":
                outcome, healthy = message[1], True
                break
            else:
                outcome = (False, f"BMC {target.where}: its worker process ended without an answer "
                                  f"(exit code {worker.proc.exitcode})", None)
                break
    finally:
        if pacing and pacer is not None:
            pacer.release()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(conn.fileno())
    return PowerResult(target.node, action, outcome[0], outcome[1], outcome[2], target.where,
                       time.monotonic() - started), healthy
