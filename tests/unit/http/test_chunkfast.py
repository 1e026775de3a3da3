"""Which requests the chunk fast path may answer itself: only unmistakably simple whole-chunk GETs."""

from __future__ import annotations

import pytest

from bootd.net.http.chunkfast import ChunkFastPath

H = "ab" * 32


def req(line: str = f"GET /chunks/{H} HTTP/1.1", *headers: str) -> bytes:
    return ("\r\n".join((line, *headers)) + "\r\n\r\n").encode("latin-1")


def test_plain_get_is_taken() -> None:
    assert ChunkFastPath.parse(req()) == H
    assert ChunkFastPath.parse(req(f"GET /chunks/{H} HTTP/1.1", "Host: 10.0.0.1:8080", "User-Agent: x",
                                   "Accept: */*")) == H


@pytest.mark.parametrize("data", [
    req(f"GET /chunks/{H.upper()} HTTP/1.1"),               # the route lowercases; leave it the odd case
    req(f"GET /chunks/{H[:-1]} HTTP/1.1"),                  # too short
    req(f"GET /chunks/{H}0 HTTP/1.1"),                       # too long
    req(f"GET /chunks/{H[:-1]}g HTTP/1.1"),                 # not hex
    req(f"GET /chunks/{H} HTTP/1.0"),                        # 1.0 keep-alive rules: aiohttp's
    req(f"HEAD /chunks/{H} HTTP/1.1"),
    req(f"GET /chunks/{H}?x=1 HTTP/1.1"),
    req(f"GET /chunks/../{H[3:]} HTTP/1.1"),
    req(f"GET /chunks/{H} HTTP/1.1", "Range: bytes=0-1"),
    req(f"GET /chunks/{H} HTTP/1.1", "range: bytes=0-1"),
    req(f"GET /chunks/{H} HTTP/1.1", "If-None-Match: \"x\""),
    req(f"GET /chunks/{H} HTTP/1.1", "Connection: close"),
    req(f"GET /chunks/{H} HTTP/1.1", "Content-Length: 3"),
    req(f"GET /chunks/{H} HTTP/1.1", "Transfer-Encoding: chunked"),
    req(f"GET /chunks/{H} HTTP/1.1", "Expect: 100-continue"),
    req(f"GET /chunks/{H} HTTP/1.1", "Upgrade: websocket"),
    req(f"GET /chunks/{H} HTTP/1.1", "Host x"),              # no colon: aiohttp gives the 400
    req(f"GET /chunks/{H} HTTP/1.1", "Host : a"),            # space before the colon: aiohttp's 400 too
    req(f"GET /chunks/{H} HTTP/1.1", ": a"),                 # no field name
    req(f"GET /chunks/{H} HTTP/1.1", "Host: a", ""),         # an empty line inside the block
    req(f"GET /chunks/{H} HTTP/1.1", "Host: a\rX: b"),       # bare CR
    req(f"GET /chunks/{H} HTTP/1.1", "X-A: 1", "IF-MATCH: \"x\""),  # any case, any position
    req(f"GET /chunks/{H} HTTP/1.1", "Host: a", " folded"),  # obsolete line folding
    req(f"GET /chunks/{H} HTTP/1.1", "Host: a\nX: b"),       # bare LF
    req(f"GET /chunks/{H} HTTP/1.1", "Host: a\0"),
    req(f"GET /chunks/{H} HTTP/1.1", "X: " + "a" * 5000),    # oversized
    req() + req(),                                           # pipelined: aiohttp keeps the order
    req()[:-2],                                              # incomplete
    req() + b"x",                                            # trailing bytes
])
def test_anything_else_is_left_to_aiohttp(data: bytes) -> None:
    assert ChunkFastPath.parse(data) is None
