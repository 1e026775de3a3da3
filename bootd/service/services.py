"""The services as one typed bundle: what the composition root hands to transports and the CLI.

It holds no store on purpose: transports and the CLI reach the registry only
through these services (tests/unit/test_layout.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from bootd.config import Config
from bootd.service.boot import BootService, CapsuleReader
from bootd.service.catalog import Catalog
from bootd.service.credentials import Credentials
from bootd.service.lifecycle import Lifecycle
from bootd.service.nodes import NodeAdmin
from bootd.service.overlays import OverlayService
from bootd.service.power import PowerService
from bootd.service.registry import RegistryService
from bootd.service.replica import Replica
from bootd.service.servers import Cluster, ServerAdmin


@dataclass(frozen=True, slots=True)
class Services:
    lifecycle: Lifecycle
    registry: RegistryService
    boot: BootService
    nodes: NodeAdmin
    credentials: Credentials
    capsules: CapsuleReader
    metrics: CollectorRegistry
    overlays: OverlayService
    catalog: Catalog
    servers: ServerAdmin
    # This server among those sharing the registry: cluster.live_urls() names every live server's public URL.
    cluster: Cluster
    power: PowerService
    replica: Replica | None = None  # capsule.upstream: missing objects come from another bootd

    def reload(self, config: Config) -> None:
        """Each service takes its own section; the next decision uses the new values."""
        self.lifecycle.reload(config.registry)
        self.registry.reload(config.registry)
        self.nodes.reload(config.registry)
        self.boot.reload(config)
        self.overlays.reload(config)
        self.catalog.reload(config)
        self.servers.reload(config)
        self.power.reload(config)
