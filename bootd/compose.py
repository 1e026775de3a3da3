"""The composition root: the one place that turns a configuration into typed components.

``services()`` builds the store and every service; the CLI calls it too, so
a command run with the daemon stopped (or beside it) takes the same code
path for every decision as the HTTP API.  ``build()`` adds the transports
and background jobs for ``bootd serve``.  Only this module names concrete
classes; nothing imports it but the daemon and the CLI, so there is no
import cycle (tests/unit/test_layout.py checks).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from bootd.capsule.objects import CapsuleStore
from bootd.config import Config
from bootd.errors import StoreError
from bootd.metrics import make_registry
from bootd.service.audit import AuditLog
from bootd.service.boot import BootService
from bootd.service.credentials import Credentials
from bootd.service.health import HealthMonitor
from bootd.service.lifecycle import Lifecycle
from bootd.service.nodes import NodeAdmin
from bootd.service.overlays import OverlayService
from bootd.service.power import PowerService
from bootd.service.registry import RegistryService
from bootd.service.services import Services
from bootd.store.base import NodeStore
from bootd.store.factory import open_store
from bootd.store.sqlite import state_dir_writable


class Component(Protocol):
    """A transport the daemon starts and stops."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


@runtime_checkable
class Reloadable(Protocol):
    """A component that applies its own section; it may return the settings that need a restart."""

    def reload(self, config: Config) -> object: ...


PRIVATE_FILES = ("bootd.sqlite", "bootd.sqlite-wal", "bootd.sqlite-shm", "admin-token", "secret")


def secure_state_dir(config: Config) -> None:
    """State directory 0700 and its registry and secrets 0600, whoever starts bootd.

    ``bootd`` runs under umask 077 (bootd.cli.main), so what it creates is private; this also takes
    over a directory an older bootd (or a hand-run one) left 0755 with a 0644 database.
    """
    state = config.server.state_dir
    state_dir_writable(state)
    if state.stat().st_mode & 0o077:
        state.chmod(0o700)
    for name in PRIVATE_FILES:
        path = state / name
        try:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        except FileNotFoundError:
            continue


@dataclass
class Built:
    """Everything ``bootd serve`` runs, typed (no dict of extras)."""

    config: Config
    store: NodeStore
    services: Services
    health: HealthMonitor
    components: list[tuple[str, Component]] = field(default_factory=list)
    background: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)

    def reload(self, config: Config) -> list[str]:
        """Hand every component its new configuration; each takes what it can apply live.

        Returns what the components said needs a restart (components that reload themselves say so).
        """
        self.config = config
        self.services.reload(config)
        restart: list[str] = []
        for _name, component in self.components:
            if isinstance(component, Reloadable):
                said = component.reload(config)
                if isinstance(said, list):
                    restart.extend(str(x) for x in said)
        return restart


def services(config: Config, *, store: NodeStore, metrics: CollectorRegistry | None = None,
             ) -> tuple[NodeStore, Services]:
    """The services over ``store``; the caller owns the store (close it when done)."""
    metrics = make_registry() if metrics is None else metrics
    capsules = CapsuleStore(config.capsule.dir)
    lifecycle = Lifecycle(store, config.registry, metrics)
    registry = RegistryService(store, config.registry)
    credentials = Credentials(store, config)
    boot = BootService(config, registry, lifecycle, capsules, credentials)
    audit = AuditLog(config.server.state_dir / "audit.log")
    nodes = NodeAdmin(store, lifecycle, config.registry, audit)
    return store, Services(lifecycle=lifecycle, registry=registry, boot=boot, nodes=nodes, credentials=credentials,
                           capsules=capsules, metrics=metrics, overlays=OverlayService(store, config, registry),
                           power=PowerService(store, nodes, config, audit))


@contextlib.asynccontextmanager
async def open_services(config: Config, *, readonly: bool = False) -> AsyncIterator[Services]:
    """The services for one CLI command: the same code path as the daemon's, store closed afterwards."""
    if not readonly:
        secure_state_dir(config)
    elif not config.store.url and not config.db_path.exists():
        readonly = False  # a first read on a new install creates the registry
    store = await open_store(config, readonly=readonly)
    _, svc = services(config, store=store)
    try:
        yield svc
    finally:
        await store.close()


async def build(config: Config) -> Built:
    """Construct the store, services and transports of ``bootd serve``; nothing listens yet."""
    secure_state_dir(config)
    metrics = make_registry()
    store = await open_store(config, metrics=metrics)
    _, svc = services(config, store=store, metrics=metrics)
    capsules = svc.capsules
    assert isinstance(capsules, CapsuleStore)
    capsules.ensure_layout()
    health = HealthMonitor(svc.lifecycle)
    built = Built(config, store, svc, health, background=[health.run])

    if config.tftp.enabled:
        from bootd.net.tftp import TftpServer

        config.tftp.root.mkdir(parents=True, exist_ok=True)
        built.components.append(("tftp", TftpServer.from_config(config, svc.metrics)))

    if config.http.enabled:
        from bootd.net.http.admin import AdminServer
        from bootd.net.http.app import HttpServer

        http = HttpServer(config, svc)
        built.components.append(("http", http))
        built.components.append(("admin", AdminServer(config, svc, http.metrics)))

    if config.dhcp.enabled:
        from bootd.net.dhcp import DhcpServer
        from bootd.service.dhcp import DhcpService

        d = config.dhcp
        dhcp = DhcpService(store, svc.registry, svc.boot, d, server_address=config.server.address,
                           lifecycle=svc.lifecycle, credentials=svc.credentials)
        built.components.append(("dhcp", DhcpServer(
            dhcp, listen=d.listen, port=d.port, proxy_port=d.proxy_port if d.mode == "proxy" else None,
            interface=d.interface, queue_size=d.queue_size, metrics=svc.metrics,
        )))
    return built


async def migrate_store(config: Config, to: str, *, source: Path | None, password_file: Path | None, force: bool,
                        progress: Callable[[str, int, int], None]) -> Any:
    """``bootd store migrate``: copy the SQLite registry into PostgreSQL (the CLI never opens a store itself)."""
    from bootd.store import factory
    from bootd.store import migrate as store_migrate

    if not factory.is_postgres(to):
        raise StoreError("--to must be a postgresql:// URL")
    password_file = password_file or config.store.password_file
    password = factory.read_password(password_file) if password_file else None
    return await store_migrate.to_postgres(
        source or factory.sqlite_path(config), to, password=password, default_group=config.registry.default_group,
        force=force, connect_timeout=config.store.connect_timeout, progress=progress)
