"""HTTP transport (aiohttp): iPXE scripts, stage-one files, capsule objects, node API, metrics.

It moves bytes and calls services; the decisions (who may boot, which state,
what the script says, when bulk traffic must wait) live in ``bootd.service``.

Chunk streaming is the hot path of a boot storm.  aiohttp's FileResponse
stats, opens and closes every file in the default thread pool (three
executor round trips per request).  Content-addressed objects never change,
so this module keeps their open file objects and sizes in an LRU cache (as
nginx's ``open_file_cache`` does): a cache hit costs no system call.  A chunk
GET then writes its own header block under TCP_CORK and hands the body to
the kernel with one sendfile(2), leaving ``loop.sendfile`` only the part the
socket could not take at once.  Against aiohttp's prepare() + loop.sendfile
(``fast_sendfile=False``) that halves the Python CPU per request (bench/http).
Mutable files (stage one, NBPs) go through the same cache but are
re-validated with one ``stat`` per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client import CollectorRegistry

from bootd.capsule.manifest import KernelRef
from bootd.config import Config
from bootd.errors import CapsuleError
from bootd.metrics import HttpMetrics, NodeStateGauge
from bootd.net.files import (
    OCTET,
    CorruptObject,
    OpenFile,
    OpenFileCache,
    chunk_headers,
    etag_matches,
    object_headers,
    parse_range,
    response_head,
)
from bootd.net.http.chunkfast import ChunkFastPath, ChunkSite
from bootd.net.http.nodes import NodeRoutes
from bootd.net.http.send import CapsuleReader, SentResponse, refuse, sendfile_now
from bootd.service.admission import AdmissionControl, Overloaded
from bootd.service.registry import RegistryService
from bootd.service.scripts import (
    load_or_create_secret,
)

log = logging.getLogger("bootd.http")

_HEX64 = re.compile(r"[0-9a-f]{64}")
# One path segment of ordinary characters: no slashes (encoded or not), no leading dot, no "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}")
ROUTE_CHUNK = "/chunks/{hash}"


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
        registry_service: RegistryService,
        capsule_store: CapsuleReader,
        metrics_registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
        fast_sendfile: bool = True,
    ) -> None:
        self.config = config
        self.fast_sendfile = fast_sendfile
        self.registry = registry_service
        self.capsules = capsule_store
        self.metrics_registry = metrics_registry
        self.clock = clock
        self.metrics = HttpMetrics(metrics_registry)
        self.node_gauge = NodeStateGauge(metrics_registry)
        h = config.http
        self.admission = AdmissionControl(h.max_bulk_streams, h.bulk_queue, h.retry_after)
        self.metrics.bulk_gauges(metrics_registry, lambda: self.admission.active, lambda: self.admission.queued)
        self.files = OpenFileCache()
        self._kernels: OrderedDict[str, KernelRef | None] = OrderedDict()
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._bytes_children: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None
        self.fast_path: ChunkFastPath | None = None
        self._port = 0
        self.base_url = ""
        self.secret = b""
        self.admin_token = ""
        self.app = self._make_app()

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        state_dir = self.config.server.state_dir
        self.secret = load_or_create_secret(state_dir / "secret")
        self.admin_token = load_or_create_secret(state_dir / "admin-token").decode("ascii", "replace")
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False,
            shutdown_timeout=self.config.server.graceful_timeout,
        )
        await runner.setup()
        h = self.config.http
        site: web.TCPSite
        if self.fast_sendfile:
            self.fast_path = self._fast_path()
            site = ChunkSite(runner, h.listen, h.port, fast=self.fast_path, backlog=1024, reuse_address=True)
        else:
            site = web.TCPSite(runner, h.listen, h.port, backlog=1024, reuse_address=True)
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
        r.add_get("/capsules/{vid}/manifest", self._manifest)
        r.add_get("/capsules/{vid}/kernel", self._kernel)
        r.add_get(ROUTE_CHUNK, self._chunk)
        r.add_post("/api/v1/nodes/{name}/events", self._event)
        r.add_post("/api/v1/nodes/{name}/heartbeat", self._heartbeat)
        r.add_get("/api/v1/nodes/{name}/env", self._env)
        r.add_get("/api/v1/nodes", self._list_nodes)
        r.add_get("/api/v1/nodes/{name}", self._get_node)
        r.add_post("/api/v1/nodes/{name}", self._set_node)
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
            self._count(resource.canonical if resource is not None else "unmatched", request.method, status)

    def _count(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.metrics.requests.labels(
                route=route, method=method, status=str(status)
            )
        child.inc()

    # -- the chunk fast path (bootd/net/chunkfast.py) -----------------------------------------
    def _fast_path(self) -> ChunkFastPath:
        def acquire(name: str, path: Callable[[], Path | str], sha256: str) -> OpenFile:
            hits = self.files.hits
            entry = self.files.acquire(name, path, sha256=sha256)
            self._count_cache(hits)
            return entry

        def served(size: int) -> None:
            self._count(ROUTE_CHUNK, "GET", 200)
            self._sent(ROUTE_CHUNK, size)

        return ChunkFastPath(
            acquire=acquire, release=self.files.release, chunk_path=self.capsules.chunk_path,
            admit=self.admission.try_acquire, leave=self.admission.release, headers=chunk_headers,
            served=served, aborted=self.metrics.aborted.inc,
        )

    def _sent(self, route: str, n: int) -> None:
        child = self._bytes_children.get(route)
        if child is None:
            child = self._bytes_children[route] = self.metrics.bytes.labels(route=route)
        child.inc(n)

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
    ) -> web.StreamResponse:
        """Answer GET/HEAD for one file with ETag, conditional GET, single Range, and sendfile.

        ``verify``: the object is named by the sha256 of its bytes (chunks, kernels), so
        the file is checked against it when first opened.
        """
        try:
            entry = self.files.acquire(key, path, revalidate=not immutable, sha256=etag if verify else None)
        except CorruptObject as exc:
            self.metrics.corrupt.inc()
            log.error("event=corrupt-object key=%s error=%r (run `bootd capsule verify`)", key, str(exc))
            return refuse(500, f"{key} is corrupt on the server and is not served; the administrator must "
                               "re-import the capsule (bootd capsule verify names the bad chunks)")
        except FileNotFoundError:
            return refuse(404, f"no such object: {key}")
        except (IsADirectoryError, NotADirectoryError):
            return refuse(404, f"not a file: {key}")
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
                return await self._sendfile(request, route, entry, offset, count, status, headers)
            if request.method == "HEAD":
                # HEAD takes no slot, but reports the 503 a GET would get now: the stage one's busybox
                # wget hides an error reply's headers, so it asks with a HEAD to learn Retry-After.
                if self.admission.would_reject():
                    return self._busy(Overloaded(self.admission.retry_delay(), self.admission.active,
                                                 self.admission.queued))
                return await self._sendfile(request, route, entry, offset, count, status, headers)
            if not self.admission.try_acquire():
                started = time.monotonic()
                try:
                    await self.admission.acquire()
                except Overloaded as exc:
                    self.metrics.rejected.inc()
                    return self._busy(exc)
                self.metrics.queue_wait.observe(time.monotonic() - started)
            try:
                return await self._sendfile(request, route, entry, offset, count, status, headers)
            finally:
                self.admission.release()
        finally:
            self.files.release(entry)

    @staticmethod
    def _busy(exc: Overloaded) -> web.Response:
        return refuse(503, str(exc), {"Retry-After": str(exc.retry_after), "Cache-Control": "no-store"})

    async def _sendfile(
        self,
        request: web.Request,
        route: str,
        entry: OpenFile,
        offset: int,
        count: int,
        status: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        headers["Content-Type"] = OCTET
        if self.fast_sendfile and count and request.method == "GET":
            return await self._sendfile_raw(request, route, entry, offset, count, status, headers)
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = count
        try:
            await resp.prepare(request)
        except ConnectionError:
            # Gone while queued or before the headers: aiohttp's finish_response sees it again, quietly.
            self.metrics.aborted.inc()
            return resp
        if count and request.method != "HEAD":
            transport = request.transport
            try:
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("client went away before the body was sent")
                await request._loop.sendfile(transport, entry.file, offset, count)
            except (OSError, RuntimeError) as exc:
                self._aborted(resp, transport, entry, exc)
                return resp
            self._sent(route, count)
        await resp.write_eof()
        return resp

    def _aborted(
        self, resp: web.StreamResponse, transport: asyncio.Transport | None, entry: OpenFile, exc: BaseException
    ) -> None:
        """Headers promised the whole body: a short one must end the connection.

        A client that hangs up mid-transfer is routine (a node rebooted), not a server error.
        """
        log.debug("event=send-aborted object=%s reason=%r", entry.key, str(exc))
        self.metrics.aborted.inc()
        resp.force_close()
        if transport is not None:
            transport.close()

    async def _sendfile_raw(
        self,
        request: web.Request,
        route: str,
        entry: OpenFile,
        offset: int,
        count: int,
        status: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """The chunk fast path: one header write under TCP_CORK, then sendfile(2) straight away.

        Measured against aiohttp's own prepare() + ``loop.sendfile`` (bench/http, ``--plain``):
        aiohttp builds a CIMultiDict and serialises it per response, and ``loop.sendfile``
        always pauses reading, waits on a future for the write buffer to drain and re-arms
        the selector, even when the socket can take the whole chunk at once, which it
        usually can.  Here the header block is a few string joins, the body goes out with
        one sendfile(2) when it fits, and ``loop.sendfile`` only handles the rest.  Cork
        (nginx: tcp_nopush) makes the headers leave in the same segment as the body.
        """
        transport = request.transport
        resp = SentResponse(status)
        keep_alive = request.keep_alive
        resp.set_keep_alive(keep_alive)
        if transport is None or transport.is_closing():
            self.metrics.aborted.inc()
            resp.force_close()
            return resp
        connection = "close" if not keep_alive else "keep-alive" if request.version < (1, 1) else None
        head = response_head(status, headers, count, connection)
        sock = transport.get_extra_info("socket")
        try:
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            try:
                transport.write(head)
                sent = 0 if sock is None else sendfile_now(transport, sock.fileno(), entry.file, offset, count)
                if sent < count:
                    await request._loop.sendfile(transport, entry.file, offset + sent, count - sent)
            finally:
                if sock is not None and not transport.is_closing():
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except (OSError, RuntimeError) as exc:
            self._aborted(resp, transport, entry, exc)
            return resp
        self._sent(route, count)
        return resp

    def _count_cache(self, before_hits: int) -> None:
        if self.files.hits != before_hits:
            self.metrics.cache_hit.inc()
        else:
            self.metrics.cache_miss.inc()

    async def _chunk(self, request: web.Request) -> web.StreamResponse:
        h = request.match_info["hash"].lower()
        if _HEX64.fullmatch(h) is None:
            return refuse(400, "a chunk is named by its sha256: 64 hex digits")
        hits = self.files.hits
        try:
            return await self._serve(
                request, ROUTE_CHUNK, h, lambda: self.capsules.chunk_path(h), etag=h, immutable=True, bulk=True,
                verify=True,
            )
        finally:
            self._count_cache(hits)

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        vid = request.match_info["vid"].lower()
        if _HEX64.fullmatch(vid) is None:
            return refuse(400, "a capsule version id is a sha256: 64 hex digits")
        hits = self.files.hits
        try:
            return await self._serve(
                request, "/capsules/{vid}/manifest", "m:" + vid, lambda: self.capsules.manifest_path(vid),
                etag=vid, immutable=True,
            )
        finally:
            self._count_cache(hits)

    async def _kernel(self, request: web.Request) -> web.StreamResponse:
        vid = request.match_info["vid"].lower()
        if _HEX64.fullmatch(vid) is None:
            return refuse(400, "a capsule version id is a sha256: 64 hex digits")
        if vid not in self._kernels and not os.path.exists(self.capsules.manifest_path(vid)):
            return refuse(404, f"no capsule version {vid}")
        try:
            kernel = self._kernel_of(vid)
        except (CapsuleError, OSError) as exc:
            return refuse(500, f"cannot read the manifest of {vid}: {exc}")
        if kernel is None:
            return refuse(404, f"capsule version {vid} has no kernel; iPXE loads /stage1/vmlinuz instead")
        k = kernel.sha256
        return await self._serve(
            request, "/capsules/{vid}/kernel", "k:" + k, lambda: self.capsules.kernel_path(k),
            etag=k, immutable=True, verify=True,
        )

    def _kernel_of(self, vid: str) -> KernelRef | None:
        """Version ids are content hashes, so what a manifest says about its kernel is cached forever."""
        if vid in self._kernels:
            self._kernels.move_to_end(vid)
            return self._kernels[vid]
        kernel: KernelRef | None = self.capsules.load_manifest(vid).kernel
        self._kernels[vid] = kernel
        while len(self._kernels) > 256:
            self._kernels.popitem(last=False)
        return kernel

    async def _plain_file(self, request: web.Request, route: str, root: Path) -> web.StreamResponse:
        name = request.match_info["file"]
        if _SAFE_NAME.fullmatch(name) is None or ".." in name:
            return refuse(400, f"refused file name {name!r}: one path component of letters, digits, . _ + -")
        return await self._serve(request, route, f"{route}:{name}", lambda: root / name, etag=None,
                                 immutable=False)

    async def _stage1(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_file(request, "/stage1/{file}", self.config.boot.stage1_dir)

    async def _nbp(self, request: web.Request) -> web.StreamResponse:
        return await self._plain_file(request, "/nbp/{file}", self.config.tftp.nbp_dir)

