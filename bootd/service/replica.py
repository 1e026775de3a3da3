"""A replica: capsule objects this server lacks are fetched from its upstream bootd on first request.

Chunks, kernels and manifests are immutable and named by the sha256 of their bytes, so any copy can
serve them and a copy from anywhere is as good as the original once it hashes to its name.  That is
why a replica needs no copy step and no trust in its upstream: each object is fetched once (however
many nodes ask for it at once), bounded in size, verified by hash, stored atomically
(bootd.capsule.objects.ObjectWriter) and only then served.  Bytes that fail are never stored, and the
node is told why (502), so it goes to its next source.

Bounds: at most ``capsule.upstream_connections`` fetches at once, each within
``capsule.upstream_timeout`` seconds and the object's declared size (a chunk's size in a manifest
this server holds; a manifest at most MANIFEST_LIMIT).  A chunk that no held manifest names is not
fetched: the stage one always asks for its manifest first, so only a stranger asks for such a chunk,
and a replica must not be a way to make its upstream serve arbitrary names.

``sync`` warms a replica ahead of a boot storm: whole capsules, published under their names only once
every object is there (an interrupted sync leaves verified objects that the next run reuses, never a
half capsule).  Before any sync, a node's capsule NAME is resolved from the upstream (``resolve``: its
``GET /capsules/refs``, asked once per REFS_TTL seconds however many nodes boot at once) and the
version's manifest fetched and verified; the name is not published here, since only a sync makes the
capsule whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter

from bootd.capsule.manifest import KernelRef, Manifest, is_hex_digest
from bootd.capsule.objects import CapsuleStore, ObjectWriter, Staging, check_name
from bootd.errors import BootdError, CapsuleError

log = logging.getLogger("bootd.replica")

MANIFEST_LIMIT = 64 * 1024 * 1024  # 40 bytes a chunk: over a million chunks
REFS_LIMIT = 4 * 1024 * 1024
REFS_TTL = 5.0  # seconds an upstream's names are trusted for boot scripts: one refs request per storm


class UpstreamError(BootdError):
    """An object could not come from upstream; ``status`` is what the node is answered (404, 502, 503)."""

    def __init__(self, message: str, status: int = 502, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Upstream(Protocol):
    """The HTTP client of one peer (bootd.net.upstream): it moves bytes and decides nothing.

    ``get`` hands the body to ``sink`` piece by piece and raises UpstreamError with the peer's status
    (``status`` 0: no answer at all); a sink that raises stops the transfer with its error.
    """

    url: str

    async def get(self, path: str, sink: Callable[[bytes], None], *, limit: int, timeout: float) -> None: ...
    async def close(self) -> None: ...


class UpstreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.fetches = Counter("bootd_upstream_fetches", "Objects asked of the upstream bootd, by kind (refs: its "
                               "capsule names) and result (fetched, missing, refused, corrupt, busy, failed)",
                               ["kind", "result"],
                               registry=registry)
        self.bytes = Counter("bootd_upstream_bytes", "Verified bytes stored from the upstream bootd, by kind",
                             ["kind"], registry=registry)
        self.shared = Counter("bootd_upstream_shared_waits", "Requests that waited for a fetch another request "
                              "had already started (single-flight)", registry=registry)


@dataclass
class SyncReport:
    """What ``bootd capsule sync`` did for one capsule."""

    name: str
    version: str
    chunks: int = 0
    fetched: int = 0  # objects fetched now (chunks, kernel, manifest)
    present: int = 0  # objects that were here already (a warm store or an interrupted sync)
    fetched_bytes: int = 0
    seconds: float = 0.0
    published: bool = False  # False: the name already pointed at this version
    errors: list[str] = field(default_factory=list)


class Replica:
    """Fetch-on-miss for one capsule store from one upstream; see the module docstring."""

    def __init__(self, store: CapsuleStore, upstream: Upstream, *, connections: int = 8, timeout: float = 30.0,
                 max_object: int = 256 * 1024 * 1024, metrics: CollectorRegistry | None = None) -> None:
        self.store = store
        self.upstream = upstream
        self.timeout = timeout
        self.max_object = max_object
        self.metrics = UpstreamMetrics(metrics if metrics is not None else CollectorRegistry())
        self._slots = asyncio.Semaphore(connections)
        self._flights: dict[tuple[str, str], asyncio.Task[int]] = {}
        self._staging: Staging | None = None
        self._sizes: dict[str, int | None] = {}  # chunk -> declared size (None: a kernel's modules archive)
        self._indexed: set[str] = set()
        self._indexed_mtime = -1  # of the manifests directory when it was last read (a new manifest changes it)
        # One reader of the manifests at a time: a second request (its own thread) must wait for the index
        # the first is building, not take the mtime it already noted for "indexed" and refuse a listed chunk.
        self._index_lock = threading.Lock()
        self._resolved: dict[str, str] = {}  # name -> the version last logged as resolved from the upstream
        self._refs: tuple[float, dict[str, str]] | None = None  # (when fetched, the upstream's names)
        self._refs_flight: asyncio.Task[dict[str, str]] | None = None

    @property
    def url(self) -> str:
        return self.upstream.url

    async def start(self) -> None:
        """Nothing listens; the store's layout and this process's staging directory are made here, off the
        event loop (the staging directory is created under the store lock, which a gc may hold a while)."""
        await asyncio.to_thread(self._staging_dir)

    async def close(self) -> None:
        if self._refs_flight is not None:
            self._refs_flight.cancel()
            await asyncio.gather(self._refs_flight, return_exceptions=True)
        for task in list(self._flights.values()):
            task.cancel()
        if self._flights:
            await asyncio.gather(*self._flights.values(), return_exceptions=True)
        await self.upstream.close()
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    # -- what the HTTP routes ask ---------------------------------------------------------------
    async def manifest(self, vid: str) -> Manifest:
        """The manifest of ``vid``, fetched first if this store lacks it."""
        if not is_hex_digest(vid):
            raise UpstreamError(f"{vid!r} is not a capsule version id (64 lowercase hex digits)", 400)
        if not os.path.exists(self.store.manifest_path(vid)):
            await self._fetch("manifest", vid, f"/capsules/{vid}/manifest", None, MANIFEST_LIMIT)
        try:
            manifest = await asyncio.to_thread(self.store.load_manifest, vid)
        except CapsuleError as exc:
            raise UpstreamError(str(exc), 500) from None
        self._index(vid, manifest)
        return manifest

    async def resolve(self, name: str) -> str | None:
        """The version the upstream's capsule ``name`` points to (None: it has no such name), with its
        manifest fetched and verified here, so a boot script can name it and its kernel.

        Names are read from the upstream's ``GET /capsules/refs``, once for all the nodes that ask within
        REFS_TTL seconds; an unreachable upstream raises UpstreamError (the node is told why and waits)."""
        refs = self._refs
        if refs is None or time.monotonic() - refs[0] > REFS_TTL:
            if self._refs_flight is None:
                self._refs_flight = asyncio.get_running_loop().create_task(self._fetch_refs())
                self._refs_flight.add_done_callback(self._refs_landed)
            else:
                self.metrics.shared.inc()
            await asyncio.shield(self._refs_flight)
            refs = self._refs
            assert refs is not None
        vid = refs[1].get(name)
        if vid is not None:
            await self.manifest(vid)
            if self._resolved.get(name) != vid:  # once per name and version, not once per node's script
                self._resolved[name] = vid
                log.info("event=upstream-resolved name=%s version=%s url=%s", name, vid, self.upstream.url)
        return vid

    async def _fetch_refs(self) -> dict[str, str]:
        try:
            refs = await self.peer_refs()
        except UpstreamError as exc:
            self.metrics.fetches.labels(kind="refs", result="failed").inc()
            log.warning("event=upstream-failed kind=refs url=%s error=%r", self.upstream.url, str(exc))
            raise UpstreamError(f"not here, and the upstream's names could not be read "
                                f"({self.upstream.url}/capsules/refs: {exc})", exc.status, exc.retry_after) from None
        self.metrics.fetches.labels(kind="refs", result="fetched").inc()
        self._refs = (time.monotonic(), refs)
        return refs

    def _refs_landed(self, task: asyncio.Task[dict[str, str]]) -> None:
        self._refs_flight = None
        if not task.cancelled():
            task.exception()  # retrieved: each waiter got it already

    async def kernel(self, vid: str) -> KernelRef | None:
        """The kernel of capsule ``vid``, fetched (with its manifest) if this store lacks it."""
        kernel = (await self.manifest(vid)).kernel
        if kernel is not None and not os.path.exists(self.store.kernel_path(kernel.sha256)):
            await self._fetch("kernel", kernel.sha256, f"/capsules/{vid}/kernel", kernel.size, kernel.size)
        return kernel

    async def chunk(self, hexhash: str) -> None:
        """Make chunk ``hexhash`` present, if a manifest this store holds names it."""
        if os.path.exists(self.store.chunk_path(hexhash)):
            return
        if hexhash not in self._sizes:
            await asyncio.to_thread(self._index_all)
        if hexhash not in self._sizes:
            self.metrics.fetches.labels(kind="chunk", result="refused").inc()
            raise UpstreamError(f"chunk {hexhash} is not here, and no capsule manifest this replica holds names "
                                "it (a replica fetches a chunk from its upstream only after the manifest that "
                                "lists it: GET /capsules/VERSION/manifest first)", 404)
        size = self._sizes[hexhash]
        await self._fetch("chunk", hexhash, f"/chunks/{hexhash}", size, size if size is not None else self.max_object)

    # -- the index of declared sizes ------------------------------------------------------------
    def _index(self, vid: str, manifest: Manifest) -> None:
        if vid in self._indexed:
            return
        for c in manifest.chunks:
            self._sizes[c.sha256] = c.stored_size
        kernel = manifest.kernel
        if kernel is not None and kernel.modules is not None:
            self._sizes.setdefault(kernel.modules, None)
        self._indexed.add(vid)

    def _index_all(self) -> None:
        """Read the manifests not indexed yet (blocking: called off the event loop); one stat when none is new."""
        with self._index_lock:
            try:
                mtime = os.stat(self.store.manifests_dir).st_mtime_ns
            except FileNotFoundError:
                return
            if mtime == self._indexed_mtime:
                return
            for vid in self.store.versions():
                if vid not in self._indexed:
                    try:
                        self._index(vid, self.store.load_manifest(vid))
                    except CapsuleError as exc:
                        log.warning("event=replica-index-skipped version=%s error=%r", vid, str(exc))
                        self._indexed.add(vid)
            self._indexed_mtime = mtime  # only now: the index is whole up to this mtime

    # -- single flight ---------------------------------------------------------------------------
    async def _fetch(self, kind: str, name: str, path: str, size: int | None, limit: int) -> int:
        """Fetch one object, once however many ask at the same time; the bytes its flight stored (0: none)."""
        key = (kind, name)
        task = self._flights.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_once(kind, name, path, size, limit))
            self._flights[key] = task
            task.add_done_callback(lambda t: (self._flights.pop(key, None), t.cancelled() or t.exception()))
        else:
            self.metrics.shared.inc()
        # A node that hangs up must not cancel the fetch the other nodes are waiting for.
        return await asyncio.shield(task)

    def _staging_dir(self) -> Staging:
        if self._staging is None:
            self._staging = self.store.begin_import()
        return self._staging

    async def _fetch_once(self, kind: str, name: str, path: str, size: int | None, limit: int) -> int:
        where = f"{self.upstream.url}{path}"
        count = self.metrics.fetches
        async with self._slots:
            if os.path.exists(self.store.object_path(kind, name)):
                return 0  # placed meanwhile (a sync, or another server process on this store)
            staging = self._staging if self._staging is not None else await asyncio.to_thread(self._staging_dir)
            writer = ObjectWriter(staging, kind, name, limit, size)
            started = time.monotonic()
            try:
                await self.upstream.get(path, writer.write, limit=writer.limit, timeout=self.timeout)
                stored = await asyncio.to_thread(writer.commit)
            except UpstreamError as exc:
                if exc.status == 404:
                    count.labels(kind=kind, result="missing").inc()
                    raise UpstreamError(f"{kind} {name} is neither here nor on the upstream ({where}: {exc})",
                                        404) from None
                if exc.status == 503:
                    count.labels(kind=kind, result="busy").inc()
                    raise UpstreamError(f"the upstream is busy ({where}: {exc}); retry later", 503,
                                        exc.retry_after) from None
                count.labels(kind=kind, result="failed").inc()
                log.warning("event=upstream-failed kind=%s name=%s url=%s error=%r", kind, name, where, str(exc))
                raise UpstreamError(f"{kind} {name} is not here and could not be fetched from the upstream "
                                    f"({where}: {exc})") from None
            except CapsuleError as exc:
                count.labels(kind=kind, result="corrupt").inc()
                log.error("event=upstream-corrupt kind=%s name=%s url=%s error=%r", kind, name, where, str(exc))
                raise UpstreamError(f"the upstream sent bad bytes for {kind} {name} ({where}): {exc}") from None
            finally:
                writer.abort()
        count.labels(kind=kind, result="fetched").inc()
        self.metrics.bytes.labels(kind=kind).inc(writer.received)
        log.info("event=upstream-fetched kind=%s name=%s bytes=%d seconds=%.3f", kind, name, writer.received,
                 time.monotonic() - started)
        return writer.received if stored else 0

    # -- bootd capsule sync ----------------------------------------------------------------------
    async def peer_refs(self) -> dict[str, str]:
        """The upstream's capsule names and the versions they point to (its GET /capsules/refs)."""
        body = bytearray()
        await self.upstream.get("/capsules/refs", body.extend, limit=REFS_LIMIT, timeout=self.timeout)
        return decode_refs(bytes(body), f"{self.upstream.url}/capsules/refs")

    async def sync(self, name: str, vid: str, progress: Callable[[SyncReport, int, int], None] | None = None,
                   ) -> SyncReport:
        """Fetch every object of capsule ``vid`` and publish it here as ``name``.

        ``progress(report, done, total)`` is called after each object.  Idempotent: objects already
        here are linked, not fetched; an up-to-date name is left as it is.
        """
        check_name(name)
        report = SyncReport(name, vid)
        started = time.monotonic()
        had_manifest = os.path.exists(self.store.manifest_path(vid))
        manifest = await self.manifest(vid)
        report.fetched += 0 if had_manifest else 1
        report.present += 1 if had_manifest else 0
        kernel = manifest.kernel
        hashes = list(dict.fromkeys(c.sha256 for c in manifest.chunks))
        if kernel is not None and kernel.modules is not None:
            hashes.append(kernel.modules)
        report.chunks = len(hashes)
        total = len(hashes) + (1 if kernel is not None else 0)
        done = 0

        async def one(coro: Coroutine[Any, Any, int]) -> None:
            nonlocal done
            stored = await coro
            if stored:
                report.fetched += 1
                report.fetched_bytes += stored
            else:
                report.present += 1
            done += 1
            if progress is not None:
                progress(report, done, total)

        async def chunk(h: str) -> int:
            if os.path.exists(self.store.chunk_path(h)):
                return 0
            size = self._sizes.get(h)
            return await self._fetch("chunk", h, f"/chunks/{h}", size, size if size is not None else self.max_object)

        async def kernel_object(k: KernelRef) -> int:
            if os.path.exists(self.store.kernel_path(k.sha256)):
                return 0
            return await self._fetch("kernel", k.sha256, f"/capsules/{vid}/kernel", k.size, k.size)

        jobs = [chunk(h) for h in hashes] + ([kernel_object(kernel)] if kernel is not None else [])
        try:
            async with asyncio.TaskGroup() as tg:
                for job in jobs:
                    tg.create_task(one(job))
        except* UpstreamError as group:
            raise group.exceptions[0] from None  # the first object that failed; the others were stopped
        report.published = await asyncio.to_thread(self._publish, name, vid, manifest, hashes)
        report.seconds = time.monotonic() - started
        return report

    def _publish(self, name: str, vid: str, manifest: Manifest, hashes: Iterable[str]) -> bool:
        """Point ``name`` at ``vid`` once every object is here (blocking); False if it did already."""
        if self.store.resolve(name) == vid:
            return False
        with self.store.begin_import() as staging:
            for h in hashes:
                if not staging.adopt_existing(h):
                    raise CapsuleError(f"chunk {h} went away during the sync (a concurrent gc?); run it again")
            kernel = manifest.kernel
            kernel_file = modules_file = None
            if kernel is not None:
                kernel_file = staging.dir / "kernel"
                os.link(self.store.kernel_path(kernel.sha256), kernel_file)
                if kernel.modules is not None:
                    modules_file = staging.staged_chunk(kernel.modules)
            manifest_file = staging.dir / "manifest"
            os.link(self.store.manifest_path(vid), manifest_file)
            self.store.publish(staging, name, vid, manifest, manifest_file, kernel_file, origin="sync",
                               detail=self.upstream.url, modules_file=modules_file)
        return True


def parse_refs(data: Any, where: str) -> dict[str, str]:
    """The peer's ``GET /capsules/refs`` answer, checked: name -> version id."""
    if not isinstance(data, dict):
        raise UpstreamError(f"{where} did not answer a JSON object of capsule names")
    out: dict[str, str] = {}
    for name, vid in data.items():
        with contextlib.suppress(CapsuleError):
            if isinstance(vid, str) and is_hex_digest(vid):
                out[check_name(str(name))] = vid
    return out


def decode_refs(body: bytes, where: str) -> dict[str, str]:
    try:
        return parse_refs(json.loads(body), where)
    except ValueError as exc:
        raise UpstreamError(f"{where} did not answer JSON: {exc}") from None

