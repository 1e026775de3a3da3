"""ObjectWriter: an object from another server is placed only whole, with its sha256, and atomically."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bootd.capsule.objects import CapsuleStore, ObjectWriter
from bootd.errors import CapsuleError


def test_object_is_placed_only_when_whole_and_right(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    data = b"x" * 100_000
    name = hashlib.sha256(data).hexdigest()
    with store.begin_import() as staging:
        w = ObjectWriter(staging, "chunk", name, limit=1 << 20, size=len(data))
        w.write(data[:50_000])
        assert not store.chunk_path(name).exists()  # nothing visible before commit
        w.write(data[50_000:])
        assert w.commit() is True
        assert store.chunk_path(name).read_bytes() == data
        assert store.chunk_path(name).stat().st_mode & 0o077 == 0
        again = ObjectWriter(staging, "chunk", name, limit=1 << 20, size=len(data))
        again.write(data)
        assert again.commit() is False  # there already: left as it is
        assert [p.name for p in staging.dir.iterdir() if p.is_file()] == ["lock"]  # no temp file left


@pytest.mark.parametrize(("size", "sent", "words"), [
    (10, b"y" * 11, "longer than its declared size of 10 bytes"),
    (10, b"y" * 9, "has 9 bytes where the manifest says 10"),
    (None, b"z" * 10, "arrived with sha256"),
])
def test_wrong_bytes_are_refused_and_never_stored(tmp_path: Path, size: int | None, sent: bytes, words: str) -> None:
    store = CapsuleStore(tmp_path / "store")
    name = hashlib.sha256(b"y" * 10).hexdigest()
    with store.begin_import() as staging:
        w = ObjectWriter(staging, "chunk", name, limit=64, size=size)
        with pytest.raises(CapsuleError, match=words):
            w.write(sent)
            w.commit()
        w.abort()
        assert not store.chunk_path(name).exists()
        assert [p.name for p in staging.dir.iterdir() if p.is_file()] == ["lock"]


def test_unknown_kind_or_name_is_refused(tmp_path: Path) -> None:
    store = CapsuleStore(tmp_path / "store")
    with store.begin_import() as staging:
        with pytest.raises(CapsuleError, match="chunk, kernel, manifest"):
            ObjectWriter(staging, "ref", "ab" * 32, limit=1)
        with pytest.raises(CapsuleError, match="64 lowercase hex"):
            ObjectWriter(staging, "chunk", "../etc/passwd", limit=1)
