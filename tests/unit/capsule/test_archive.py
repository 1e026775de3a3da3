from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from bootd.capsule.archive import (
    DIR,
    REG,
    ArchiveStream,
    Entry,
    TarSource,
    compression_of,
    decompress_to,
    normalize_member_name,
    walk_directory,
)
from bootd.errors import CapsuleError
from tests.unit.capsule.trees import fix_times, make_tree


def archive_bytes(entries: list[Entry] | ArchiveStream) -> bytes:
    stream = entries if isinstance(entries, ArchiveStream) else ArchiveStream(iter(entries))
    out = bytearray()
    buf = bytearray(7777)  # an odd size exercises every boundary in readinto
    mv = memoryview(buf)
    while n := stream.readinto(mv):
        out += mv[:n]
    return bytes(out)


def test_stream_is_valid_pax_with_long_and_unicode_names(tmp_path: Path) -> None:
    root = tmp_path / "root"
    long_dir = root / ("d" * 90) / ("e" * 40)
    long_dir.mkdir(parents=True)
    (long_dir / "f.txt").write_bytes(b"hello")
    (root / "caf\u00e9").write_bytes(b"x" * 1000)
    (root / "link").symlink_to("t" * 150)
    (root / "empty").write_bytes(b"")
    os.setxattr(root / "empty", "user.bootd", b"\x00\xffvalue")
    fix_times(root)
    data = archive_bytes(walk_directory(root))
    assert len(data) % 512 == 0 and data.endswith(b"\0" * 1024)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        members = {m.name: m for m in tf.getmembers()}
        assert next(iter(members)) == "."
        long_name = "./" + "d" * 90 + "/" + "e" * 40 + "/f.txt"
        assert long_name in members
        f = tf.extractfile(members[long_name])
        assert f is not None and f.read() == b"hello"
        assert members["./caf\u00e9"].size == 1000
        assert members["./link"].linkname == "t" * 150
        assert members["./empty"].pax_headers["SCHILY.xattr.user.bootd"].encode(
            "utf-8", "surrogateescape") == b"\x00\xffvalue"
        assert all(m.uname == "" and m.gname == "" and m.mtime == 1_700_000_000 for m in members.values())


def test_order_is_sorted_depth_first(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for p in ("b/z", "a", "a.d/x", "b/a", "B"):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(p)
    names = [e.path for e in walk_directory(root)]
    assert names == [b"", b"B", b"a", b"a.d", b"a.d/x", b"b", b"b/a", b"b/z"]


def test_gnu_tar_lists_the_stream(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t", files=10)
    (root / "hl").hardlink_to(root / "bin" / "file0000")
    (root / "sym").symlink_to("bin/file0000")
    data = archive_bytes(walk_directory(root))
    out = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True).stdout.decode()
    assert "./hl link to ./bin/file0000" in out
    assert "./sym -> bin/file0000" in out


@pytest.mark.parametrize("compress", ["", "gzip", "xz", "zstd", "bzip2"])
def test_tar_source_gives_the_same_stream_as_the_directory(tmp_path: Path, compress: str) -> None:
    root = make_tree(tmp_path / "t", files=20)
    (root / "zz-first").write_bytes(b"shared")
    (root / "aa-link").hardlink_to(root / "zz-first")  # link sorts before its tar target
    (root / "sym").symlink_to("zz-first")
    fix_times(root)
    tarball = tmp_path / "t.tar"
    # GNU tar's own order (not sorted) and its own header choices.
    subprocess.run(["tar", "--xattrs", "-C", str(root), "-cf", str(tarball), "."], check=True)
    if compress:
        subprocess.run([compress, "-q", str(tarball)], check=True)
        tarball = next(tmp_path.glob("t.tar.*"))
        assert compression_of(tarball) is not None
        plain = tmp_path / "plain.tar"
        decompress_to(tarball, plain, str(compression_of(tarball)))
        tarball = plain
    src = TarSource(tarball)
    try:
        assert archive_bytes(src.entries()) == archive_bytes(walk_directory(root))
    finally:
        src.close()


def test_tar_member_escaping_root_is_refused() -> None:
    assert normalize_member_name("./a/./b/") == b"a/b"
    assert normalize_member_name("/etc/passwd") == b"etc/passwd"
    with pytest.raises(CapsuleError, match="escapes the root"):
        normalize_member_name("../etc/passwd")


def test_file_that_shrinks_while_read_keeps_the_stream_aligned(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    e = Entry(b"f", REG, 0o644, 0, 0, 0, size=1000, opener=lambda: open(p, "rb", buffering=0))  # noqa: SIM115
    data = archive_bytes([Entry(b"", DIR, 0o755, 0, 0, 0), e])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile("./f")
        assert f is not None and f.read() == b"abc" + b"\0" * 997
