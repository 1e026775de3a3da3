"""kill -9 of a real import process, at the two moments that matter, leaves nothing half visible."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bootd.capsule.importer import import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.verify import verify_version
from tests.conftest import ROOT
from tests.unit.capsule.trees import SMALL, fix_times, make_tree

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from bootd.capsule.chunker import ChunkParams
    from bootd.capsule.importer import ImportOptions, import_capsule
    from bootd.capsule.objects import CapsuleStore

    store_dir, tree, mode = sys.argv[1:4]
    processes = len(sys.argv) > 4 and sys.argv[4] == "processes"
    if mode == "publish":
        real_rename = os.rename
        def rename(src, dst, *a, **kw):
            if "/refs/" in str(dst):
                os.kill(os.getpid(), 9)  # after chunks and manifest are linked, before the ref moves
            return real_rename(src, dst, *a, **kw)
        os.rename = rename
    if mode == "written":
        def publish(*a, **kw):
            os.kill(os.getpid(), 9)  # every new chunk written and synced, nothing linked into the store yet
        CapsuleStore.publish = publish

    def progress(n):
        print("chunk", flush=True)
        if mode == "staging":
            time.sleep(0.03)

    opts = ImportOptions(chunk=ChunkParams(16 * 1024, 64 * 1024, 256 * 1024), processes=processes)
    import_capsule(CapsuleStore(Path(store_dir)), "base", Path(tree), options=opts, progress=progress)
    print("DONE", flush=True)
""")


def _objects(store: CapsuleStore) -> tuple[set[str], set[str], set[str]]:
    chunks = {p.name for p in store.chunks_dir.glob("*/*")}
    return chunks, set(os.listdir(store.manifests_dir)), set(os.listdir(store.kernels_dir))


def _children(pid: int) -> list[int]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            out.append(int(status.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.parametrize(("mode", "workers"), [("staging", "threads"), ("written", "threads"),
                                                ("publish", "threads"), ("staging", "processes"),
                                                ("written", "processes")])
def test_kill_9_mid_import_leaves_old_version_and_gc_cleans(tmp_path: Path, mode: str, workers: str) -> None:
    tree = make_tree(tmp_path / "tree", files=120, mean_size=64 * 1024)
    (tree / "boot").mkdir()
    (tree / "boot" / "vmlinuz-1").write_bytes(b"k1")
    fix_times(tree)
    store = CapsuleStore(tmp_path / "store")
    old = import_capsule(store, "base", tree, options=SMALL)
    before = _objects(store)

    for i in range(10):  # a new version with new chunks everywhere
        (tree / "etc" / f"new{i}").write_bytes(os.urandom(100_000))
    (tree / "boot" / "vmlinuz-2").write_bytes(b"k2")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store.root), str(tree), mode, workers],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    helpers: list[int] = []
    try:
        assert proc.stdout is not None
        if mode == "staging":
            for _ in range(20):
                assert proc.stdout.readline().strip() == "chunk"
            helpers = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == -signal.SIGKILL and "DONE" not in out
    if workers == "processes" and mode == "staging":
        assert helpers, "expected compression worker processes"
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in helpers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in helpers), "workers outlived the killed import"

    if mode == "written":
        # The staged chunks are whole frames (O_DIRECT body + page-cache tail), named by their hash.
        staged = list(store.tmp_dir.glob("import-*/chunks/*"))
        assert len(staged) >= 10
        for p in staged:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name

    # Nothing half visible: the name still points at the old, intact version.
    assert store.names() == {"base": old.version}
    assert verify_version(store, old.version).ok
    assert len(os.listdir(store.tmp_dir)) == 1  # the dead staging dir

    report = store.gc()
    assert report.removed_staging == 1 and report.live_imports == 0
    assert os.listdir(store.tmp_dir) == []
    assert _objects(store) == before  # exactly the old version's objects remain
    if mode == "publish":
        assert report.removed_manifests == 1 and report.removed_chunks > 0

    # The next import works and produces what the killed one would have.
    new = import_capsule(store, "base", tree, options=SMALL)
    assert new.version != old.version and store.resolve("base") == new.version
    assert verify_version(store, new.version).ok


def test_gc_leaves_a_live_import_in_another_process_alone(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", files=120, mean_size=64 * 1024)
    store = CapsuleStore(tmp_path / "store")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store.root), str(tree), "staging"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        for _ in range(5):
            assert proc.stdout.readline().strip() == "chunk"
        report = store.gc()
        assert report.live_imports == 1 and report.removed_staging == 0
        deadline = time.monotonic() + 60
        rest = proc.stdout.read()
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0 and "DONE" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    vid = store.resolve("base")
    assert vid is not None and verify_version(store, vid).ok
