"""The power routes of the admin API: ``POST /api/v1/power`` and ``PUT /api/v1/bmc/{NODE|@GROUP}/password``.

They parse, call bootd.service.power (the same service ``bootd power``
runs) and answer; what a request may ask and every refusal's words are the
service's.  A power job answers when every node has a result (each bounded by
``power.timeout``); the number of jobs at once is bounded too (503 beyond).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from bootd.errors import NotFound
from bootd.net.http.send import refuse
from bootd.service.checks import Invalid
from bootd.service.power import PowerBusy
from bootd.service.services import Services

ROUTES = ("/api/v1/power", "/api/v1/bmc/{target}/password")
POWER_KEYS = ("hostlist", "action", "pxe", "stagger", "parallel")
RETRY_AFTER = "5"

Auth = Callable[[web.Request], "web.Response | None"]


class PowerRoutes:
    def __init__(self, services: Services, auth: Auth) -> None:
        self.services = services
        self.auth = auth

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):
            return refuse(400, "the body must be a JSON object")
        if not isinstance(body, dict):
            return refuse(400, "the body must be a JSON object")
        return body

    async def power(self, request: web.Request) -> web.StreamResponse:
        if (denied := self.auth(request)) is not None:
            return denied
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        unknown = sorted(str(k) for k in body if k not in POWER_KEYS)
        if unknown:
            return refuse(400, f"unknown key(s) {', '.join(unknown)}; expected: {', '.join(POWER_KEYS)}")
        hostlist, action = body.get("hostlist"), body.get("action")
        if not isinstance(hostlist, str) or not hostlist:
            return refuse(400, "hostlist: expected a hostlist such as \"n[0001-0100]\"")
        if not isinstance(action, str):
            return refuse(400, "action: expected one of on, off, cycle, reset, status")
        pxe = body.get("pxe", False)
        if not isinstance(pxe, bool):
            return refuse(400, f"pxe: expected true or false, got {pxe!r}")
        try:
            results = await self.services.power.run(hostlist, action, who=f"api:{request.remote}", pxe=pxe,
                                                    stagger=body.get("stagger"), parallel=body.get("parallel"))
        except Invalid as exc:
            return refuse(400, str(exc))
        except NotFound as exc:
            return refuse(404, str(exc))
        except PowerBusy as exc:
            return refuse(503, str(exc), {"Retry-After": RETRY_AFTER})
        failed = sum(1 for r in results if not r.ok)
        return web.json_response({"action": action, "ok": len(results) - failed, "failed": failed,
                                  "results": [r.as_json() for r in results]})

    async def set_password(self, request: web.Request) -> web.StreamResponse:
        if (denied := self.auth(request)) is not None:
            return denied
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if set(body) != {"password"} or not isinstance(body["password"], str):
            return refuse(400, "the body must be {\"password\": \"...\"} and nothing else")
        try:
            what = await self.services.power.set_password(request.match_info["target"], body["password"],
                                                          who=f"api:{request.remote}")
        except Invalid as exc:
            return refuse(400, str(exc))
        except NotFound as exc:
            return refuse(404, str(exc))
        return web.json_response({"set": what})  # what was set, never the value


def register(app: web.Application, services: Services, auth: Auth) -> None:
    routes = PowerRoutes(services, auth)
    app.router.add_post(ROUTES[0], routes.power)
    app.router.add_put(ROUTES[1], routes.set_password)
