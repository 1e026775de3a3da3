"""Build a capsule from a recipe with mmdebstrap, then import it (with hygiene) as a new version.

Why mmdebstrap: it is Debian's own tool for this (one apt solve, no debootstrap
shell), runs without a second apt configuration on the master, writes a tar
with mtimes clamped to ``SOURCE_DATE_EPOCH``, and removes its own
unreproducible files, so a recipe built twice from the same mirror state gives
the same bytes and therefore the same version id.

The package cache: ``<cache>/archives`` (the .debs) and ``<cache>/lists``
(apt's package lists) are copied into the build tree before apt runs
(``sync-in`` setup hooks; ``--skip=download/empty`` lets apt start with a
non-empty archive directory, ``--skip=essential/unlink`` keeps the essential
.debs) and copied back out right after the packages are installed
(``sync-out`` customize hooks, before the recipe's own commands, so a failing
command keeps what was downloaded). A second build downloads only what
changed: apt sees its .debs and lists in place and fetches the Release file
only. One build at a time holds the cache (flock).

A failed build publishes nothing and says at which step it failed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bootd.capsule.chroot import remove_tree
from bootd.capsule.hygiene import HygieneReport, transform
from bootd.capsule.importer import ImportOptions, ImportResult, import_capsule
from bootd.capsule.objects import CapsuleStore, check_name
from bootd.capsule.recipe import Recipe
from bootd.errors import CapsuleError

MARK = "bootd-step:"


class BuildError(CapsuleError):
    """A build step failed; nothing was published. ``step`` and ``reason`` say which and why."""

    def __init__(self, name: str, step: str, reason: str) -> None:
        self.step, self.reason = step, reason
        super().__init__(f"build of {name} failed at step '{step}': {reason}; nothing was published")


@dataclass(frozen=True)
class BuildResult:
    result: ImportResult
    hygiene: HygieneReport
    mmdebstrap_seconds: float
    import_seconds: float
    tar_bytes: int


def _hook(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def mmdebstrap_command(recipe: Recipe, out: Path, cache: Path) -> list[str]:
    """The mmdebstrap command line for ``recipe``; its hooks print MARK lines so a failure names its step."""
    c = str(cache)
    cmd = ["mmdebstrap", f"--variant={recipe.variant}", "--format=tar", f"--components={','.join(recipe.components)}",
           "--skip=download/empty", "--skip=essential/unlink", "--aptopt=Acquire::Retries \"2\"",
           # No fsync per unpacked file: the tree is thrown away once it is a tar, so a crash
           # loses nothing that a rebuild does not make again (the file is removed below).
           "--dpkgopt=force-unsafe-io"]
    include = [*recipe.packages, *recipe.build_packages]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives \"$1\"/var/lib/apt/lists",
        "--setup-hook=" + _hook("sync-in", f"{c}/archives", "/var/cache/apt/archives/"),
        "--setup-hook=" + _hook("sync-in", f"{c}/lists", "/var/lib/apt/lists/"),
        "--customize-hook=" + _hook("sync-out", "/var/cache/apt/archives", f"{c}/archives"),
        "--customize-hook=" + _hook("sync-out", "/var/lib/apt/lists", f"{c}/lists"),
    ]
    for i, f in enumerate(recipe.files, 1):
        parent = os.path.dirname(f.dest) or "/"
        cmd += [
            f"--customize-hook=echo {shlex.quote(f'{MARK} file {i}: {f.dest}')} >&2 && "
            f"chroot \"$1\" mkdir -p {shlex.quote(parent)}",
            "--customize-hook=" + _hook("upload", str(f.src), f.dest),
            f"--customize-hook=chroot \"$1\" chmod {f.mode:o} {shlex.quote(f.dest)}",
        ]
    for i, command in enumerate(recipe.commands, 1):
        cmd.append(f"--customize-hook=echo {shlex.quote(f'{MARK} command {i}: {command}')} >&2 && "
                   f"chroot \"$1\" /bin/sh -ec {shlex.quote(command)}")
    if recipe.build_packages:
        purge = "apt-get purge -y -q --autoremove " + " ".join(shlex.quote(p) for p in recipe.build_packages)
        cmd.append(f"--customize-hook=echo {shlex.quote(f'{MARK} purge build_packages')} >&2 && "
                   f"chroot \"$1\" /bin/sh -ec {shlex.quote(purge)}")
    cmd.append("--customize-hook=rm -f \"$1\"/etc/dpkg/dpkg.cfg.d/99mmdebstrap")
    cmd += [recipe.suite, str(out), *recipe.sources]
    return cmd


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    for sub in ("archives", "lists"):
        (cache / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bootd: waiting for another build to release {cache}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


_NOT_FOUND = re.compile(r"Unable to locate package (\S+)|Package '?([^' ]+)'? has no installation candidate")
_UNREACHABLE = re.compile(r"Failed to fetch|Could not connect|Could not resolve|Unable to connect|"
                          r"Connection refused|Temporary failure resolving|No route to host|timed out")


def diagnose(lines: list[str], recipe: Recipe) -> tuple[str, str]:
    """(step, reason) from mmdebstrap's output: the last step it announced and the error that ended it."""
    step = "mmdebstrap"
    failed = False
    for line in lines:
        failed = failed or line.startswith("E: ") or line.startswith("Err:")
        if failed:
            pass  # what mmdebstrap does after the error (cleanup) is not the step that failed
        elif line.startswith(MARK):
            step = line[len(MARK):].strip()
        elif line.startswith("I: ") and not line.startswith(("I: running --", "I: running special", "I: skipping")):
            step = line[3:].strip().rstrip(".")
        m = _NOT_FOUND.search(line)
        if m:
            return step, f"package not found: {m.group(1) or m.group(2)} (suite {recipe.suite})"
    for line in lines:
        if _UNREACHABLE.search(line):
            return step, f"mirror unreachable ({', '.join(s.split()[1] for s in recipe.sources)}): {line.strip()}"
    if step.startswith(("command", "file", "purge")):
        return step, "the command exited with an error (its output is above)"
    errors = [ln.strip() for ln in lines if ln.startswith("E: ")]
    return step, errors[-1] if errors else (lines[-1].strip() if lines else "mmdebstrap failed without output")


def _lists_for(recipe: Recipe, cache: Path, arch: str) -> list[Path] | None:
    """The cached Packages files of every source and component, or None if any is missing."""
    files = []
    for line in recipe.sources:
        _, uri, suite, *components = line.split()
        prefix = uri.split("://", 1)[-1].rstrip("/").replace("/", "_")
        for comp in components:
            f = cache / "lists" / f"{prefix}_dists_{suite}_{comp.replace('/', '_')}_binary-{arch}_Packages"
            if not f.is_file():
                return None
            files.append(f)
    return files


def check_packages(name: str, recipe: Recipe, cache: Path, arch: str = "amd64") -> None:
    """Refuse a package no cached list knows, in a second instead of after the essential install.

    The lists are the ones the last build fetched (they are refreshed by every build);
    without a complete set for the recipe's sources nothing is checked here and apt
    decides. A stable suite does not gain packages between builds, so a miss here is
    a typo, not a stale list.
    """
    files = _lists_for(recipe, cache, arch)
    if files is None:
        return
    lists = [b"\n" + f.read_bytes() for f in files]
    for pkg in (*recipe.packages, *recipe.build_packages):
        base = re.split(r"[=/:]", pkg, maxsplit=1)[0].encode()
        if any(b"\nPackage: " + base + b"\n" in data for data in lists):
            continue
        provided = re.compile(rb"^Provides:.*(?<![\w.+-])" + re.escape(base) + rb"(?![\w.+-])", re.M)
        if any(provided.search(data) for data in lists):
            continue
        mirrors = ", ".join(dict.fromkeys(s.split()[1] for s in recipe.sources))
        raise BuildError(name, "check packages", f"package not found: {base.decode()} (suite {recipe.suite}; "
                         f"not in the package lists of {mirrors} "
                         f"cached in {cache / 'lists'} by the last build)")


def run_mmdebstrap(name: str, recipe: Recipe, out: Path, cache: Path, log: TextIO) -> None:
    """Run mmdebstrap, passing its output on to ``log`` as it comes; BuildError names the failing step."""
    if shutil.which("mmdebstrap") is None:
        raise BuildError(name, "mmdebstrap", "mmdebstrap is not installed (apt-get install mmdebstrap)")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.epoch), "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C.UTF-8", "TMPDIR": str(out.parent)}  # mmdebstrap's tree next to its tar
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with _cache_lock(cache):
        check_packages(name, recipe, cache)
        proc = subprocess.Popen(mmdebstrap_command(recipe, out, cache), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env=env, start_new_session=False)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                tail.append(line)
                log.write(line)
                log.flush()
        finally:
            rc = proc.wait()
    if rc != 0:
        step, reason = diagnose(list(tail), recipe)
        raise BuildError(name, step, f"{reason} (mmdebstrap exit {rc})")
    if not out.is_file():
        raise BuildError(name, "mmdebstrap", f"mmdebstrap succeeded but wrote no {out}")


def build_capsule(
    store: CapsuleStore,
    name: str,
    recipe: Recipe,
    cache: Path,
    *,
    options: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    log: TextIO = sys.stderr,
    workdir: Path | None = None,
) -> BuildResult:
    """mmdebstrap the recipe into a tar, then import it with hygiene as a new version of ``name``."""
    check_name(name)
    tmp = tempfile.mkdtemp(prefix="bootd-build-", dir=workdir or "/var/tmp")
    try:
        out = Path(tmp) / f"{name}.tar"
        t0 = time.monotonic()
        log.write(f"{MARK} mmdebstrap {recipe.suite} ({recipe.variant}, {len(recipe.packages)} packages)\n")
        run_mmdebstrap(name, recipe, out, cache, log)
        t1 = time.monotonic()
        log.write(f"{MARK} import {out.stat().st_size} bytes as {name}\n")
        log.flush()
        report = HygieneReport()
        try:
            result = import_capsule(store, name, out, options=options, progress=progress, on_total=on_total,
                                    transform=transform(report), origin="build", detail=str(recipe.path))
        except CapsuleError as exc:
            raise BuildError(name, "import", str(exc)) from exc
        return BuildResult(result, report, t1 - t0, time.monotonic() - t1, out.stat().st_size)
    finally:
        remove_tree(Path(tmp))  # refuses if a killed mmdebstrap left its /dev or /proc mounts behind
