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

    if cfg.tftp.enabled:
        from bootd.net.tftp import TftpServer

        cfg.tftp.root.mkdir(parents=True, exist_ok=True)
        daemon.components.append(("tftp", TftpServer(
            host=cfg.tftp.listen, port=cfg.tftp.port, roots=[cfg.tftp.root, cfg.tftp.nbp_dir],
            max_sessions=cfg.tftp.max_sessions, timeout=cfg.tftp.timeout, retries=cfg.tftp.retries,
            max_blksize=cfg.tftp.max_blksize, max_windowsize=cfg.tftp.max_windowsize,
            listen_interface=cfg.server.interface, registry=metrics,
        )))
