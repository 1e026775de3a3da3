"""What the cluster can boot: capsules and overlays as the admin API and the CLI list them, and the
long capsule jobs the API may start.

Listing and deleting a capsule are quick file operations on the capsule store,
which the daemon's user owns, so they run here.  Importing, building and gc
read images as root or take minutes: this service only checks the request
(names, import directories) and queues it for ``bootd helper``
(bootd.service.jobs), so a bad request is refused at once, with the reason,
rather than failing later in a job.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bootd.capsule.objects import CapsuleStore
from bootd.capsule.objects import check_name as check_capsule_name
from bootd.config import Config
from bootd.errors import CapsuleError
from bootd.overlay.store import OverlayStore
from bootd.service.audit import AuditLog
from bootd.service.checks import Invalid
from bootd.service.jobs import Job, JobSpool, check_source


def capsule_rows(store: CapsuleStore) -> list[dict[str, Any]]:
    """One row per capsule name: what `bootd capsule list --json` and GET /api/v1/capsules print."""
    rows: list[dict[str, Any]] = []
    for name, vid in store.names().items():
        try:
            m = store.load_manifest(vid)
        except CapsuleError as exc:
            rows.append({"name": name, "version": vid, "error": str(exc)})
            continue
        k = m.kernel
        rows.append({"name": name, "version": vid, "raw_size": m.raw_size, "stored_size": m.stored_size,
                     "chunks": len(m.chunks), "kernel": k.path if k else None})
    return rows


def capsule_detail(store: CapsuleStore, name_or_vid: str, *, with_chunks: bool) -> dict[str, Any]:
    name, vid = store.find_version(name_or_vid)
    data: dict[str, Any] = store.load_manifest(vid).to_json(vid, with_chunks=with_chunks)
    data["name"] = name
    return data


class Catalog:
    def __init__(self, config: Config, audit: AuditLog) -> None:
        self.audit = audit
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.config = config
        self.capsules = CapsuleStore(Path(config.capsule.dir))
        self.overlays = OverlayStore(config.overlay.dir)
        self.jobs = JobSpool(config.server.state_dir / "jobs")

    # -- capsules ---------------------------------------------------------------------------
    async def capsule_list(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(capsule_rows, self.capsules)

    async def capsule_show(self, name: str) -> dict[str, Any]:
        data = await asyncio.to_thread(capsule_detail, self.capsules, name, with_chunks=False)
        data["history"] = [r.to_json() for r in await asyncio.to_thread(self.capsules.history, data["name"] or name)]
        return data

    async def capsule_delete(self, name: str, *, who: str) -> str:
        vid = await asyncio.to_thread(self.capsules.delete, name)
        self.audit.record(who, "capsule.delete", name, {"version": vid})
        return vid

    # -- jobs -------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        try:
            check_capsule_name(name)
        except CapsuleError as exc:
            raise Invalid(str(exc)) from None
        return name

    async def submit_import(self, name: str, body: dict[str, Any], *, who: str) -> Job:
        hygiene = body.get("hygiene", True)
        if not isinstance(hygiene, bool):
            raise Invalid(f"hygiene: expected true or false, got {hygiene!r}")
        source = str(check_source(body.get("source", ""), self.config.capsule.import_dirs))
        return await self._submit("import", {"name": self._name(name), "source": source, "hygiene": hygiene}, who)

    async def submit_build(self, name: str, body: dict[str, Any], *, who: str) -> Job:
        recipe = str(check_source(body.get("recipe", ""), self.config.capsule.import_dirs, "recipe"))
        return await self._submit("build", {"name": self._name(name), "recipe": recipe}, who)

    async def submit_gc(self, body: dict[str, Any], *, who: str) -> Job:
        keep = body.get("keep_versions")
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or not 1 <= keep <= 10_000):
            raise Invalid(f"keep_versions: expected an integer from 1 to 10000, got {keep!r}")
        return await self._submit("gc", {"keep_versions": keep}, who)

    async def _submit(self, kind: str, args: dict[str, Any], who: str) -> Job:
        job = await asyncio.to_thread(self.jobs.submit, kind, args, who=who)
        self.audit.record(who, f"capsule.{kind}", args.get("name", "-"), {"job": job.id})
        return job

    async def job(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def job_list(self) -> list[Job]:
        return await asyncio.to_thread(self.jobs.all)

    # -- overlays ---------------------------------------------------------------------------
    async def overlay_list(self) -> list[dict[str, Any]]:
        def rows() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for name, source in self.overlays.names().items():
                try:
                    o = self.overlays.load(name)
                except Exception as exc:  # a broken site overlay is listed with its reason, not hidden
                    out.append({"name": name, "source": source, "error": str(exc)})
                    continue
                out.append({"name": name, "source": source, "kind": o.kind, "secret": o.meta.secret,
                            "description": o.meta.description, "files": len(o.entries)})
            return out

        return await asyncio.to_thread(rows)

    async def overlay_show(self, name: str) -> dict[str, Any]:
        def show() -> dict[str, Any]:
            o = self.overlays.load(name)
            return {"name": o.name, "source": o.source, "kind": o.kind, "digest": o.digest,
                    "meta": o.meta.to_json(), "files": sorted(e.dest for e in o.entries)}

        return await asyncio.to_thread(show)
