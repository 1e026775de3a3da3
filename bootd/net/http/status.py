"""The live status page on the admin listener: the page, its JSON, and its server-sent event stream.

Every asset comes from bootd (``static/``, read once at start; no CDN, no
build step).  The page logs in once with a credential and then holds a
session cookie (bootd/service/sessions.py decides who may read and act);
it loads one snapshot of every node (``/status/api/nodes``) and then
applies the updates the lifecycle publishes on its bus
(bootd/service/events.py), streamed as server-sent events.  The stream sends
``hello`` first (the page then fetches the snapshot: anything published
after the subscription is queued, so nothing falls between the two) and
``resync`` when the page fell too far behind (it fetches the snapshot again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from bootd.config import Config
from bootd.errors import Conflict, NotFound
from bootd.hostlist import HostlistError, expand
from bootd.net.http.send import refuse
from bootd.service.checks import Invalid
from bootd.service.events import PROGRESS_FIELDS, EventBus, TooManySubscribers, state_update
from bootd.service.lifecycle import TransitionRefused
from bootd.service.services import Services
from bootd.service.sessions import Refused, Session, Sessions

log = logging.getLogger("bootd.http")

STATIC = Path(__file__).with_name("static")
ASSETS = {"status.html": "text/html", "status.css": "text/css", "status.js": "text/javascript"}
COOKIE = "bootd_session"
KEEPALIVE = 15.0  # a comment line this often keeps proxies from closing an idle stream
WRITE_TIMEOUT = 30.0  # a stream whose client stopped reading for this long is closed
MAX_HOSTLIST = 100_000
COLUMNS = ("name", "group", "state", "reason", "since", "contact", "approved")
HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


class StatusPage:
    """The routes under /status; ``register`` adds them to the admin listener's application."""

    def __init__(self, config: Config, services: Services, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.services = services
        self.bus: EventBus = services.lifecycle.events
        self.sessions = Sessions(services.credentials, config.admin)
        self.secure = config.admin.tls_cert is not None
        self.assets = {name: (STATIC / name).read_bytes() for name in ASSETS}
        self._reading: asyncio.Future[dict[str, Any]] | None = None

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/status", self._page)
        r.add_get("/status/static/{file}", self._asset)
        r.add_post("/status/api/login", self._login)
        r.add_post("/status/api/logout", self._logout)
        r.add_get("/status/api/session", self._session)
        r.add_get("/status/api/nodes", self._nodes)
        r.add_get("/status/api/hostlist", self._hostlist)
        r.add_get("/status/api/nodes/{name}/timeline", self._timeline)
        r.add_post("/status/api/nodes/{name}/approve", self._approve)
        r.add_get("/status/api/events", self._events)
        app.on_shutdown.append(self._shutdown)

    def reload(self, config: Config) -> None:
        self.config = config
        self.sessions.reload(config.admin)

    async def _shutdown(self, app: web.Application) -> None:
        self.bus.close()  # every stream ends now, not at the listener's grace timeout

    # -- helpers ------------------------------------------------------------------------------
    def _who(self, request: web.Request) -> Session | web.Response:
        try:
            return self.sessions.get(request.cookies.get(COOKIE))
        except Refused as exc:
            return refuse(exc.status, str(exc))

    def _act(self, request: web.Request) -> Session | web.Response:
        """A write: JSON only (a cross-site form cannot send it), same origin, the session's CSRF token."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return refuse(403, f"refused: the request comes from another origin ({origin})")
        try:
            return self.sessions.authorize_action(request.cookies.get(COOKIE), request.headers.get("X-CSRF-Token"))
        except Refused as exc:
            return refuse(exc.status, str(exc))

    @staticmethod
    def _json(data: Any, status: int = 200) -> web.Response:
        resp = web.json_response(data, status=status, headers=HEADERS)
        resp.enable_compression()
        return resp

    # -- page and assets ------------------------------------------------------------------------
    async def _page(self, request: web.Request) -> web.StreamResponse:
        return self._asset_response("status.html")

    async def _asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in ASSETS or name == "status.html":
            return refuse(404, f"no such asset: {name}")
        return self._asset_response(name)

    def _asset_response(self, name: str) -> web.Response:
        resp = web.Response(body=self.assets[name], content_type=ASSETS[name], charset="utf-8", headers=HEADERS)
        resp.enable_compression()
        return resp

    # -- login ------------------------------------------------------------------------------------
    async def _login(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return refuse(415, "log in with a JSON body: {\"token\": \"<credential>\"}")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("token"), str):
            return refuse(400, "log in with a JSON body: {\"token\": \"<credential>\"}")
        try:
            session = self.sessions.login(body["token"])
        except Refused as exc:
            log.warning("event=status-login-refused peer=%s", request.remote)
            return refuse(exc.status, str(exc))
        log.info("event=status-login role=%s peer=%s", session.role, request.remote)
        resp = self._json({"role": session.role, "csrf": session.csrf})
        resp.set_cookie(COOKIE, session.id, path="/status", httponly=True, samesite="Strict", secure=self.secure,
                        max_age=int(self.sessions.idle))
        return resp

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(COOKIE)
        try:
            self.sessions.check_csrf(sid, request.headers.get("X-CSRF-Token"))
        except Refused as exc:
            return refuse(exc.status, str(exc))
        self.sessions.logout(sid)
        resp = self._json({"logged_out": True})
        resp.del_cookie(COOKIE, path="/status")
        return resp

    async def _session(self, request: web.Request) -> web.StreamResponse:
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        return self._json({"role": who.role, "csrf": who.csrf})

    # -- reads --------------------------------------------------------------------------------------
    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        """Every node, as rows of COLUMNS (5,000 nodes are ~340 KB of JSON, ~25 KB compressed)."""
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        # One store read serves every page asking at the same time (wall screens resyncing in a boot
        # storm must not queue reads of the whole registry on the store's one thread).
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._snapshot())
            self._reading.add_done_callback(self._read_done)
        return self._json(await asyncio.shield(self._reading))

    def _read_done(self, task: asyncio.Future[dict[str, Any]]) -> None:
        self._reading = None
        if not task.cancelled():
            task.exception()  # retrieved: the waiters got it

    async def _snapshot(self) -> dict[str, Any]:
        seq = self.bus.published  # before the read: the page refetches if its stream subscribed later
        nodes = await self.services.nodes.select()
        # Times to 0.1 s, rounded down: an update of the same change (its exact time) is never "older".
        rows = [[n.name, n.group, n.state.value, n.reason, math.floor(n.state_since * 10) / 10,
                 math.floor(n.last_contact * 10) / 10, n.approved] for n in nodes]
        progress = {name: [p.get(k) for k in PROGRESS_FIELDS] for name, p in self.bus.progress.items()}
        return {"seq": seq, "now": self.clock(), "columns": COLUMNS, "rows": rows, "progress": progress,
                "progress_columns": PROGRESS_FIELDS}

    async def _hostlist(self, request: web.Request) -> web.StreamResponse:
        """The names of a hostlist, so the page filters with the one parser bootd has (and its errors)."""
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        expr = request.query.get("expr", "")
        try:
            names = expand(expr)
        except HostlistError as exc:
            return refuse(400, f"bad hostlist: {exc}")
        if len(names) > MAX_HOSTLIST:
            return refuse(400, f"the hostlist names {len(names)} nodes; the page filters by at most {MAX_HOSTLIST}")
        return self._json({"names": names})

    async def _timeline(self, request: web.Request) -> web.StreamResponse:
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        try:
            view = await self.services.nodes.show(request.match_info["name"], events=200)
        except NotFound as exc:
            return refuse(404, str(exc))
        node = state_update(view.node)
        node.update({"mac": view.node.mac, "ip": view.node.ip, "capsule": view.node.capsule,
                     "first_contact": view.node.first_contact})
        events = [{"ts": e.ts, "state": e.state, "reason": e.reason, "detail": e.detail} for e in view.events]
        # The stage one's commissioning report (bootd/service/inventory.py), bounded when it was stored.
        # And the node agent's last heartbeat report (memory, root, image RAM), kept in memory by the lifecycle.
        return self._json({"node": node, "events": events, "inventory": view.inventory, "usage": view.usage})

    # -- actions --------------------------------------------------------------------------------------
    async def _approve(self, request: web.Request) -> web.StreamResponse:
        who = self._act(request)
        if isinstance(who, web.Response):
            return who
        name = request.match_info["name"]
        try:
            [node] = await self.services.nodes.approve(name, who=f"status:{request.remote}")
        except NotFound as exc:
            return refuse(404, str(exc))
        except (Conflict, TransitionRefused) as exc:
            return refuse(409, str(exc))
        except Invalid as exc:
            return refuse(400, str(exc))
        return self._json(state_update(node))

    # -- the stream -----------------------------------------------------------------------------------
    async def _events(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(COOKIE)
        who = self._who(request)
        if isinstance(who, web.Response):
            return who
        return await self.stream(request, who.role, lambda: self.sessions.get(sid))

    async def stream(self, request: web.Request, role: str, still_valid: Callable[[], object]) -> web.StreamResponse:
        """The node updates as server-sent events: the page's stream, and /api/v1/events for programs.

        ``still_valid`` raises Refused when the credential behind the stream ends (a
        page's session logged out or expired), which ends the stream.
        """
        try:
            sub = self.bus.subscribe()
        except TooManySubscribers as exc:
            return refuse(503, str(exc), {"Retry-After": "10"})
        resp = web.StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            hello = json.dumps({"seq": self.bus.published, "role": role})
            await resp.write(b"retry: 3000\nevent: hello\ndata: " + hello.encode() + b"\n\n")
            while True:
                await sub.wait(KEEPALIVE)
                if sub.closed:
                    break
                still_valid()  # a page logged out or expired: the stream ends (Refused)
                if sub.take_resync():
                    payload = b"event: resync\ndata: {}\n\n"
                else:
                    batch = sub.take()  # all that came while the last write went out: one message
                    payload = b"data: " + json.dumps(batch, separators=(",", ":")).encode() + b"\n\n" if batch \
                        else b": keepalive\n\n"
                await asyncio.wait_for(resp.write(payload), WRITE_TIMEOUT)
        except (Refused, ConnectionError, TimeoutError, RuntimeError) as exc:
            log.debug("event=status-stream-end peer=%s why=%r", request.remote, str(exc))
        finally:
            self.bus.unsubscribe(sub)
        return resp
