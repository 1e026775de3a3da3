"""Range parsing, ETag matching and the open-file cache used for sendfile."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bootd.net.files import OCTET, OpenFileCache, chunk_head, etag_matches, object_headers, parse_range, response_head
from bootd.net.http.app import effective_base


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("bytes=90-", 100) == (90, 10)
    assert parse_range("bytes=90-1000", 100) == (90, 10)
    assert parse_range("bytes=-10", 100) == (90, 10)
    assert parse_range("bytes=\u00b2-", 100) is None and parse_range("bytes=0-\u00b2", 100) is None  # not ValueError
    assert parse_range("bytes=-1000", 100) == (0, 100)
    for ignored in ("bytes=5-1", "bytes=0-1,4-5", "items=0-1", "bytes=a-b", "bytes=-", "bytes=5"):
        assert parse_range(ignored, 100) is None, ignored
    for bad in ("bytes=100-", "bytes=100-200", "bytes=-0"):
        with pytest.raises(ValueError):
            parse_range(bad, 100)


def test_etag_matches() -> None:
    assert etag_matches('"a"', '"a"')
    assert etag_matches('W/"a"', '"a"')
    assert etag_matches('"x", "a"', '"a"')
    assert etag_matches("*", '"a"')
    assert not etag_matches('"b"', '"a"')


def test_effective_base() -> None:
    assert effective_base("http://127.0.0.1:0", 4321) == "http://127.0.0.1:4321"
    assert effective_base("http://boot.example:8080/", 4321) == "http://boot.example:8080"


def test_cache_hits_evicts_lru_and_never_closes_a_file_in_use(tmp_path: Path) -> None:
    cache = OpenFileCache(max_entries=2)
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x" * (i + 1))
        paths.append(p)
    a = cache.acquire("a", lambda: paths[0])
    assert a.size == 1 and cache.misses == 1
    again = cache.acquire("a", lambda: paths[0])
    assert again is a and cache.hits == 1
    cache.release(again)
    cache.acquire("b", lambda: paths[1])
    c = cache.acquire("c", lambda: paths[2])  # evicts "a", which is still in use
    assert len(cache) == 2 and a.evicted and not a.file.closed
    assert os.pread(a.file.fileno(), 1, 0) == b"x"
    cache.release(a)
    assert a.file.closed
    cache.release(c)
    cache.close()
    assert c.file.closed


def test_cache_revalidates_mutable_and_expired_entries(tmp_path: Path) -> None:
    cache = OpenFileCache(valid=0.0)
    p = tmp_path / "f"
    p.write_bytes(b"one")
    e1 = cache.acquire("f", lambda: p, revalidate=True)
    cache.release(e1)
    tmp = tmp_path / "f.new"
    tmp.write_bytes(b"second")
    tmp.rename(p)
    e2 = cache.acquire("f", lambda: p, revalidate=True)
    assert e2 is not e1 and e2.size == 6 and e1.file.closed
    cache.release(e2)
    p.unlink()
    with pytest.raises(FileNotFoundError):
        cache.acquire("f", lambda: p)  # expired (valid=0) and gone
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        cache.acquire("d", lambda: tmp_path / "d")


def test_past_valid_a_stat_confirms_an_entry_and_one_hashed_at_open_is_hashed_again(tmp_path: Path) -> None:
    """A changed file is let go; an unchanged one is kept after one stat; a hashed one is handed back to be
    hashed again (a file that rots in place is served for at most ``valid``), and stays until replaced."""
    p = tmp_path / "f"
    p.write_bytes(b"one")
    cache = OpenFileCache(valid=60.0)
    assert cache.take("f") is None  # not open: the caller opens it
    e = cache.acquire("f", lambda: p)
    cache.release(e)
    h = hashlib.sha256(b"one").hexdigest()
    v = cache.acquire(h, lambda: p, sha256=h)
    cache.release(v)
    assert cache.take("f") is e and cache.take(h) is v  # inside valid: no check
    cache.release(e)
    cache.release(v)
    cache.valid = 0.0  # expired from now on
    assert cache.take("f") is e and cache.misses == 2  # one stat: the same file
    cache.release(e)
    assert cache.take(h) is None and len(cache) == 2 and not v.file.closed  # to be hashed again
    cache.adopt(cache.prepare(h, str(p), h))
    assert len(cache) == 2 and v.file.closed  # the new entry replaced it
    tmp = tmp_path / "f.new"
    tmp.write_bytes(b"two")
    tmp.rename(p)
    assert cache.take("f") is None and len(cache) == 1 and e.file.closed


def test_chunk_head_is_the_header_block_of_the_open_chunk(tmp_path: Path) -> None:
    h = "ab" * 32
    (tmp_path / h).write_bytes(b"x" * 5)
    cache = OpenFileCache()
    e = cache.acquire(h, lambda: tmp_path / h)
    route = response_head(200, {**object_headers(f'"{h}"', True), "Content-Type": OCTET}, 5)
    assert chunk_head(e) == route and route.startswith(b"HTTP/1.1 200 OK\r\n") and route.endswith(b"\r\n\r\n")
    assert e.head is not None and route.startswith(e.head)  # all but the Date is built once per open chunk
    cache.release(e)


def test_cache_without_keep_unused_closes_a_file_when_its_last_user_releases_it(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    cache = OpenFileCache(keep_unused=False)
    a = cache.acquire("f", lambda: tmp_path / "f", revalidate=True)
    b = cache.acquire("f", lambda: tmp_path / "f", revalidate=True)
    assert a is b and len(cache) == 1 and a.read(1, 3) == b"ell"  # one descriptor shared by both users
    cache.release(a)
    assert len(cache) == 1 and not a.file.closed
    cache.release(b)
    assert len(cache) == 0 and a.file.closed


def test_cache_without_follow_symlinks_refuses_a_link(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        OpenFileCache(follow_symlinks=False).acquire("l", lambda: tmp_path / "link")
    assert OpenFileCache().acquire("l", lambda: tmp_path / "link").read(0, 5) == b"x"
