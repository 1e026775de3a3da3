"""The node and operator routes: iPXE scripts, lifecycle events, heartbeats, node env, the admin API, metrics.

A mixin of :class:`bootd.net.http.app.HttpServer` (the file routes and the
send path live beside it), so these handlers read the same server state.
They parse, call a service and answer: the boot decision is
bootd.service.boot's, state changes the lifecycle table's, node changes
bootd.service.nodes', credentials bootd.service.credentials'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bootd.errors import Conflict, NotFound, OverlayError, StoreError
from bootd.metrics import HttpMetrics, NodeStateGauge
from bootd.model import State, node_json, normalize_mac
from bootd.net.files import etag_matches
from bootd.net.http.send import refuse
from bootd.service.checks import Invalid
from bootd.service.inventory import MAX_BYTES as MAX_INVENTORY
from bootd.service.inventory import BadInventory
from bootd.service.lifecycle import MAX_HEARTBEAT, NODE_REPORTABLE, Actor, TransitionRefused, reported
from bootd.service.services import Services

log = logging.getLogger("bootd.http")
PAGE, MAX_PAGE = 1000, 10_000  # nodes per page of GET /api/v1/nodes (?limit=, ?after=NAME)


class NodeRoutes:
    """The handlers; :class:`HttpServer` supplies the attributes declared here."""

    services: Services
    metrics: HttpMetrics
    metrics_registry: CollectorRegistry
    node_gauge: NodeStateGauge
    clock: Callable[[], float]
    base_url: str

    # -- iPXE script ------------------------------------------------------------------------
    async def _script(self, request: web.Request) -> web.StreamResponse:
        try:
            mac = normalize_mac(request.match_info["mac"])
        except ValueError as exc:
            return refuse(400, str(exc))
        answer = await self.services.boot.script(mac, self.base_url, self.clock(), peer=request.remote,
                                                 asset=request.query.get("asset"))
        if answer.created:
            self.metrics.registrations.inc()
        return self._ipxe(answer.text)

    @staticmethod
    def _ipxe(text: str) -> web.Response:
        return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})

    # -- node API ---------------------------------------------------------------------------
    async def _node_auth(self, request: web.Request, name: str) -> web.Response | None:
        try:
            ok = await self.services.credentials.check_node(name, request.headers.get("X-Bootd-Token"), self.clock())
        except NotFound as exc:
            return refuse(404, str(exc))
        if not ok:
            return refuse(403, f"missing or wrong X-Bootd-Token for node {name!r}")
        return None

    async def _event(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = await self._node_auth(request, name)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            return refuse(400, "the body must be JSON: {\"event\": \"<state>\", \"reason\": \"...\"}")
        if not isinstance(body, dict):
            return refuse(400, "the body must be a JSON object")
        try:
            state = State(str(body.get("event", "")))
        except ValueError:
            state = None
        if state not in NODE_REPORTABLE:
            allowed = ", ".join(sorted(s.value for s in NODE_REPORTABLE))
            return refuse(400, f"event {body.get('event')!r} is not one a node may report; use one of {allowed}")
        assert state is not None
        reason = str(body.get("reason", ""))[:500]
        # Progress (done, total) and what the node agent measures (memory in use, its root) go to the timeline.
        detail = reported(body)
        try:
            node = await self.services.lifecycle.change(
                name, state, reason, actor=Actor.NODE, now=self.clock(), detail=json.dumps(detail) if detail else ""
            )
        except NotFound as exc:
            return refuse(404, str(exc))
        except TransitionRefused as exc:
            return refuse(409, str(exc))
        self.metrics.node_events.labels(event=state.value).inc()
        return web.json_response({"node": node.name, "state": node.state.value})

    async def _heartbeat(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = await self._node_auth(request, name)
        if denied is not None:
            return denied
        # The node agent's usage report; one byte over the bound tells the lifecycle it was too long.
        report = await request.content.read(MAX_HEARTBEAT + 1)
        try:
            node = await self.services.lifecycle.heartbeat(name, self.clock(), report)
        except NotFound as exc:
            return refuse(404, str(exc))
        except TransitionRefused as exc:
            return refuse(409, str(exc))
        self.metrics.node_events.labels(event="heartbeat").inc()
        return web.json_response({"node": node.name, "state": node.state.value})

    async def _inventory(self, request: web.Request) -> web.StreamResponse:
        """The stage one's commissioning report (inventory.sh), with the node's own credential."""
        name = request.match_info["name"]
        denied = await self._node_auth(request, name)
        if denied is not None:
            return denied
        raw = await request.content.read(MAX_INVENTORY + 1)
        try:
            data = await self.services.nodes.report_inventory(name, raw, self.clock())
        except NotFound as exc:
            return refuse(404, str(exc))
        except BadInventory as exc:
            return refuse(400, f"inventory: {exc}")
        return web.json_response({"node": name, "nics": len(data["nics"]), "disks": len(data["disks"])})

    async def _env(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = await self._node_auth(request, name)
        if denied is not None:
            return denied
        try:
            text = await self.services.boot.node_env(name)
        except NotFound as exc:
            return refuse(404, str(exc))
        return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})

    def _admin_auth(self, request: web.Request) -> web.Response | None:
        """Admin routes (reads included: node variables hold site secrets) need the admin token."""
        auth = request.headers.get("Authorization", "")
        presented = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not self.services.credentials.check_admin(presented):
            return refuse(401, "admin routes need 'Authorization: Bearer <contents of state_dir/admin-token>'",
                          {"WWW-Authenticate": "Bearer"})
        return None

    async def _overlay(self, request: web.Request) -> web.StreamResponse:
        """The node's rendered overlays of one kind (a tar), for its own credential only; 304 when unchanged."""
        name = request.match_info["name"]
        denied = await self._node_auth(request, name)
        if denied is not None:
            return denied
        try:
            rendered = await self.services.overlays.render(name, request.match_info["kind"], self.clock())
        except NotFound as exc:
            return refuse(404, str(exc))
        except OverlayError as exc:
            log.error("event=overlay-render-failed node=%s error=%r", name, str(exc))
            return refuse(500, f"cannot render the overlays of {name}: {exc}")
        headers = {"ETag": rendered.etag, "Cache-Control": "no-store"}
        inm = request.headers.get("If-None-Match")
        if inm is not None and etag_matches(inm, rendered.etag):
            return web.Response(status=304, headers=headers)
        return web.Response(body=rendered.data, content_type="application/x-tar", headers=headers)

    async def _list_nodes(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._admin_auth(request)) is not None:
            return denied
        # Paged, so a 10,000-node registry never means one huge answer built on the event loop.
        try:
            limit = int(request.query.get("limit", PAGE))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_PAGE:
            return refuse(400, f"limit: expected an integer from 1 to {MAX_PAGE}")
        after = request.query.get("after", "")
        page = await self.services.nodes.page(after, limit)
        return web.json_response({"nodes": [node_json(n) for n in page],
                                  "next": page[-1].name if len(page) == limit else None})

    async def _get_node(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._admin_auth(request)) is not None:
            return denied
        try:
            view = await self.services.nodes.show(request.match_info["name"])
        except NotFound as exc:
            return refuse(404, str(exc))
        out = node_json(view.node)
        out["events"] = [asdict(e) for e in view.events]
        out["inventory"] = view.inventory
        out["usage"] = view.usage
        return web.json_response(out)

    async def _set_node(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._admin_auth(request)) is not None:
            return denied
        name = request.match_info["name"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            return refuse(400, "the body must be a JSON object")
        try:
            [node] = await self.services.nodes.change(name, body, self.clock(), who=f"api:{request.remote}")
        except NotFound as exc:
            return refuse(404, str(exc))
        except (Conflict, TransitionRefused) as exc:
            return refuse(409, str(exc))
        except (Invalid, StoreError) as exc:
            return refuse(400, str(exc))
        return web.json_response(node_json(node))

    # -- ops --------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.node_gauge.update(await self.services.nodes.select())
        body = generate_latest(self.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        status = await self.services.registry.store_health()
        if not status.healthy:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status.down_since or time.time()))
            return web.Response(status=503, text=f"registry unreachable: {status.url} since {since} "
                                                 f"({status.failures} failures): {status.last_error}\n")
        return web.Response(text="ok\n")
