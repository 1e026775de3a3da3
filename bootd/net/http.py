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
import email.utils
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from bootd.capsule.manifest import KernelRef
from bootd.config import Config
from bootd.errors import BootdError, CapsuleError, Conflict, NotFound, StoreError
from bootd.metrics import HttpMetrics, NodeStateGauge
from bootd.model import Machine, Node, State, normalize_mac
from bootd.net.chunkfast import ChunkFastPath, ChunkSite, sendfile_now
from bootd.service.admission import AdmissionControl, Overloaded
from bootd.service.registry import NODE_REPORTABLE, RegistryService
from bootd.service.scripts import (
    BootScript,
    check_node_token,
    load_or_create_secret,
    node_token,
    render_boot_script,
    render_wait_script,
)

log = logging.getLogger("bootd.http")

IMMUTABLE = "public, max-age=31536000, immutable"
OCTET = "application/octet-stream"
_HEX64 = re.compile(r"[0-9a-f]{64}")
# One path segment of ordinary characters: no slashes (encoded or not), no leading dot, no "..".
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}")
ADMIN_FIELDS = ("capsule", "enabled", "approved", "kernel_args", "group")
ROUTE_CHUNK = "/chunks/{hash}"


class CapsuleReader(Protocol):
    """The part of bootd.capsule.store.CapsuleStore this transport reads."""

    def resolve(self, name: str) -> str | None: ...
    def manifest_path(self, vid: str) -> Path: ...
    def chunk_path(self, hexhash: str) -> Path: ...
    def kernel_path(self, hexhash: str) -> Path: ...
    def load_manifest(self, vid: str) -> Any: ...


# ---------------------------------------------------------------------------------------------
# open file cache


class OpenFile:
    """A cached open file; ``refs`` counts responses using it so eviction never closes it mid-send."""

    __slots__ = ("checked", "evicted", "file", "ident", "key", "path", "refs", "size")

    def __init__(self, key: str, path: str, file: IO[bytes], st: os.stat_result, now: float) -> None:
        self.key = key
        self.path = path
        self.file = file
        self.size = st.st_size
        self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self.refs = 0
        self.evicted = False
        self.checked = now

    @property
    def etag(self) -> str:
        _, ino, size, mtime = self.ident
        return f'"{ino:x}-{size:x}-{mtime:x}"'


class CorruptObject(OSError):
    """A content-addressed file whose bytes no longer hash to its name."""


class OpenFileCache:
    """LRU of open files keyed by object name.

    ``valid`` is how long an entry of an immutable object is trusted before one
    ``stat`` checks the path still names the same file (garbage collection may
    delete a chunk; a re-import may recreate it).  ``revalidate=True`` lookups
    (mutable files) stat on every request and reopen when the file changed.
    All calls are synchronous: open/fstat of a local file take microseconds,
    far less than a thread-pool hop.
    """

    def __init__(self, max_entries: int = 2048, valid: float = 60.0) -> None:
        self.max_entries = max_entries
        self.valid = valid
        self._entries: OrderedDict[str, OpenFile] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, key: str, path: Callable[[], Path | str], *, revalidate: bool = False,
                sha256: str | None = None) -> OpenFile:
        """Return an open file for ``key`` (refcount taken); raises OSError like open() would.

        With ``sha256``, a file is hashed when it is opened (once per cache entry,
        not per request) and refused with CorruptObject when it does not match:
        a content-addressed object that rotted on disk is never served as valid.
        """
        entry = self._entries.get(key)
        now = time.monotonic()
        if entry is not None and (revalidate or now - entry.checked > self.valid):
            if not self._still_valid(entry):
                self._drop(entry)
                entry = None
            else:
                entry.checked = now
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        else:
            self.misses += 1
            entry = self._open(key, str(path()), now, sha256)
        entry.refs += 1
        return entry

    def release(self, entry: OpenFile) -> None:
        entry.refs -= 1
        if entry.evicted and entry.refs <= 0:
            entry.file.close()

    def close(self) -> None:
        for entry in list(self._entries.values()):
            self._drop(entry)

    def _still_valid(self, entry: OpenFile) -> bool:
        try:
            st = os.stat(entry.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == entry.ident

    def _open(self, key: str, path: str, now: float, sha256: str | None = None) -> OpenFile:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(f"{path} is not a regular file")
            file = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - lives in the cache
        except BaseException:
            os.close(fd)
            raise
        if sha256 is not None:
            got = hashlib.file_digest(file, "sha256").hexdigest()
            if got != sha256:
                file.close()
                raise CorruptObject(f"{path} is corrupt on the server: its sha256 is {got}")
        entry = OpenFile(key, path, file, st, now)
        old = self._entries.get(key)
        if old is not None:
            self._drop(old)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            _, oldest = self._entries.popitem(last=False)
            self._retire(oldest)
        return entry

    def _drop(self, entry: OpenFile) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self._retire(entry)

    def _retire(self, entry: OpenFile) -> None:
        entry.evicted = True
        if entry.refs <= 0:
            entry.file.close()


# ---------------------------------------------------------------------------------------------
# helpers


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One byte range as (start, count); None means "ignore Range, send it all".

    Multiple ranges and malformed headers are ignored (RFC 9110 allows it; a
    chunk is small, and nobody needs multipart/byteranges).  An unsatisfiable
    range raises ValueError so the caller can answer 416.
    """
    if not header.startswith("bytes=") or "," in header:
        return None
    first, sep, last = header[6:].strip().partition("-")
    if not sep:
        return None
    first, last = first.strip(), last.strip()
    if (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:
        if not last:
            return None
        n = int(last)
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        n = min(n, size)
        return size - n, n
    start = int(first)
    end = int(last) if last else max(start, size - 1)
    if end < start:
        return None
    if start >= size:
        raise ValueError("range starts past the end")
    end = min(end, size - 1)
    return start, end - start + 1


def etag_matches(header: str, etag: str) -> bool:
    """If-None-Match uses weak comparison: W/"x" matches "x"."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def refuse(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Every refusal says why: the body is one line of plain text."""
    return web.Response(status=status, text=message + "\n", headers=headers)


def node_json(node: Node) -> dict[str, Any]:
    out = asdict(node)
    out["state"] = node.state.value
    return out


def effective_base(public_url: str, port: int) -> str:
    """The URL nodes use; a configured port 0 (tests) is replaced by the port actually bound."""
    parts = urlsplit(public_url)
    if parts.port == 0:
        host = parts.hostname or "127.0.0.1"
        parts = parts._replace(netloc=f"{host}:{port}")
    return urlunsplit(parts).rstrip("/")


class _SentResponse(web.StreamResponse):
    """A response whose bytes the handler already wrote to the transport itself.

    aiohttp calls prepare() and write_eof() on whatever a handler returns; both
    are no-ops here, and ``keep_alive`` tells it whether the connection goes on.
    """

    def __init__(self, status: int) -> None:
        super().__init__(status=status)

    def set_keep_alive(self, keep_alive: bool) -> None:
        self._keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_date_cache: tuple[int, str] = (0, "")


def object_headers(tag: str, immutable: bool) -> dict[str, str]:
    """The caching headers of every file response (ETag, then Cache-Control and Accept-Ranges)."""
    return {"ETag": tag, "Cache-Control": IMMUTABLE if immutable else "no-cache", "Accept-Ranges": "bytes"}


def response_head(status: int, headers: dict[str, str], count: int, connection: str | None = None) -> bytes:
    """The header block of a 200/206 whose body is written straight to the socket after it.

    A few string joins instead of aiohttp's CIMultiDict serialisation (bench/http).
    """
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Partial Content'}"]
    lines.extend(f"{k}: {v}" for k, v in headers.items())
    lines.append(f"Content-Length: {count}\r\nDate: {http_date()}\r\nServer: bootd")
    if connection is not None:
        lines.append(f"Connection: {connection}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1")


def chunk_headers(name: str, size: int) -> bytes:
    """The header block of a whole-chunk 200: the same bytes as the route's (bootd/net/chunkfast.py)."""
    return response_head(200, {**object_headers(f'"{name}"', True), "Content-Type": OCTET}, size)


def http_date() -> str:
    """IMF-fixdate of now, formatted once per second (it is on every response)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


# ---------------------------------------------------------------------------------------------
# server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpServer:
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
        resp = _SentResponse(status)
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
        kernel: KernelRef | None = None
        if capsule is not None:
            try:
                vid = self.capsules.resolve(capsule)
                if vid is not None:
                    kernel = self._kernel_of(vid)
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
            node=node, base_url=self.base_url, version_id=vid, has_kernel=kernel is not None,
            modules=kernel.modules if kernel is not None else None,
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

