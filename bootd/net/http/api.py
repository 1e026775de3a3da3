"""The admin API a front end drives: nodes in bulk, groups, capsules and their jobs, overlays.

A mixin of :class:`bootd.net.http.admin.AdminServer`, beside the node routes.
Each handler parses, calls one service and maps the service's refusal to a
status: the services (nodes, catalog) decide, so the API and the CLI refuse
the same request with the same words.  Every route here needs the admin
credential; the document at /api/v1/openapi.json describes them all and
tests/integration/test_api.py checks it against the router.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from bootd.errors import BootdError, CapsuleError, Conflict, NotFound, OverlayError, StoreError
from bootd.hostlist import compress
from bootd.net.http.send import refuse
from bootd.service.checks import Invalid
from bootd.service.jobs import JobQueueFull, JobRefused
from bootd.service.lifecycle import TransitionRefused
from bootd.service.services import Services

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BULK_MAX_BYTES = 4 * 1024 * 1024  # 10,000 lines of a bulk definition fit with room to spare


def _status(exc: BootdError) -> tuple[int, dict[str, str] | None]:
    if isinstance(exc, NotFound):
        return 404, None
    if isinstance(exc, (Conflict, TransitionRefused)):
        return 409, None
    if isinstance(exc, JobQueueFull):
        return 429, {"Retry-After": "30"}
    if isinstance(exc, (Invalid, JobRefused, StoreError, CapsuleError, OverlayError)):
        return 400, None
    return 500, None


async def _json_body(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    if empty_ok and not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Invalid("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    return body


class ApiRoutes:
    """Handlers; :class:`AdminServer` supplies ``services``, ``clock`` and ``_admin_auth``."""

    services: Services
    _admin_auth: Callable[[web.Request], web.Response | None]

    def _api(self, handler: Callable[[web.Request], Awaitable[Any]], status: int = 200) -> Handler:
        """Admin credential first; a service refusal becomes its status and one line of why."""
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if (denied := self._admin_auth(request)) is not None:
                return denied
            try:
                result = await handler(request)
            except BootdError as exc:
                code, headers = _status(exc)
                return refuse(code, str(exc), headers)
            if isinstance(result, web.StreamResponse):
                return result
            return web.json_response(result, status=status, dumps=lambda o: json.dumps(o, sort_keys=True))
        return wrapped

    def add_api_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/api/v1/nodes", self._api(self._nodes_create, 201))
        r.add_delete("/api/v1/nodes/{name}", self._api(self._nodes_delete))
        r.add_post("/api/v1/rename", self._api(self._rename))
        r.add_get("/api/v1/groups", self._api(self._groups))
        r.add_get("/api/v1/groups/{name}", self._api(self._group))
        r.add_put("/api/v1/groups/{name}", self._api(self._group_put))
        r.add_delete("/api/v1/groups/{name}", self._api(self._group_delete))
        r.add_get("/api/v1/capsules", self._api(self._capsules))
        r.add_get("/api/v1/capsules/{name}", self._api(self._capsule))
        r.add_delete("/api/v1/capsules/{name}", self._api(self._capsule_delete))
        r.add_post("/api/v1/capsules/{name}/import", self._api(self._capsule_import, 202))
        r.add_post("/api/v1/capsules/{name}/build", self._api(self._capsule_build, 202))
        r.add_post("/api/v1/gc", self._api(self._gc, 202))
        r.add_get("/api/v1/jobs", self._api(self._jobs))
        r.add_get("/api/v1/jobs/{id}", self._api(self._job))
        r.add_get("/api/v1/overlays", self._api(self._overlays))
        r.add_get("/api/v1/overlays/{name}", self._api(self._overlay_show))
        r.add_get("/api/v1/openapi.json", self._openapi)

    @staticmethod
    def _who(request: web.Request) -> str:
        return f"api:{request.remote}"

    # -- nodes ------------------------------------------------------------------------------
    async def _nodes_create(self, request: web.Request) -> dict[str, Any]:
        """A bulk definition: JSON {"nodes": [...]} or text lines; all or nothing, errors name the line."""
        if request.content_length is not None and request.content_length > BULK_MAX_BYTES:
            raise Invalid(f"the definition is {request.content_length} bytes; at most {BULK_MAX_BYTES}")
        raw = await request.content.read(BULK_MAX_BYTES + 1)
        if len(raw) > BULK_MAX_BYTES:
            raise Invalid(f"the definition is over {BULK_MAX_BYTES} bytes")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise Invalid("the definition must be UTF-8 text") from None
        body: str | list[Any] = text
        if request.content_type == "application/json":
            try:
                data = json.loads(text)
            except (ValueError, RecursionError):
                raise Invalid('the body must be JSON: {"nodes": [{"name": ..., "mac": ...}, ...]}') from None
            if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
                raise Invalid('the body must be JSON: {"nodes": [{"name": ..., "mac": ...}, ...]}')
            body = data["nodes"]
        added = await self.services.nodes.add_many(body, who=self._who(request))
        return {"added": len(added), "nodes": compress(added)}

    async def _nodes_delete(self, request: web.Request) -> dict[str, Any]:
        deleted = await self.services.nodes.delete(request.match_info["name"], who=self._who(request))
        return {"deleted": compress(deleted)}

    async def _rename(self, request: web.Request) -> dict[str, Any]:
        """A rename map (text: 'MAC|SERIAL|ASSET-TAG NEW-NAME' per line); all checked before any is applied."""
        raw = await request.content.read(BULK_MAX_BYTES + 1)
        if len(raw) > BULK_MAX_BYTES:
            raise Invalid(f"the map is over {BULK_MAX_BYTES} bytes")
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise Invalid("the map must be UTF-8 text") from None
        plan = await self.services.nodes.rename_map(text, who=self._who(request))
        return {"renamed": [{"from": old, "to": new} for old, new in plan]}

    # -- groups -----------------------------------------------------------------------------
    async def _groups(self, request: web.Request) -> list[dict[str, Any]]:
        return [dataclasses.asdict(g) | {"nodes": len(m)} for g, m in await self.services.nodes.groups()]

    async def _group(self, request: web.Request) -> dict[str, Any]:
        group, members = await self.services.nodes.group(request.match_info["name"])
        return dataclasses.asdict(group) | {"nodes": compress(members)}

    async def _group_put(self, request: web.Request) -> dict[str, Any]:
        """Create the group, or change the given fields of an existing one."""
        group = await self.services.nodes.put_group(request.match_info["name"], await _json_body(request),
                                                    create=None, who=self._who(request))
        return dataclasses.asdict(group)

    async def _group_delete(self, request: web.Request) -> dict[str, Any]:
        name = request.match_info["name"]
        await self.services.nodes.delete_group(name, who=self._who(request))
        return {"deleted": name}

    # -- capsules and jobs ------------------------------------------------------------------
    async def _capsules(self, request: web.Request) -> list[dict[str, Any]]:
        return await self.services.catalog.capsule_list()

    async def _capsule(self, request: web.Request) -> dict[str, Any]:
        return await self.services.catalog.capsule_show(request.match_info["name"])

    async def _capsule_delete(self, request: web.Request) -> dict[str, Any]:
        name = request.match_info["name"]
        vid = await self.services.catalog.capsule_delete(name, who=self._who(request))
        return {"deleted": name, "version": vid}

    async def _capsule_import(self, request: web.Request) -> web.Response:
        job = await self.services.catalog.submit_import(request.match_info["name"], await _json_body(request),
                                                        who=self._who(request))
        return _job_accepted(job.to_json())

    async def _capsule_build(self, request: web.Request) -> web.Response:
        job = await self.services.catalog.submit_build(request.match_info["name"], await _json_body(request),
                                                       who=self._who(request))
        return _job_accepted(job.to_json())

    async def _gc(self, request: web.Request) -> web.Response:
        job = await self.services.catalog.submit_gc(await _json_body(request, empty_ok=True), who=self._who(request))
        return _job_accepted(job.to_json())

    async def _jobs(self, request: web.Request) -> list[dict[str, Any]]:
        return [j.to_json() for j in await self.services.catalog.job_list()]

    async def _job(self, request: web.Request) -> dict[str, Any]:
        return (await self.services.catalog.job(request.match_info["id"])).to_json()

    # -- overlays ---------------------------------------------------------------------------
    async def _overlays(self, request: web.Request) -> list[dict[str, Any]]:
        return await self.services.catalog.overlay_list()

    async def _overlay_show(self, request: web.Request) -> dict[str, Any]:
        return await self.services.catalog.overlay_show(request.match_info["name"])

    # -- the document -----------------------------------------------------------------------
    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        """Public: it describes the routes and holds nothing secret (every route it lists needs the token)."""
        data = resources.files("bootd.net.http").joinpath("openapi.json").read_bytes()
        return web.Response(body=data, content_type="application/json")


def _job_accepted(job: dict[str, Any]) -> web.Response:
    return web.json_response(job, status=202, headers={"Location": f"/api/v1/jobs/{job['id']}"})
