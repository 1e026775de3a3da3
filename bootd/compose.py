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
import functools
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry

from bootd.capsule.image import ImageStore
from bootd.capsule.objects import CapsuleStore
from bootd.config import Config
from bootd.errors import CapsuleError, StoreError
from bootd.metrics import make_registry
from bootd.service.audit import AuditLog
from bootd.service.boot import BootService
from bootd.service.catalog import Catalog
from bootd.service.credentials import Credentials
from bootd.service.health import HealthMonitor
from bootd.service.inventory import InventoryStore
from bootd.service.lifecycle import Lifecycle
from bootd.service.nodes import NodeAdmin
from bootd.service.overlays import OverlayService
from bootd.service.power import PowerService
from bootd.service.registry import RegistryService
from bootd.service.replica import Replica, SyncReport
from bootd.service.servers import Cluster, ServerAdmin
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


PRIVATE_FILES = ("bootd.sqlite", "bootd.sqlite-wal", "bootd.sqlite-shm", "admin-token", "viewer-token", "secret")


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
    images = ImageStore(capsules, chunk_size=config.capsule.image_chunk, zstd_level=config.capsule.zstd_level)
    boot = BootService(config, registry, lifecycle, capsules, credentials, images)
    audit = AuditLog(config.server.state_dir / "audit.log")
    inventory = InventoryStore(config.server.state_dir / "inventory")
    nodes = NodeAdmin(store, lifecycle, config.registry, audit, inventory)
    replica = make_replica(config, config.capsule.upstream, metrics=metrics) if config.capsule.upstream else None
    # Does nothing until started (bootd serve): the CLI's copy never heartbeats.
    cluster = Cluster(store, config, load=functools.partial(_answered, metrics),
                      addresses=[sc.next_server for sc in config.dhcp.subnets if sc.next_server])
    # The iPXE script names every live server after this one (then boot.sources), so a node whose server
    # dies mid-boot continues from the next.
    boot.peers = cluster.live_urls
    if replica is not None:  # a cold replica boots nodes by capsule name before any `capsule sync`
        boot.upstream_resolve = replica.resolve
    return store, Services(lifecycle=lifecycle, registry=registry, boot=boot, nodes=nodes, credentials=credentials,
                           capsules=capsules, metrics=metrics, overlays=OverlayService(store, config, registry),
                           servers=ServerAdmin(store, config), cluster=cluster, replica=replica,
                           catalog=Catalog(config, audit),
                           power=PowerService(store, nodes, config, audit))


def make_replica(config: Config, url: str, *, metrics: CollectorRegistry | None = None) -> Replica:
    """Fetch-on-miss from the bootd at ``url`` into this configuration's capsule store (serve and sync)."""
    from bootd.net.upstream import HttpUpstream

    c = config.capsule
    return Replica(CapsuleStore(c.dir), HttpUpstream(url, connections=c.upstream_connections),
                   connections=c.upstream_connections, timeout=c.upstream_timeout, metrics=metrics)


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
    # Every server heartbeats into the registry (bootd server list); with several on one PostgreSQL they
    # split the DHCP clients and one at a time sweeps the lifecycle timeouts.
    cluster = svc.cluster
    health = HealthMonitor(svc.lifecycle, lead=cluster.lead)
    built = Built(config, store, svc, health, background=[health.run])
    built.components.append(("cluster", cluster))
    if svc.replica is not None:
        built.components.append(("replica", svc.replica))

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
                           lifecycle=svc.lifecycle, credentials=svc.credentials, cluster=cluster)
        built.components.append(("dhcp", DhcpServer(
            dhcp, listen=d.listen, port=d.port, proxy_port=d.proxy_port if d.mode == "proxy" else None,
            interface=d.interface, queue_size=d.queue_size, metrics=svc.metrics,
            more_interfaces=tuple(sc.interface for sc in d.subnets if sc.interface) if d.mode == "full" else (),
        )))
    return built


ANSWERED = ("bootd_dhcp_replies", "bootd_http_requests")  # what a server's load counts


def _answered(metrics: CollectorRegistry) -> float:
    """Requests answered so far (DHCP replies and HTTP requests): the heartbeat reports its rate as the load."""
    return sum(sample.value for metric in metrics.collect() if metric.name in ANSWERED
               for sample in metric.samples if sample.name.endswith("_total"))


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


async def sync_capsules(config: Config, url: str, names: list[str],
                        progress: Callable[[SyncReport, int, int], None] | None = None) -> list[SyncReport]:
    """``bootd capsule sync``: whole capsules from the bootd at ``url`` into this store, published by name."""
    replica = make_replica(config, url)
    try:
        await replica.start()
        refs = await replica.peer_refs()
        wanted = list(dict.fromkeys(names)) or sorted(refs)
        unknown = [n for n in wanted if n not in refs]
        if unknown:
            have = ", ".join(sorted(refs)) or "none"
            raise CapsuleError(f"{url} has no capsule named {unknown[0]!r} (it has: {have})")
        return [await replica.sync(name, refs[name], progress) for name in wanted]
    finally:
        await replica.close()
