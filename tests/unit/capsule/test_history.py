"""Every version a name was given is listed until gc's retention rule drops it; rollback makes one current."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.verify import verify_version
from bootd.errors import CapsuleError
from tests.unit.capsule.trees import SMALL, make_tree


def versions(store: CapsuleStore, tree: Path, n: int, opts: ImportOptions = SMALL) -> list[str]:
    out = []
    for i in range(n):
        (tree / "etc" / f"v{i}").write_bytes(os.urandom(200_000))
        out.append(import_capsule(store, "base", tree, options=opts, origin="build", detail=f"step {i}").version)
    return out


def test_history_records_each_new_version_with_store_figures(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "s")
    tree = make_tree(tmp_path / "t", files=30)
    first = import_capsule(store, "base", tree, options=SMALL)
    again = import_capsule(store, "base", tree, options=SMALL)  # unchanged: no new version, no new line
    vids = versions(store, tree, 2)
    hist = store.history("base")
    assert [h.version for h in hist] == [first.version, *vids] and again.version == first.version
    assert [h.origin for h in hist] == ["import", "build", "build"]
    assert hist[0].detail == str(tree) and hist[1].detail == "step 0"
    assert hist[0].new_bytes == hist[0].stored_bytes == store.load_manifest(first.version).stored_size
    # The second version adds one 200 kB random file: only the chunks around it are new.
    assert 0 < hist[1].new_bytes < hist[1].stored_bytes / 2
    assert hist[0].time <= hist[1].time <= hist[2].time
    assert (store.history_dir / "base").stat().st_mode & 0o777 == 0o600


def test_rollback_default_and_by_prefix(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "s")
    tree = make_tree(tmp_path / "t", files=20)
    v = versions(store, tree, 3)
    rec = store.rollback("base")
    assert store.resolve("base") == v[1] and rec.origin == "rollback" and rec.detail == v[2] and rec.new_bytes == 0
    store.rollback("base", v[0][:10])
    assert store.resolve("base") == v[0]
    assert [h.version for h in store.history("base")] == [*v, v[1], v[0]]
    with pytest.raises(CapsuleError, match="already the current version"):
        store.rollback("base", v[0])
    with pytest.raises(CapsuleError, match="is not in its history; versions kept: "):
        store.rollback("base", "abcdef12")
    with pytest.raises(CapsuleError, match="no capsule named 'nope'"):
        store.rollback("nope")


def test_gc_keeps_the_newest_versions_of_each_name(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "s")
    tree = make_tree(tmp_path / "t", files=20)
    v = versions(store, tree, 4)
    store.rollback("base", v[1])  # current v1; most recently current: v1, v3, v2, v0
    report = store.gc(keep_versions=3)
    assert set(report.kept_versions) == {v[1], v[3], v[2]}
    assert report.removed_manifests == 1 and report.dropped_history == 1
    assert v[0] not in [h.version for h in store.history("base")]
    assert all(verify_version(store, x).ok for x in report.kept_versions)
    with pytest.raises(CapsuleError, match="is not in its history"):
        store.rollback("base", v[0])
    store.rollback("base", v[3])
    report = store.gc(keep_versions=1)
    assert report.kept_versions == [v[3]] and report.removed_manifests == 2
    with pytest.raises(CapsuleError, match="no older version"):
        store.rollback("base")
    store.delete("base")
    assert store.history("base") == [] and store.gc().removed_manifests == 1
    with pytest.raises(CapsuleError, match="at least 1"):
        store.gc(keep_versions=0)


def test_corrupt_history_is_named(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "s")
    versions(store, make_tree(tmp_path / "t", files=5), 1)
    with open(store.history_dir / "base", "a") as f:
        f.write("{not json\n")
    with pytest.raises(CapsuleError, match=r"history .*base line 2 is corrupt"):
        store.history("base")
