"""Which components run, built from the configuration.

Kept apart from daemon.py so the lifecycle code (signals, shutdown, notify)
does not change each time a transport is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from bootd.daemon import Daemon


async def build(daemon: Daemon) -> None:
    """Append (name, component) pairs and background jobs to the daemon; start nothing."""
    cfg = daemon.config
    metrics = CollectorRegistry()
    daemon.extras["metrics"] = metrics
    registry = daemon.registry
    assert registry is not None, "the daemon builds the registry before the components"

    from bootd.capsule.store import CapsuleStore
    from bootd.service.health import HealthMonitor

    capsules = CapsuleStore(cfg.capsule.dir)
    capsules.ensure_layout()
    daemon.extras["capsules"] = capsules
    health = HealthMonitor(registry, cfg.registry)
    daemon.background.append(health.run)
    daemon.extras.setdefault("reload_hooks", []).append(lambda new: setattr(health, "config", new.registry))

    if cfg.tftp.enabled:
        from bootd.net.tftp import TftpServer

        cfg.tftp.root.mkdir(parents=True, exist_ok=True)
        daemon.components.append(("tftp", TftpServer(
            host=cfg.tftp.listen, port=cfg.tftp.port, roots=[cfg.tftp.root, cfg.tftp.nbp_dir],
            max_sessions=cfg.tftp.max_sessions, timeout=cfg.tftp.timeout, retries=cfg.tftp.retries,
            max_blksize=cfg.tftp.max_blksize, max_windowsize=cfg.tftp.max_windowsize,
            listen_interface=cfg.server.interface, registry=metrics,
        )))

    if cfg.http.enabled:
        from bootd.net.http import HttpServer

        http = HttpServer(cfg, registry, capsules, metrics)
        daemon.components.append(("http", http))
        # Boot settings (kernel arguments, file locations) apply to the next script served.
        daemon.extras["reload_hooks"].append(lambda new: setattr(http, "config", new))

    if cfg.dhcp.enabled:
        from bootd.net.dhcp import DhcpServer
        from bootd.service.dhcp import DhcpService

        dhcp_service = DhcpService.from_config(cfg, registry.store, registry)
        dhcp = DhcpServer(
            dhcp_service, listen=cfg.dhcp.listen, port=cfg.dhcp.port,
            proxy_port=cfg.dhcp.proxy_port if cfg.dhcp.mode == "proxy" else None,
            interface=cfg.dhcp.interface, queue_size=cfg.dhcp.queue_size, registry=metrics,
        )
        daemon.components.append(("dhcp", dhcp))
        # [dhcp] and [boot] apply to the next packet; dhcp.reload logs what needs a restart.
        daemon.extras["reload_hooks"].append(dhcp.reload)
