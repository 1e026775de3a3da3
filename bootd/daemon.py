"""``bootd serve``: runs what ``bootd.compose.build`` made.

Everything it starts runs in one asyncio loop; SIGTERM/SIGINT set an Event (as hypercorn's run.py does)
and shutdown gets ``server.graceful_timeout`` seconds before the rest is
cancelled; SIGHUP re-reads the configuration and applies what can change
live.  systemd hears READY=1, STATUS= and STOPPING=1 through sd_notify.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from bootd import COMPILED, __version__
from bootd import config as config_mod
from bootd.compose import Built, Component, build
from bootd.errors import BootdError, ConfigError

log = logging.getLogger("bootd")


def notify(message: str) -> bool:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET, silently skipped outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("event=sd_notify_failed error=%r", exc.strerror)
        return False
    return True


class _Formatter(logging.Formatter):
    """One line per event: ``LEVEL logger: key=value ...``.

    Under systemd (JOURNAL_STREAM set) the timestamp is left to journald and a
    ``<N>`` syslog priority prefix is added so ``journalctl -p`` works; on a
    terminal the line starts with an ISO timestamp.  Either way it greps well.
    """

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += " " + self.formatException(record.exc_info).replace("\n", " | ")
        if self.journal:
            return f"<{self.PRIORITY.get(record.levelno, 6)}>{line}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d} {line}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal="JOURNAL_STREAM" in os.environ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


GC_YOUNG = 10_000  # allocations between two collections of the young generation (CPython's default: 700)
GC_MIDDLE = 50  # young collections between two of the middle generation (CPython's default: 10)


def tune_gc() -> None:
    """Once started: put what start-up built out of the collector's sight, and collect the young generation less often.

    Why: a DHCP batch allocates thousands of short-lived objects (packets, classifications, replies). At CPython's
    default a young collection runs every 700 allocations, catches a batch mid-flight and promotes its objects, which
    older collections then traverse again along with every lease and cached node. Collection was about a tenth of the
    DHCP path's CPU (bench/dhcp/profile_service.py, batches of 128: 1.30 CPU-s for 20,000 exchanges, 1.15 with this).
    The middle generation, which each of those collections feeds with a batch's survivors (nodes, leases, cached
    answers, all long-lived), is collected five times less often too: 30,600 -> 31,500 exchanges/s there, compiled.
    Reference cycles are still collected, only later.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_MIDDLE, gc.get_threshold()[2])


@dataclass
class Daemon:
    config: config_mod.Config
    built: Built | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def components(self) -> list[tuple[str, Component]]:
        return [] if self.built is None else self.built.components

    async def build(self) -> None:
        """Construct the store, services and transports (bootd.compose); nothing listens yet."""
        self.built = await build(self.config)

    async def start(self) -> None:
        started: list[tuple[str, Component]] = []
        try:
            for name, component in self.components:
                await component.start()
                started.append((name, component))
                log.info("event=started component=%s", name)
        except BaseException:
            for _name, component in reversed(started):
                with contextlib.suppress(Exception):
                    await component.close()
            raise

    async def close(self) -> None:
        for name, component in reversed(self.components):
            try:
                await component.close()
                log.info("event=stopped component=%s", name)
            except Exception as exc:  # keep closing the others; the error is logged
                log.error("event=stop_failed component=%s error=%r", name, exc)
        if self.built is not None:
            await self.built.store.close()

    def reload(self) -> None:
        """SIGHUP: re-read the file; apply live what can change live, say what needs a restart."""
        try:
            new = config_mod.load(self.config.path)
        except ConfigError as exc:
            log.error("event=reload_failed error=%r (keeping the running configuration)", str(exc))
            return
        old = self.config
        # A running DHCP server reloads its own [dhcp] section and names what needs a restart; the other
        # listeners' sections are baked into their sockets.
        restart = [s for s in ("dhcp", "tftp", "http", "capsule", "store", "cluster")
                   if getattr(new, s) != getattr(old, s) and not (s == "dhcp" and old.dhcp.enabled)]
        # log_level and graceful_timeout apply live; these three are baked into the listeners.
        if any(getattr(new.server, k) != getattr(old.server, k) for k in ("state_dir", "address", "interface")):
            restart.append("server")
        setup_logging(new.server.log_level)
        self.config = new
        if self.built is not None:
            restart += self.built.reload(new)
        applied = "registry,boot,log_level" + (",dhcp" if old.dhcp.enabled else "")
        if restart:
            log.warning("event=reloaded applied=%s restart_needed_for=%s", applied, ",".join(restart))
        else:
            log.info("event=reloaded applied=%s", applied)
        notify("STATUS=configuration reloaded")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.build()
            await self.start()
        except BootdError as exc:
            log.error("event=start_failed error=%r", str(exc))
            await self.close()
            return 1
        tune_gc()
        names = ",".join(n for n, _ in self.components) or "none"
        log.info("event=ready version=%s components=%s config=%s dhcp_path=%s", __version__, names, self.config.path,
                 "compiled" if COMPILED else "interpreted")
        if not COMPILED:
            log.warning("event=dhcp-path-interpreted reason=%r", "the DHCP path runs from its sources, about a third "
                        "slower: run `make compile` (tools/compile.py) after changing them")
        notify(f"READY=1\nSTATUS=serving ({names})\nMAINPID={os.getpid()}")
        failed = False
        try:
            async with asyncio.TaskGroup() as tg:
                jobs = [] if self.built is None else self.built.background
                tasks: list[asyncio.Task[None]] = [tg.create_task(job()) for job in jobs]
                await self.stop.wait()
                for task in tasks:
                    task.cancel()
        except* Exception as group:
            for error in group.exceptions:
                log.error("event=background_failed error=%r", error)
            failed = True
        log.info("event=stopping graceful_timeout=%s", self.config.server.graceful_timeout)
        notify("STOPPING=1\nSTATUS=stopping")
        try:
            await asyncio.wait_for(self.close(), timeout=self.config.server.graceful_timeout)
        except TimeoutError:
            log.warning("event=stop_timeout after=%ss (remaining work cancelled)",
                        self.config.server.graceful_timeout)
            return 1
        log.info("event=stopped")
        return 1 if failed else 0


def run(config: config_mod.Config) -> int:
    setup_logging(config.server.log_level)
    return asyncio.run(Daemon(config).run())
