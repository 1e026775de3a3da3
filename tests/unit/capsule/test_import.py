from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard

from bootd.capsule.export import export_version, write_archive
from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.verify import verify_version
from bootd.errors import CapsuleError
from tests.unit.capsule.trees import SMALL, fix_times, make_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "tree", files=120, mean_size=64 * 1024)  # ~7.5 MiB
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-6.1.0-9-amd64").write_bytes(b"old kernel")
    (root / "boot" / "vmlinuz-6.1.0-10-amd64").write_bytes(b"new kernel")
    fix_times(root)
    return root


@pytest.fixture
def store(tmp_path: Path) -> CapsuleStore:
    return CapsuleStore(tmp_path / "capsules")


def test_import_publishes_layout_and_kernel(store: CapsuleStore, tree: Path) -> None:
    r = import_capsule(store, "base", tree, options=SMALL)
    assert store.resolve("base") == r.version
    assert store.names() == {"base": r.version}
    assert (store.refs_dir / "base").read_text() == r.version + "\n"
    m = store.load_manifest(r.version)
    assert r.kernel is not None and r.kernel.path == "/boot/vmlinuz-6.1.0-10-amd64"
    assert store.kernel_path(r.kernel.sha256).read_bytes() == b"new kernel"
    assert m.meta["kernel"] == {"sha256": r.kernel.sha256, "size": 10, "path": "/boot/vmlinuz-6.1.0-10-amd64"}
    assert len(m.chunks) == r.chunks > 20
    d = zstandard.ZstdDecompressor()
    for c in m.chunks:
        path = store.chunk_path(c.sha256)
        assert path.parent.name == c.sha256[:2]
        assert len(d.decompress(path.read_bytes())) == c.raw_size
    assert os.listdir(store.tmp_dir) == []  # staging cleaned up


def test_same_tree_gives_same_version(store: CapsuleStore, tree: Path, tmp_path: Path) -> None:
    a = import_capsule(store, "a", tree, options=SMALL)
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    fix_times(copy)
    other = CapsuleStore(tmp_path / "other")
    b = import_capsule(other, "b", copy, options=SMALL)
    assert a.version == b.version
    again = import_capsule(store, "a", tree, options=SMALL)
    assert again.version == a.version and again.new_chunks == 0 and again.previous == a.version


def test_given_kernel_overrides_tree(store: CapsuleStore, tree: Path, tmp_path: Path) -> None:
    k = tmp_path / "vmlinuz-custom"
    k.write_bytes(b"custom kernel")
    r = import_capsule(store, "k", tree, kernel=k, options=SMALL)
    assert r.kernel is not None and r.kernel.path == "/boot/vmlinuz-custom"
    assert store.kernel_path(r.kernel.sha256).read_bytes() == b"custom kernel"


def test_tree_without_kernel(store: CapsuleStore, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "nok", files=3)
    r = import_capsule(store, "nok", root, options=SMALL)
    assert r.kernel is None and store.load_manifest(r.version).meta["kernel"] is None


def _new_share(store: CapsuleStore, tree: Path) -> float:
    r = import_capsule(store, "base", tree, options=SMALL)
    return r.new_bytes / r.stored_size


def test_changed_file_adds_little(store: CapsuleStore, tree: Path) -> None:
    import_capsule(store, "base", tree, options=SMALL)
    victim = tree / "usr" / "lib" / "file0042"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    share = _new_share(store, tree)
    print(f"new-bytes share {share:.4f}")
    assert 0 < share < 0.05, share


def test_inserted_file_adds_little(store: CapsuleStore, tree: Path) -> None:
    first = import_capsule(store, "base", tree, options=SMALL)
    (tree / "etc" / "file0003a").write_bytes(os.urandom(8_000))
    os.utime(tree / "etc", (1_700_000_000, 1_700_000_000))
    r = import_capsule(store, "base", tree, options=SMALL)
    assert r.version != first.version
    share = r.new_bytes / r.stored_size
    print(f"new-bytes share {share:.4f}")
    assert 0 < share < 0.05, share


def test_old_version_stays_until_new_is_published(store: CapsuleStore, tree: Path) -> None:
    old = import_capsule(store, "base", tree, options=SMALL)
    seen: list[str | None] = []
    (tree / "etc" / "new").write_bytes(b"new")

    def progress(n: int) -> None:
        seen.append(store.resolve("base"))

    new = import_capsule(store, "base", tree, options=SMALL, progress=progress)
    assert seen and set(seen) == {old.version}
    assert store.resolve("base") == new.version and new.previous == old.version


def test_export_round_trips_the_archive(store: CapsuleStore, tree: Path, tmp_path: Path) -> None:
    r = import_capsule(store, "base", tree, options=SMALL)
    dest = tmp_path / "out.tar"
    n = export_version(store, r.version, dest)
    assert n == r.raw_size == dest.stat().st_size
    with tarfile.open(dest) as tf:
        f = tf.extractfile("./usr/lib/file0002")
        assert f is not None and f.read() == (tree / "usr/lib/file0002").read_bytes()
    # Exporting and importing the export gives the same version.
    again = import_capsule(CapsuleStore(tmp_path / "s2"), "x", dest, options=SMALL)
    assert again.version == r.version


def test_verify_names_corrupt_and_missing_chunks(store: CapsuleStore, tree: Path) -> None:
    r = import_capsule(store, "base", tree, options=SMALL)
    assert verify_version(store, r.version).ok
    m = store.load_manifest(r.version)
    bad, gone = m.chunks[3].sha256, m.chunks[7].sha256
    p = store.chunk_path(bad)
    data = bytearray(p.read_bytes())
    data[100] ^= 1
    p.write_bytes(bytes(data))
    store.chunk_path(gone).unlink()
    report = verify_version(store, r.version)
    assert not report.ok
    problems = {b["sha256"]: b["problem"] for b in report.bad}
    assert problems == {bad: "sha256 mismatch", gone: "missing"}
    with pytest.raises(CapsuleError, match=r"corrupt|missing"):
        write_archive(store, r.version, io.BytesIO())


def test_corrupt_manifest_is_detected(store: CapsuleStore, tree: Path) -> None:
    r = import_capsule(store, "base", tree, options=SMALL)
    p = store.manifest_path(r.version)
    p.write_bytes(p.read_bytes() + b"x")
    with pytest.raises(CapsuleError, match="does not match"):
        store.load_manifest(r.version)


def test_gc_keeps_refs_and_in_use_and_live_imports(store: CapsuleStore, tree: Path) -> None:
    v1 = import_capsule(store, "base", tree, options=SMALL)
    (tree / "etc" / "file0003").write_bytes(os.urandom(300_000))
    v2 = import_capsule(store, "base", tree, options=SMALL)
    other = import_capsule(store, "other", tree / "usr", options=SMALL)
    assert v1.version != v2.version
    live = store.begin_import()  # an import in progress, holding its flock
    (live.chunks_dir / ("ab" * 32)).write_bytes(b"staged")
    dead = store.tmp_dir / "import-dead"
    (dead / "chunks").mkdir(parents=True)
    (dead / "lock").write_bytes(b"")
    try:
        report = store.gc(in_use={v1.version})
        assert report.removed_chunks == 0 and report.removed_manifests == 0
        assert report.live_imports == 1 and report.removed_staging == 1
        assert not dead.exists() and live.dir.exists()
        assert set(report.kept_versions) == {v1.version, v2.version, other.version}

        store.delete("other")
        report = store.gc()  # v1 no longer in use: its private chunks go, v2 stays whole
        assert report.removed_manifests == 2 and report.removed_chunks > 0
        assert not store.manifest_path(v1.version).exists()
        assert verify_version(store, v2.version).ok
        assert live.dir.exists()
    finally:
        live.close()
    assert store.gc().removed_chunks == 0


def test_dedup_hit_survives_concurrent_gc(store: CapsuleStore, tree: Path) -> None:
    """A chunk an import reuses is hard-linked into its staging dir, so gc cannot pull it away."""
    r = import_capsule(store, "base", tree, options=SMALL)
    h = store.load_manifest(r.version).chunks[0].sha256
    staging = store.begin_import()
    try:
        assert staging.adopt_existing(h)
        store.delete("base")
        store.gc()
        assert not store.chunk_path(h).exists()
        assert staging.staged_chunk(h).exists()
    finally:
        staging.close()


@pytest.mark.parametrize("name", ["", "../x", ".hidden", "a/b", "x" * 200])
def test_bad_names_are_refused(store: CapsuleStore, tree: Path, name: str) -> None:
    with pytest.raises(CapsuleError, match="invalid capsule name"):
        import_capsule(store, name, tree, options=SMALL)


def test_bad_source_is_refused(store: CapsuleStore, tmp_path: Path) -> None:
    with pytest.raises(CapsuleError, match="does not exist"):
        import_capsule(store, "x", tmp_path / "nope")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    with pytest.raises(CapsuleError, match="cannot read tar"):
        import_capsule(store, "x", junk)
    assert store.names() == {} and os.listdir(store.tmp_dir) == []


def test_read_api_refuses_path_tricks(store: CapsuleStore) -> None:
    for bad in ("../../etc/passwd", "AB" * 32, "ab" * 31):
        with pytest.raises(CapsuleError):
            store.chunk_path(bad)
        with pytest.raises(CapsuleError):
            store.manifest_path(bad)
        with pytest.raises(CapsuleError):
            store.kernel_path(bad)
    assert store.resolve("../etc") is None


def test_default_options_on_small_tree(store: CapsuleStore, tree: Path) -> None:
    r = import_capsule(store, "d", tree, options=ImportOptions())
    m = store.load_manifest(r.version)
    assert m.meta["chunker"]["avg"] == 1024 * 1024 and m.meta["zstd_level"] == 3
    assert all(c.raw_size <= 4 * 1024 * 1024 for c in m.chunks)


def test_process_workers_match_threads(store: CapsuleStore, tree: Path, tmp_path: Path) -> None:
    threads = import_capsule(store, "t", tree, options=SMALL)
    procs = import_capsule(CapsuleStore(tmp_path / "p"), "p", tree,
                           options=dataclasses.replace(SMALL, processes=True))
    assert procs.version == threads.version and procs.new_chunks == threads.new_chunks
    again = import_capsule(store, "p", tree, options=dataclasses.replace(SMALL, processes=True))
    assert again.version == threads.version and again.new_chunks == 0


def test_verify_checks_the_kernel(store: CapsuleStore, tree: Path) -> None:
    r = import_capsule(store, "base", tree, options=SMALL)
    assert r.kernel is not None
    store.kernel_path(r.kernel.sha256).write_bytes(b"tampered!!")
    report = verify_version(store, r.version)
    assert report.bad == [{"kind": "kernel", "sha256": r.kernel.sha256, "problem": "sha256 mismatch"}]
