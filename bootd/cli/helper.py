"""``bootd helper``: the privileged process that runs the admin API's capsule jobs.

The daemon runs as its own user and must never read whole images as root,
chroot or run mmdebstrap (README, Design: work that needs root stays out of
the daemon).  This process does, one job at a time, from the spool the API
writes (bootd.service.jobs): systemd/bootd-helper.service runs it as root,
beside bootd.service.  Each job calls exactly what the ``bootd capsule`` command
calls, so a capsule imported through the API is the one the CLI would import.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootd.capsule.build import build_capsule
from bootd.capsule.hygiene import HygieneReport, transform
from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.recipe import load_recipe
from bootd.cli import hand_over
from bootd.cli.capsule import import_options
from bootd.config import Config
from bootd.errors import BootdError
from bootd.service.jobs import Job, JobSpool, check_source

log = logging.getLogger("bootd.helper")


class Stopped(BaseException):
    """SIGTERM while a job runs: the job ends as failed, and imports publish nothing half done."""
REPORT_EVERY = 0.5  # seconds between progress writes of one job


def spool(config: Config) -> JobSpool:
    return JobSpool(config.server.state_dir / "jobs")


class _Reporter:
    """Progress callbacks that rewrite the job file at most every REPORT_EVERY seconds."""

    def __init__(self, jobs: JobSpool, job: Job) -> None:
        self.jobs, self.job = jobs, job
        self.last = 0.0

    def phase(self, name: str) -> None:
        self.job.progress = {"phase": name, "done": 0, "total": None}
        self.flush()

    def total(self, n: int) -> None:
        self.job.progress = {**self.job.progress, "phase": "import", "total": n}
        self.flush()

    def add(self, n: int) -> None:
        self.job.progress["done"] = int(self.job.progress.get("done", 0)) + n
        if time.monotonic() - self.last >= REPORT_EVERY:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        self.jobs.write(self.job)


def run_job(config: Config, jobs: JobSpool, job: Job) -> None:
    """Run one claimed job to done or failed; never raises for the job's own errors."""
    report = _Reporter(jobs, job)
    store = CapsuleStore(Path(config.capsule.dir))
    dirs = config.capsule.import_dirs
    try:
        if job.kind == "import":
            source = check_source(job.args.get("source", ""), dirs)
            hygiene = HygieneReport()
            report.phase("import")
            result = import_capsule(store, job.args["name"], source, options=import_options(config),
                                    progress=report.add, on_total=report.total,
                                    transform=transform(hygiene) if job.args.get("hygiene", True) else None)
            job.result = {**result.to_json(), "hygiene": hygiene.to_json()}
        elif job.kind == "build":
            recipe = load_recipe(check_source(job.args.get("recipe", ""), dirs, "recipe"))
            report.phase("mmdebstrap")
            built = build_capsule(store, job.args["name"], recipe, config.capsule.build_cache,
                                  options=import_options(config), progress=report.add, on_total=report.total)
            job.result = {**built.result.to_json(), "hygiene": built.hygiene.to_json(),
                          "mmdebstrap_seconds": round(built.mmdebstrap_seconds, 3)}
        elif job.kind == "gc":
            report.phase("gc")
            keep = job.args.get("keep_versions") or config.capsule.keep_versions
            job.result = vars(store.gc(keep_versions=int(keep)))
        else:
            raise BootdError(f"unknown job kind {job.kind!r}")
        job.state = "done"
    except Stopped:
        job.state, job.error, job.finished = "failed", "bootd helper was stopped during the job; nothing was " \
                                                       "published", time.time()
        jobs.write(job)
        raise
    except BootdError as exc:
        job.state, job.error = "failed", str(exc)
    except Exception as exc:  # a bug, not the job's input: say so, keep serving the queue
        log.error("event=job-crashed job=%s\n%s", job.id, traceback.format_exc())
        job.state, job.error = "failed", f"internal error: {exc.__class__.__name__}: {exc}"
    job.finished = time.time()
    if job.state == "done" and job.progress.get("total") is not None:
        job.progress["done"] = job.progress["total"]
    jobs.write(job)
    log.info("event=job-%s job=%s kind=%s %s", job.state, job.id, job.kind, job.error)


def serve(config: Config, *, once: bool = False, poll: float = 0.5,
          stop: Callable[[], bool] = lambda: False) -> int:
    jobs = spool(config)
    for orphan in jobs.orphans():
        log.warning("event=job-orphaned job=%s kind=%s", orphan.id, orphan.kind)
    owner = config.server.state_dir.stat()
    while not stop():
        job = jobs.claim()
        if job is None:
            if once:
                return 0
            time.sleep(poll)
            continue
        run_job(config, jobs, job)
        if owner.st_uid != 0 and owner.st_uid != os.geteuid():
            hand_over(config, owner.st_uid, owner.st_gid)
    return 0


def helper_cmd(args: argparse.Namespace, config: Config) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    stopping = False

    def on_term(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        raise Stopped

    signal.signal(signal.SIGTERM, on_term)
    try:
        return serve(config, once=args.once, poll=args.poll, stop=lambda: stopping)
    except Stopped:
        log.info("event=stopped")
        return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("helper", help="run the admin API's capsule jobs (import, build, gc) as root; "
                                      "systemd/bootd-helper.service")
    p.add_argument("--once", action="store_true", help="run the queued jobs, then exit")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the spool when idle")
    p.set_defaults(handler=helper_cmd)
