"""The admin API on its own listener (``[admin]``: localhost by default, optionally TLS).

The node-facing listener is on the provisioning LAN, where anyone can listen;
the admin token must never cross it in clear.  So the admin routes are not
served there at all (they answer with where the admin API is), and this
listener binds to localhost unless the administrator chooses an address, and
then should give it a certificate.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from bootd.config import Config
from bootd.metrics import HttpMetrics
from bootd.net.http import power
from bootd.net.http.nodes import NodeRoutes
from bootd.service.services import Services

log = logging.getLogger("bootd.http")

ADMIN_ROUTES = ("/api/v1/nodes", "/api/v1/nodes/{name}", *power.ROUTES)


class AdminServer(NodeRoutes):
    def __init__(self, config: Config, services: Services, metrics: HttpMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.services = services
        self.metrics = metrics
        self.clock = clock
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.base_url = ""
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_get("/api/v1/nodes", self._list_nodes)
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        app.router.add_post("/api/v1/nodes/{name}", self._set_node)
        power.register(app, services, self._admin_auth)
        self.app = app

    def reload(self, config: Config) -> None:
        self.config = config

    def _tls(self) -> ssl.SSLContext | None:
        a = self.config.admin
        if a.tls_cert is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(a.tls_cert, a.tls_key)
        return ctx

    async def start(self) -> None:
        a = self.config.admin
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.config.server.graceful_timeout)
        await runner.setup()
        tls = self._tls()
        site = web.TCPSite(runner, a.listen, a.port, ssl_context=tls, backlog=128, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.base_url = f"{'https' if tls else 'http'}://{a.listen}:{self.port}"
        log.info("event=listening proto=admin address=%s port=%d tls=%s", a.listen, self.port, tls is not None)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def elsewhere(config: Config) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The public listener's answer to an admin path: where the admin API is, not the API."""
    a = config.admin

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text=f"the admin API is not served on this listener; it listens on "
                                             f"{a.listen}:{a.port} ([admin] in the configuration)\n")

    return handler
