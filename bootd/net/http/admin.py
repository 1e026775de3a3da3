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
from bootd.net.http.api import ApiRoutes
from bootd.net.http.nodes import NodeRoutes
from bootd.net.http.status import StatusPage
from bootd.service.services import Services

log = logging.getLogger("bootd.http")

# Answered on the public listener with where the admin API is (tests/integration/test_api.py checks
# that this names every admin route).
ADMIN_ROUTES = ("/api/v1/nodes", "/api/v1/nodes/{name}", "/api/v1/rename", "/api/v1/groups", "/api/v1/groups/{name}",
                "/api/v1/capsules", "/api/v1/capsules/{name}", "/api/v1/capsules/{name}/import",
                "/api/v1/capsules/{name}/build", "/api/v1/gc", "/api/v1/jobs", "/api/v1/jobs/{id}",
                "/api/v1/overlays", "/api/v1/overlays/{name}", "/api/v1/openapi.json",
                "/api/v1/servers", "/api/v1/events", "/status",
                *power.ROUTES)


class AdminServer(NodeRoutes, ApiRoutes):
    def __init__(self, config: Config, services: Services, metrics: HttpMetrics, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.services = services
        self.metrics = metrics
        self.clock = clock
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.base_url = ""
        app = web.Application(client_max_size=256 * 1024)  # bulk node definitions read their own body
        app.router.add_get("/api/v1/nodes", self._list_nodes)
        app.router.add_get("/api/v1/nodes/{name}", self._get_node)
        app.router.add_post("/api/v1/nodes/{name}", self._set_node)
        app.router.add_get("/api/v1/servers", self._list_servers)
        self.add_api_routes(app)
        self.status = StatusPage(config, services, clock=clock)  # the live status page: /status
        self.status.register(app)
        app.router.add_get("/api/v1/events", self._events_api)
        power.register(app, services, self._admin_auth)
        self.app = app

    async def _events_api(self, request: web.Request) -> web.StreamResponse:
        """The node updates (state changes, contacts, fetch progress) as server-sent events, for programs."""
        if (denied := self._admin_auth(request)) is not None:
            return denied
        return await self.status.stream(request, "admin", lambda: None)

    async def _list_servers(self, request: web.Request) -> web.StreamResponse:
        """The servers sharing this registry, alive or not, with their share of the clients (bootd server list)."""
        if (denied := self._admin_auth(request)) is not None:
            return denied
        views = await self.services.servers.list(self.clock())
        return web.json_response({"servers": [v.as_json() for v in views]})

    def reload(self, config: Config) -> None:
        self.config = config
        self.status.reload(config)

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
