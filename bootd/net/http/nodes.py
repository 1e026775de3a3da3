"""The node and operator routes: iPXE scripts, lifecycle events, heartbeats, node env, the admin API, metrics.

A mixin of :class:`bootd.net.http.app.HttpServer` (the file routes and the
send path live beside it), so these handlers read the same server state.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable
from dataclasses import asdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bootd.capsule.manifest import KernelRef
from bootd.config import Config
from bootd.errors import BootdError, Conflict, NotFound, StoreError
from bootd.metrics import HttpMetrics, NodeStateGauge
from bootd.model import Machine, State, node_json, normalize_mac
from bootd.net.http.send import CapsuleReader, refuse
from bootd.service.registry import NODE_REPORTABLE, RegistryService
from bootd.service.scripts import (
    BootScript,
    check_node_token,
    node_token,
    render_boot_script,
    render_wait_script,
)

log = logging.getLogger("bootd.http")

ADMIN_FIELDS = ("capsule", "enabled", "approved", "kernel_args", "group")



class NodeRoutes:
    """The handlers; :class:`HttpServer` supplies the attributes declared here."""

    config: Config
    registry: RegistryService
    capsules: CapsuleReader
    metrics: HttpMetrics
    metrics_registry: CollectorRegistry
    node_gauge: NodeStateGauge
    clock: Callable[[], float]
    base_url: str
    secret: bytes
    admin_token: str
    _kernel_of: Callable[[str], KernelRef | None]

    # -- iPXE script ------------------------------------------------------------------------
    async def _script(self, request: web.Request) -> web.StreamResponse:
        try:
            mac = normalize_mac(request.match_info["mac"])
        except ValueError as exc:
            return refuse(400, str(exc))
        now = self.clock()
        result = await self.registry.decide(Machine(mac=mac, ipxe=True), now)
        if result.created:
            self.metrics.registrations.inc()
        node = result.node
        if node is None:
            log.info("event=refused proto=http mac=%s reason=%r", mac, result.reason)
            return self._ipxe(render_wait_script(mac, self.base_url, result.reason))
        capsule, node_args = await self.registry.boot_target(node)
        vid: str | None = None
        has_kernel = False
        if capsule is not None:
            try:
                vid = self.capsules.resolve(capsule)
                if vid is not None:
                    has_kernel = self._kernel_of(vid) is not None
            except (BootdError, OSError) as exc:
                reason = f"capsule {capsule!r} of node {node.name} cannot be read: {exc}"
                log.error("event=script-failed node=%s reason=%r", node.name, reason)
                return self._ipxe(render_wait_script(mac, self.base_url, reason))
            if vid is None:
                reason = f"capsule {capsule!r} of node {node.name} does not exist (bootd capsule list)"
                log.warning("event=script-refused node=%s reason=%r", node.name, reason)
                return self._ipxe(render_wait_script(mac, self.base_url, reason))
        if vid is not None and node.state is not State.PXE:
            # iPXE is running and about to load the stage one; the stage one itself reports `stage1`.
            await self.registry.report(node.name, State.PXE, "iPXE fetched its boot script", now=now)
        script = render_boot_script(BootScript(
            node=node, base_url=self.base_url, version_id=vid, has_kernel=has_kernel,
            boot_args=self.config.boot.kernel_args, node_args=node_args,
            token=node_token(self.secret, node.name),
        ))
        return self._ipxe(script)

    @staticmethod
    def _ipxe(text: str) -> web.Response:
        return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})

    # -- node API ---------------------------------------------------------------------------
    def _node_auth(self, request: web.Request, name: str) -> web.Response | None:
        if not check_node_token(self.secret, name, request.headers.get("X-Bootd-Token")):
            return refuse(403, f"missing or wrong X-Bootd-Token for node {name!r}")
        return None

    async def _event(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = self._node_auth(request, name)
        if denied is not None:
            return denied
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
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
        detail = {k: body[k] for k in ("done", "total") if isinstance(body.get(k), int)}
        try:
            node = await self.registry.report(
                name, state, reason, now=self.clock(), detail=json.dumps(detail) if detail else ""
            )
        except NotFound as exc:
            return refuse(404, str(exc))
        self.metrics.node_events.labels(event=state.value).inc()
        return web.json_response({"node": node.name, "state": node.state.value})

    async def _heartbeat(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        denied = self._node_auth(request, name)
        if denied is not None:
            return denied
        try:
            node = await self.registry.heartbeat(name, self.clock())
        except NotFound as exc:
            return refuse(404, str(exc))
        self.metrics.node_events.labels(event="heartbeat").inc()
        return web.json_response({"node": node.name, "state": node.state.value})

    async def _env(self, request: web.Request) -> web.StreamResponse:
        """The node's own key/values as KEY=VALUE lines, for the stage one's node.env.

        Keys that are not shell identifiers are left out (the stage one sources the
        file); values are one line each, so a newline in a value is replaced.
        """
        name = request.match_info["name"]
        denied = self._node_auth(request, name)
        if denied is not None:
            return denied
        node = await self.registry.store.get_node(name)
        if node is None:
            return refuse(404, f"no node named {name!r}")
        lines = [f"{k}={v.replace(chr(10), ' ')}" for k, v in sorted(node.vars.items())
                 if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
        return web.Response(text="".join(line + "\n" for line in lines), content_type="text/plain",
                            headers={"Cache-Control": "no-store"})

    async def _list_nodes(self, request: web.Request) -> web.StreamResponse:
        nodes = await self.registry.store.list_nodes()
        return web.json_response({"nodes": [node_json(n) for n in nodes]})

    async def _get_node(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        node = await self.registry.store.get_node(name)
        if node is None:
            return refuse(404, f"no node named {name!r}")
        events = await self.registry.store.events(name, 50)
        out = node_json(node)
        out["events"] = [asdict(e) for e in events]
        return web.json_response(out)

    async def _set_node(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        presented = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not presented or not hmac.compare_digest(presented.encode(), self.admin_token.encode()):
            return refuse(401, "admin writes need 'Authorization: Bearer <contents of state_dir/admin-token>'",
                          {"WWW-Authenticate": "Bearer"})
        name = request.match_info["name"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return refuse(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return refuse(400, "the body must be a JSON object")
        if body.pop("approve", False) is True:
            body["approved"] = True
        unknown = sorted(set(body) - set(ADMIN_FIELDS))
        if unknown:
            return refuse(400, f"cannot set {', '.join(unknown)}; settable: approve, {', '.join(ADMIN_FIELDS)}")
        try:
            node = await self.registry.store.update_node(name, **body)
            if body.get("enabled") is False and node.state is not State.DISABLED:
                node = await self.registry.report(name, State.DISABLED, "disabled by admin", now=self.clock())
        except NotFound as exc:
            return refuse(404, str(exc))
        except Conflict as exc:
            return refuse(409, str(exc))
        except StoreError as exc:
            return refuse(400, str(exc))
        return web.json_response(node_json(node))

    # -- ops --------------------------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.node_gauge.update(await self.registry.store.list_nodes())
        body = generate_latest(self.metrics_registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")
