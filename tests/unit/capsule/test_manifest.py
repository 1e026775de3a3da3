from __future__ import annotations

import hashlib

import pytest

from bootd.capsule.manifest import (
    MAGIC,
    ChunkRef,
    KernelRef,
    build_meta,
    canonical_json,
    decode_manifest,
    encode_manifest,
    version_id,
)
from bootd.errors import CapsuleError


def _chunks(n: int) -> list[ChunkRef]:
    return [ChunkRef(hashlib.sha256(bytes([i])).hexdigest(), 100 + i, 1000 + i) for i in range(n)]


def test_round_trip_and_layout() -> None:
    chunks = _chunks(3)
    kernel = KernelRef("ab" * 32, 1234, "/boot/vmlinuz-6.1")
    meta = build_meta(chunks, kernel)
    data = encode_manifest(meta, chunks)
    # Byte layout from the contract: magic, u32 meta_len, meta, u32 count, 40-byte records.
    assert data[:8] == MAGIC
    meta_len = int.from_bytes(data[8:12], "big")
    assert data[12:12 + meta_len] == canonical_json(meta)
    assert int.from_bytes(data[12 + meta_len:16 + meta_len], "big") == 3
    rec = data[16 + meta_len:16 + meta_len + 40]
    assert rec[:32].hex() == chunks[0].sha256
    assert int.from_bytes(rec[32:36], "big") == 100 and int.from_bytes(rec[36:40], "big") == 1000
    assert len(data) == 16 + meta_len + 3 * 40

    m = decode_manifest(data)
    assert m.chunks == tuple(chunks)
    assert m.kernel == kernel
    assert m.meta["raw_size"] == 3003 and m.meta["stored_size"] == 303 and m.meta["chunks"] == 3
    assert m.meta["format"] == 1 and m.meta["compression"] == "zstd" and m.meta["archive"] == "pax"
    assert version_id(data) == hashlib.sha256(data).hexdigest()


def test_meta_is_canonical() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    chunks = _chunks(2)
    a = encode_manifest(build_meta(chunks, None, {"z": 1, "y": 2}), chunks)
    b = encode_manifest(build_meta(chunks, None, {"y": 2, "z": 1}), chunks)
    assert a == b


@pytest.mark.parametrize("mutate", [
    lambda d: b"XXCAPS01" + d[8:],
    lambda d: d[:-1],
    lambda d: d + b"\0",
    lambda d: d[:12] + b"[" + d[13:],
])
def test_corrupt_manifests_are_refused(mutate) -> None:  # type: ignore[no-untyped-def]
    chunks = _chunks(2)
    data = encode_manifest(build_meta(chunks, None), chunks)
    with pytest.raises(CapsuleError):
        decode_manifest(mutate(data))


def test_future_format_is_refused() -> None:
    meta = build_meta([], None)
    meta["format"] = 2
    with pytest.raises(CapsuleError, match="unsupported capsule format"):
        decode_manifest(encode_manifest(meta, []))
