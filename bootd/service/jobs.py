"""Long jobs the admin API starts and a separate privileged process runs: a spool of job files.

Importing and building capsules read any file of an image, chroot and run
mmdebstrap: root's work, which the long-running daemon (User=bootd) must never
do (README, Design).  So the API only *writes a request* here, and
``bootd helper`` (systemd/bootd-helper.service, root) claims it, runs it, and
writes its progress and result back into the same file.  A file per job, each
write atomic (temp, fsync, rename): either process may die at any moment and
the other reads a whole job, never half of one.  The daemon only reads and
enqueues; the helper only claims and reports.

Bounded: at most MAX_PENDING jobs waiting or running (a client cannot queue
a thousand builds), and finished jobs are pruned beyond MAX_KEPT.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bootd.durable import replace_private
from bootd.errors import BootdError, NotFound

KINDS = ("import", "build", "gc")
STATES = ("queued", "running", "done", "failed")
MAX_PENDING = 8
MAX_KEPT = 200


class JobRefused(BootdError):
    """A job the spool will not take (an unknown kind, a path outside the import directories)."""


class JobQueueFull(JobRefused):
    """MAX_PENDING jobs are queued or running: try again when one finishes."""


@dataclass
class Job:
    id: str
    kind: str
    args: dict[str, Any]
    who: str
    state: str = "queued"
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    # {"phase": "mmdebstrap"|"import"|..., "done": bytes, "total": bytes or null}
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str = ""
    pid: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class JobSpool:
    def __init__(self, root: Path, *, clock: Any = time.time) -> None:
        self.root = root
        self.clock = clock

    # -- both sides ---------------------------------------------------------------------------
    def _path(self, job_id: str) -> Path:
        if not job_id or not all(c.isalnum() or c == "-" for c in job_id):
            raise NotFound(f"no job {job_id!r}")
        return self.root / f"{job_id}.json"

    def _ensure_root(self) -> None:
        if self.root.is_dir():
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = self.root.parent.stat()
            os.chown(self.root, owner.st_uid, owner.st_gid)

    def write(self, job: Job) -> None:
        self._ensure_root()
        # The helper runs as root: what it writes in the daemon's directory stays the daemon's.
        owner = self.root.stat() if os.geteuid() == 0 else None
        replace_private(self._path(job.id), json.dumps(job.to_json(), sort_keys=True).encode(), owner=owner)

    def get(self, job_id: str) -> Job:
        try:
            return Job.from_json(json.loads(self._path(job_id).read_text()))
        except FileNotFoundError:
            raise NotFound(f"no job {job_id!r}") from None
        except (OSError, ValueError, TypeError) as exc:
            raise BootdError(f"job {job_id}: unreadable ({exc})") from None

    def all(self) -> list[Job]:
        jobs = []
        for path in sorted(self.root.glob("*.json")) if self.root.is_dir() else ():
            with contextlib.suppress(NotFound, BootdError):
                jobs.append(self.get(path.stem))
        return sorted(jobs, key=lambda j: (j.created, j.id))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._ensure_root()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.geteuid() == 0:
                owner = self.root.stat()
                os.fchown(fd, owner.st_uid, owner.st_gid)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- the daemon: enqueue ------------------------------------------------------------------
    def submit(self, kind: str, args: Mapping[str, Any], *, who: str) -> Job:
        if kind not in KINDS:
            raise JobRefused(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
        with self._locked():
            jobs = self.all()
            pending = [j for j in jobs if j.state in ("queued", "running")]
            if len(pending) >= MAX_PENDING:
                raise JobQueueFull(f"{len(pending)} jobs are already queued or running (at most {MAX_PENDING}); "
                                 f"wait for one to finish: GET /api/v1/jobs")
            finished = [j for j in jobs if j.state in ("done", "failed")]
            for old in finished[: max(0, len(finished) - MAX_KEPT + 1)]:
                with contextlib.suppress(OSError):
                    self._path(old.id).unlink()
            now = self.clock()
            job = Job(id=f"{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}-{secrets.token_hex(4)}",
                      kind=kind, args=dict(args), who=who, created=now)
            self.write(job)
        return job

    # -- the helper: claim and report --------------------------------------------------------
    def claim(self) -> Job | None:
        """The oldest queued job, marked running by this process; None when there is none."""
        with self._locked():
            for job in self.all():
                if job.state == "queued":
                    job.state, job.started, job.pid = "running", self.clock(), os.getpid()
                    self.write(job)
                    return job
        return None

    def orphans(self) -> list[Job]:
        """Jobs left 'running' by a helper that died (its pid gone): failed, with the reason."""
        failed = []
        with self._locked():
            for job in self.all():
                if job.state == "running" and (job.pid is None or not _alive(job.pid)):
                    job.state, job.finished = "failed", self.clock()
                    job.error = "the helper running this job stopped before it finished; nothing was published"
                    self.write(job)
                    failed.append(job)
        return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_source(path: str, dirs: tuple[Path, ...], what: str = "source") -> Path:
    """``path`` resolved (symlinks followed), if it lies inside one of the configured import directories.

    Checked twice: by the API, to refuse at once, and by the helper right before
    it opens the path (as root), which then uses the resolved path only.
    """
    if not dirs:
        raise JobRefused("imports and builds through the API are off: set capsule.import_dirs in the "
                         "configuration to the directories it may read")
    if not isinstance(path, str) or not path.startswith("/"):
        raise JobRefused(f"{what}: expected an absolute path inside {', '.join(map(str, dirs))}, got {path!r}")
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise JobRefused(f"{what}: {path} cannot be read ({exc.__class__.__name__})") from None
    for top in dirs:
        with contextlib.suppress(OSError):
            if real.is_relative_to(top.resolve(strict=True)):
                return real
    raise JobRefused(f"{what}: {path} is outside the import directories ({', '.join(map(str, dirs))}; "
                     "capsule.import_dirs)")
