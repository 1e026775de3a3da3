"""HTTP transport (aiohttp): the server, its routes, and file serving (stage one, NBPs, capsule objects).

It moves bytes and calls services; the decisions (who may boot, which state,
what the script says, when bulk traffic must wait) live in ``bootd.service``.
The node and operator routes are in ``nodes.py``.

Chunk streaming is the hot path of a boot storm.  aiohttp's FileResponse
stats, opens and closes every file in the default thread pool (three
executor round trips per request); here files come from the open-file cache
(bootd/net/files.py), where a hit costs no system call, and every 200/206
leaves through the one send path of ``send.py``: our own header block, then
sendfile(2) straight away.  Plain whole-chunk GETs do not even reach aiohttp's
request machinery (``chunkfast.py``).  ``fast_sendfile=False`` (bench/http
``--plain``) turns the fast path and the inline sendfile off, for A/B runs.
Mutable files (stage one, NBPs) go through the same cache but are
re-validated with one ``stat`` per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from bootd.capsule.manifest import HEX64
from bootd.config import Config
from bootd.errors import CapsuleError
from bootd.metrics import HttpBoundsMetrics, HttpMetrics, NodeStateGauge
from bootd.net.files import (
    OCTET,
    CorruptObject,
    OpenFile,
    OpenFileCache,
    OutsideRoot,
    etag_matches,
    object_headers,
    parse_range,
    resolve_beneath,
    response_head,
)
from bootd.net.http.admin import ADMIN_ROUTES, elsewhere
from bootd.net.http.bounds import BACKLOG, ConnectionBounds, descriptor_budget
from bootd.net.http.chunkfast import ChunkFastPath, ChunkRequestHandler, ChunkSite
from bootd.net.http.nodes import NodeRoutes
from bootd.net.http.send import ROUTE_CHUNK, Sender, SentResponse, refuse
from bootd.service.admission import AdmissionControl, Overloaded
from bootd.service.replica import UpstreamError
from bootd.service.services import Services

log = logging.getLogger("bootd.http")

# One path segment of ordinary characters: no slashes (encoded or not), no leading dot, no "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}")


def effective_base(public_url: str, port: int) -> str:
    """The URL nodes use; a configured port 0 (tests) is replaced by the port actually bound."""
    parts = urlsplit(public_url)
    if parts.port == 0:
        host = parts.hostname or "127.0.0.1"
        parts = parts._replace(netloc=f"{host}:{port}")
    return urlunsplit(parts).rstrip("/")


# ---------------------------------------------------------------------------------------------
# server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer(NodeRoutes):
    def __init__(
        self,
        config: Config,
        services: Services,
        *,
        clock: Callable[[], float] = time.time,
        fast_sendfile: bool = True,
    ) -> None:
        self.config = config
        self.fast_sendfile = fast_sendfile
        self.services = services
        self.capsules = services.capsules
        self.metrics_registry = services.metrics
        self.clock = clock
        self.metrics = HttpMetrics(services.metrics)
        self.node_gauge = NodeStateGauge(services.metrics)
        h = config.http
        self.bounds_metrics = HttpBoundsMetrics(services.metrics, lambda: self.bounds.limits.open)
        self.bounds = ConnectionBounds(config, self.bounds_metrics)
        self.admission = AdmissionControl(h.max_bulk_streams, h.bulk_queue, h.retry_after,
                                          per_source=h.bulk_per_source, queue_per_source=h.bulk_queue_per_source,
                                          trusted=self.bounds.trusted)
        self.metrics.bulk_gauges(services.metrics, lambda: self.admission.active, lambda: self.admission.queued)
        self.files = OpenFileCache()
        self.sender = Sender(self.metrics, self.files, send_timeout=h.send_timeout, bounds=self.bounds_metrics,
                             inline=fast_sendfile)
        self._runner: web.AppRunner | None = None
        self.fast_path: ChunkFastPath | None = None
        self._port = 0
        self.base_url = ""
        self.app = self._make_app()

    def reload(self, config: Config) -> None:
        """File locations and kernel arguments apply to the next request; listeners need a restart."""
        self.config = config

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self.services.credentials.load()
        h = self.config.http
        self.bounds = ConnectionBounds(self.config, self.bounds_metrics, max_connections=descriptor_budget(self.config))
        # aiohttp's parser bounds a request line and each header; max_header_bytes (bounds.py) the whole block.
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False,
            shutdown_timeout=self.config.server.graceful_timeout, keepalive_timeout=h.idle_timeout,
            max_line_size=8190, max_field_size=8190, max_headers=100,
        )
        await runner.setup()
        if self.fast_sendfile:
            self.fast_path = ChunkFastPath(self.sender, self.capsules, self.admission)
        site = ChunkSite(runner, h.listen, h.port, fast=self.fast_path, bounds=self.bounds, backlog=BACKLOG,
                         reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self.base_url = effective_base(h.public_url, self._port)
        log.info("event=listening proto=http address=%s port=%d base=%s", h.listen, self._port, self.base_url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.files.close()

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_middleware], client_max_size=256 * 1024)
        r = app.router
        r.add_get("/boot/{mac}.ipxe", self._script)
        r.add_get("/stage1/{file}", self._stage1)
        r.add_get("/nbp/{file}", self._nbp)
        r.add_get("/capsules/refs", self._refs)
        r.add_get("/capsules/{vid}/manifest", self._manifest)
        r.add_get("/capsules/{vid}/kernel", self._kernel)
        r.add_get(ROUTE_CHUNK, self._chunk)
        r.add_post("/api/v1/nodes/{name}/events", self._event)
        r.add_post("/api/v1/nodes/{name}/heartbeat", self._heartbeat)
        r.add_get("/api/v1/nodes/{name}/env", self._env)
        r.add_post("/api/v1/nodes/{name}/inventory", self._inventory)
        r.add_get("/api/v1/nodes/{name}/overlay/{kind}", self._overlay)
        refuse_here = elsewhere(self.config)  # the admin API has its own listener (bootd/net/http/admin.py)
        for path in ADMIN_ROUTES:
            r.add_route("*", path, refuse_here)
        r.add_get("/metrics", self._metrics)
        r.add_get("/healthz", self._healthz)
        return app

    # -- metrics middleware -----------------------------------------------------------------
    @web.middleware
    async def _count_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            resource = request.match_info.route.resource
            self.sender.count(resource.canonical if resource is not None else "unmatched", request.method, status)

    # -- file serving -----------------------------------------------------------------------
    async def _serve(
        self,
        request: web.Request,
        route: str,
        key: str,
        path: Callable[[], Path | str],
        *,
        etag: str | None,
        immutable: bool,
        bulk: bool = False,
        verify: bool = False,
        root: str | None = None,
        fetch: Callable[[], Awaitable[object]] | None = None,
    ) -> web.StreamResponse:
        """Answer GET/HEAD for one file with ETag, conditional GET, single Range, and sendfile.

        ``verify``: the object is named by the sha256 of its bytes (chunks, kernels), so
        the file is checked against it when first opened.  ``fetch``: the replica service's way
        to make a missing object present (capsule.upstream); its refusal is passed on.
        """
        try:
            try:
                entry = await self.sender.open_verified(key, path, revalidate=not immutable,
                                                        sha256=etag if verify else None, root=root)
            except FileNotFoundError:
                if fetch is None:
                    raise
                await fetch()
                entry = await self.sender.open_verified(key, path, revalidate=not immutable,
                                                        sha256=etag if verify else None, root=root, join=False)
        except UpstreamError as exc:
            return self._upstream_refused(exc)
        except CorruptObject as exc:
            self.metrics.corrupt.inc()
            log.error("event=corrupt-object key=%s error=%r (run `bootd capsule verify`)", key, str(exc))
            return refuse(500, f"{key} is corrupt on the server and is not served; the administrator must "
                               "re-import the capsule (bootd capsule verify names the bad chunks)")
        except FileNotFoundError:
            return refuse(404, f"no such object: {key}")
        except (IsADirectoryError, NotADirectoryError):
            return refuse(404, f"not a file: {key}")
        except OutsideRoot:
            self.metrics.outside_root.inc()
            log.warning("event=outside-root key=%s (a symlink leads out of the served directory)", key)
            return refuse(403, f"refused: {key} leads outside the directory bootd serves it from")
        except PermissionError:
            return refuse(403, f"bootd may not read {key}")
        try:
            tag = f'"{etag}"' if etag else entry.etag
            headers = object_headers(tag, immutable)
            inm = request.headers.get("If-None-Match")
            if inm is not None and etag_matches(inm, tag):
                return web.Response(status=304, headers=headers)
            size = entry.size
            offset, count, status = 0, size, 200
            rng = request.headers.get("Range")
            if rng is not None:
                if_range = request.headers.get("If-Range")
                if if_range is None or if_range.strip() == tag:
                    try:
                        part = parse_range(rng, size)
                    except ValueError:
                        headers["Content-Range"] = f"bytes */{size}"
                        return refuse(416, f"range {rng!r} is outside the {size} bytes of {key}", headers)
                    if part is not None:
                        offset, count = part
                        status = 206
                        headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
            if not bulk or count == 0:
                return await self._send(request, route, entry, offset, count, status, headers)
            protocol = request.protocol
            source = protocol.source if isinstance(protocol, ChunkRequestHandler) else (request.remote or "")
            if request.method == "HEAD":
                # HEAD takes no slot, but reports the 503 a GET would get now: the stage one's busybox
                # wget hides an error reply's headers, so it asks with a HEAD to learn Retry-After.
                if self.admission.would_reject(source):
                    return self._busy(Overloaded(self.admission.retry_delay(), self.admission.active,
                                                 self.admission.queued))
                return await self._send(request, route, entry, offset, count, status, headers)
            if not self.admission.try_acquire(source):
                started = time.monotonic()
                try:
                    await self.admission.acquire(source)
                except Overloaded as exc:
                    self.metrics.rejected.inc()
                    self.bounds_metrics.bulk_refused.labels(reason=exc.reason).inc()
                    return self._busy(exc)
                self.metrics.queue_wait.observe(time.monotonic() - started)
            try:
                return await self._send(request, route, entry, offset, count, status, headers)
            finally:
                self.admission.release(source)
        finally:
            self.files.release(entry)

    @staticmethod
    def _upstream_refused(exc: UpstreamError) -> web.Response:
        headers = {"Cache-Control": "no-store"}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return refuse(exc.status, str(exc), headers)

    @staticmethod
    def _busy(exc: Overloaded) -> web.Response:
        return refuse(503, str(exc), {"Retry-After": str(exc.retry_after), "Cache-Control": "no-store"})

    async def _send(
        self,
        request: web.Request,
        route: str,
        entry: OpenFile,
        offset: int,
        count: int,
        status: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """A 200/206 (GET or HEAD) through the one send path (bootd/net/http/send.py)."""
        headers["Content-Type"] = OCTET
        resp = SentResponse(status)
        keep_alive = request.keep_alive
        resp.set_keep_alive(keep_alive)
        connection = "close" if not keep_alive else "keep-alive" if request.version < (1, 1) else None
        head = response_head(status, headers, count, connection)
        body = 0 if request.method == "HEAD" else count
        transport = request.transport
        protocol = request.protocol
        sock = protocol.raw_socket if isinstance(protocol, ChunkRequestHandler) else None
        try:
            await self.sender.send(transport, sock, head, entry, offset, body)
        except (OSError, RuntimeError) as exc:
            self.sender.abort(transport, entry.key, exc)
            resp.force_close()
            return resp
        if body:
            self.sender.sent(route, body)
        return resp

    async def _chunk(self, request: web.Request) -> web.StreamResponse:
        h = request.match_info["hash"].lower()
        if HEX64.fullmatch(h) is None:
            return refuse(400, "a chunk is named by its sha256: 64 hex digits")
        replica = self.services.replica
        return await self._serve(
            request, ROUTE_CHUNK, h, lambda: self.capsules.chunk_path(h), etag=h, immutable=True, bulk=True,
            verify=True, fetch=None if replica is None else lambda: replica.chunk(h),
        )

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        vid = request.match_info["vid"].lower()
        if HEX64.fullmatch(vid) is None:
            return refuse(400, "a capsule version id is a sha256: 64 hex digits")
        replica = self.services.replica
        return await self._serve(
            request, "/capsules/{vid}/manifest", "m:" + vid, lambda: self.capsules.manifest_path(vid),
            etag=vid, immutable=True, fetch=None if replica is None else lambda: replica.manifest(vid),
        )

    async def _kernel(self, request: web.Request) -> web.StreamResponse:
        vid = request.match_info["vid"].lower()
        if HEX64.fullmatch(vid) is None:
            return refuse(400, "a capsule version id is a sha256: 64 hex digits")
        replica = self.services.replica
        if not os.path.exists(self.capsules.manifest_path(vid)):
            if replica is None:
                return refuse(404, f"no capsule version {vid}")
            try:
                await replica.manifest(vid)
            except UpstreamError as exc:
                return self._upstream_refused(exc)
        try:
            kernel = self.services.boot.kernel_of(vid)
        except (CapsuleError, OSError) as exc:
            return refuse(500, f"cannot read the manifest of {vid}: {exc}")
        if kernel is None:
            return refuse(404, f"capsule version {vid} has no kernel; iPXE loads /stage1/vmlinuz instead")
        k = kernel.sha256
        return await self._serve(
            request, "/capsules/{vid}/kernel", "k:" + k, lambda: self.capsules.kernel_path(k),
            etag=k, immutable=True, verify=True, fetch=None if replica is None else lambda: replica.kernel(vid),
        )

    async def _refs(self, request: web.Request) -> web.StreamResponse:
        """Capsule names and their versions: what ``bootd capsule sync`` on a replica asks its peer."""
        try:
            names = await asyncio.to_thread(self.capsules.names)
        except CapsuleError as exc:
            return refuse(500, f"cannot list capsules: {exc}")
        return web.json_response(names, headers={"Cache-Control": "no-store"})

    async def _plain_file(self, request: web.Request, route: str, root: Path) -> web.StreamResponse:
        name = request.match_info["file"]
        if _SAFE_NAME.fullmatch(name) is None or ".." in name:
            return refuse(400, f"refused file name {name!r}: one path component of letters, digits, . _ + -")
        try:
            real_root, real = resolve_beneath(root, name)
        except OutsideRoot:
            self.metrics.outside_root.inc()
            log.warning("event=outside-root route=%s file=%r (a symlink leads out of %s)", route, name, root)
            return refuse(403, f"refused: {name!r} leads outside the directory bootd serves it from")
        return await self._serve(request, route, f"{route}:{name}", lambda: real, etag=None, immutable=False,
                                 root=real_root)

    async def _stage1(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_file(request, "/stage1/{file}", self.config.boot.stage1_dir)

    async def _nbp(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_file(request, "/nbp/{file}", self.config.tftp.nbp_dir)

