"""Change a capsule in place: run a command in its tree, publish the result if it succeeds.

The current version is unpacked (verified chunk by chunk, export.py) into a
private directory and the command runs there in new mount and PID namespaces
(``unshare --mount --pid --fork``) chrooted into the tree, with /proc (and a
read-only /sys) mounted
and a read-only copy of the master's resolv.conf bound over the tree's, so
``apt-get`` can resolve the mirror without being able to change the master's.
/dev is a private tmpfs with the master's null, zero, full, random, urandom and tty bound in
one by one and its own devpts, not a bind of the master's whole /dev: a maintainer script that
removes or recreates a device node must not reach the master's. Everything mounted lives only in that
mount namespace: it is unmounted when the command ends, and the host never
sees it (checked before the tree is removed). Services a package starts are
kept from starting by a policy-rc.d for the duration, and any process the
command leaves behind dies with the PID namespace.

Only a command that exits 0 publishes: the tree is imported (with hygiene)
as a new version of the name, recorded as ``exec`` in its history. If another
version was published meanwhile, nothing is published (say so, not overwrite).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from bootd.capsule.export import write_archive
from bootd.capsule.hygiene import HygieneReport, transform
from bootd.capsule.importer import ImportOptions, ImportResult, import_capsule
from bootd.capsule.objects import CapsuleStore, check_name
from bootd.errors import CapsuleError

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLICY_RC = b"#!/bin/sh\n# bootd capsule exec: no services start while the tree is changed\nexit 101\n"
_SAVED = ".bootd-exec-saved-resolv.conf"

# Runs inside the new namespaces as PID 1's child: mount, chroot, run, unmount; exit with the command's status.
_INNER = r"""
set -u
root=$1; shift
mount -t proc proc "$root/proc" || exit 125
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys" || exit 125  # read-only: hwloc, udevadm look
# A private /dev: the master's harmless nodes bound in one by one (a bound file cannot be removed,
# so 'rm /dev/null' in a maintainer script cannot reach the master's), its own devpts and shm.
mount -t tmpfs -o mode=0755,nosuid,size=16m bootd-dev "$root/dev" || exit 125
for n in null zero full random urandom tty; do
    : > "$root/dev/$n" && mount --bind "/dev/$n" "$root/dev/$n" || exit 125
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts" || exit 125
mount -t tmpfs -o nosuid,nodev,size=64m shm "$root/dev/shm" || exit 125
ln -s pts/ptmx "$root/dev/ptmx"
ln -s /proc/self/fd "$root/dev/fd"
for i in 0:stdin 1:stdout 2:stderr; do ln -s "/proc/self/fd/${i%%:*}" "$root/dev/${i#*:}"; done
# A read-only copy of the master's resolv.conf: the command can resolve names, not change the master's.
mount --bind "$BOOTD_RESOLV" "$root/etc/resolv.conf" && mount -o remount,bind,ro "$root/etc/resolv.conf" || exit 125
chroot "$root" "$@"
rc=$?
umount "$root/etc/resolv.conf"
umount -R "$root/dev" "$root/proc" "$root/sys"
exit $rc
"""


@dataclass(frozen=True)
class ExecResult:
    name: str
    previous: str
    exit_code: int
    result: ImportResult | None  # None: the command failed, nothing was published
    hygiene: HygieneReport


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this (the host's) mount namespace.

    Checked before a work tree is removed: a recursive delete through a bind mount
    of /dev would delete the master's device nodes.
    """
    prefix = str(path.resolve())
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def unpack(store: CapsuleStore, vid: str, dest: Path, progress: Callable[[int], None] | None = None) -> None:
    """Extract version ``vid`` into ``dest`` with owners, modes, devices and xattrs (GNU tar as root)."""
    tar = shutil.which("tar")
    if tar is None:
        raise CapsuleError("GNU tar is needed to unpack a capsule (apt-get install tar)")
    proc = subprocess.Popen([tar, "-x", "-p", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C", str(dest)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        write_archive(store, vid, cast(BinaryIO, proc.stdin), progress)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    finally:
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    if rc != 0:
        raise CapsuleError(f"unpacking {vid[:12]} into {dest} failed (tar exit {rc}): {err.strip()[-500:]}")


@contextlib.contextmanager
def _prepared(tree: Path) -> Iterator[None]:
    """What the command needs for the run, and nothing of it after: mount points, resolv.conf, policy-rc.d.

    Directories this touches get their listing and mtime back if the command did not
    change them either, so a command that changes nothing publishes the same version.
    """
    touched = [tree, tree / "etc", tree / "usr", tree / "usr" / "sbin"]
    before = {d: (set(os.listdir(d)), os.stat(d)) for d in touched if d.is_dir() and not d.is_symlink()}
    made_dirs = [tree / d for d in ("proc", "sys", "dev", "etc", "usr", "usr/sbin") if not (tree / d).exists()]
    for d in made_dirs:
        d.mkdir(parents=True, exist_ok=True)
    resolv = tree / "etc" / "resolv.conf"
    saved = tree / "etc" / _SAVED
    made_resolv = False
    if resolv.is_symlink():  # e.g. to systemd-resolved's stub: a bind mount would follow it out of the tree
        os.rename(resolv, saved)
    if not resolv.exists():
        resolv.write_bytes(b"")
        made_resolv = True
    policy = tree / "usr" / "sbin" / "policy-rc.d"
    made_policy = not policy.exists() and not policy.is_symlink()
    if made_policy:
        policy.write_bytes(POLICY_RC)
        policy.chmod(0o755)
    try:
        yield
    finally:
        if made_policy:
            with contextlib.suppress(FileNotFoundError):
                policy.unlink()
        if made_resolv:
            with contextlib.suppress(FileNotFoundError):
                resolv.unlink()
        if saved.is_symlink() or saved.exists():
            os.replace(saved, resolv)
        for d in reversed(made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if the command left it empty
        for d, (names, st) in before.items():
            with contextlib.suppress(OSError):
                if set(os.listdir(d)) == names:
                    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def run_in_tree(tree: Path, argv: Sequence[str], interactive: bool = False) -> int:
    """Run ``argv`` chrooted into ``tree`` in private mount and PID namespaces; its exit status."""
    if os.geteuid() != 0:
        raise CapsuleError("capsule exec/shell needs root (mount namespace, chroot, device nodes)")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            raise CapsuleError(f"{tool} is not installed (util-linux, coreutils)")
    resolv = tree.parent / "resolv.conf"
    try:
        shutil.copyfile("/etc/resolv.conf", resolv)
    except OSError:
        resolv.write_bytes(b"")
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb"),
           "SHELL": "/bin/sh", "BOOTD_RESOLV": str(resolv)}
    if not interactive:
        env["DEBIAN_FRONTEND"] = "noninteractive"
    with _prepared(tree):
        proc = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
                               "/bin/sh", "-c", _INNER, "bootd-exec", str(tree), *argv],
                              env=env, stdin=None if interactive else subprocess.DEVNULL, check=False)
    left = mounts_under(tree)
    if left:  # never reached with a private namespace; if it were, removing the tree would reach into /dev
        raise CapsuleError(f"mounts left under {tree} after the command: {', '.join(left)}; not removing it")
    return proc.returncode


def exec_in_capsule(
    store: CapsuleStore,
    name: str,
    argv: Sequence[str],
    *,
    interactive: bool = False,
    options: ImportOptions | None = None,
    progress: Callable[[int], None] | None = None,
    workdir: Path | None = None,
    detail: str | None = None,
) -> ExecResult:
    """Run ``argv`` in the current version of ``name``; publish the changed tree if it exits 0."""
    check_name(name)
    if not argv:
        raise CapsuleError("no command given (bootd capsule exec NAME -- CMD ...)")
    vid = store.resolve(name)
    if vid is None:
        raise CapsuleError(f"no capsule named {name!r}")
    report = HygieneReport()
    base = tempfile.mkdtemp(prefix=f"bootd-exec-{name}-", dir=workdir or "/var/tmp")
    tree = Path(base) / "root"
    try:
        os.chmod(base, 0o700)
        tree.mkdir()
        unpack(store, vid, tree)
        code = run_in_tree(tree, argv, interactive)
        if code != 0:
            return ExecResult(name, vid, code, None, report)
        if store.resolve(name) != vid:
            raise CapsuleError(f"{name} got a new version while the command ran; nothing was published "
                               "(run the command again on the new version)")
        result = import_capsule(store, name, tree, options=options, progress=progress, transform=transform(report),
                                origin="exec", detail=detail or " ".join(argv))
        return ExecResult(name, vid, code, result, report)
    finally:
        remove_tree(Path(base))


def remove_tree(path: Path) -> None:
    """Remove a work tree unless something is still mounted in it (then say so and leave it)."""
    left = mounts_under(path)
    if left:
        raise CapsuleError(f"not removing {path}: still mounted there: {', '.join(left)} (umount them, then remove it)")
    shutil.rmtree(path, ignore_errors=True)
