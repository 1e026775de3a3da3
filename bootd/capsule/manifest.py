"""The capsule manifest: the one object a capsule version id pins.

Binary layout (version 1, integers big-endian), described with construct so the
format is declared once and read the same way by every tool:

    magic     8 bytes  b"BDCAPS01"
    meta_len  u32, meta: canonical JSON (sorted keys, no spaces, UTF-8)
    count     u32
    count x   sha256 (32 raw bytes of the *stored* zstd frame) | stored_size u32 | raw_size u32

The version id is sha256 of these bytes. Because the meta carries no timestamps
and the archive is deterministic, the same tree always yields the same id, and a
node that is told the id can check every byte it unpacks against it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import construct as cs

from bootd.errors import CapsuleError

MAGIC = b"BDCAPS01"
FORMAT_VERSION = 1
RECORD_SIZE = 40
HEX64 = re.compile(r"[0-9a-f]{64}")

_Record = cs.Struct(
    "sha256" / cs.Bytes(32),
    "stored_size" / cs.Int32ub,
    "raw_size" / cs.Int32ub,
)

MANIFEST_FORMAT = cs.Struct(
    "magic" / cs.Const(MAGIC),
    "meta" / cs.Prefixed(cs.Int32ub, cs.GreedyBytes),
    "count" / cs.Int32ub,
    "chunks" / cs.Array(cs.this.count, _Record),
    cs.Terminated,
)

try:
    # Compiled parsing is only safe for trusted input; manifests are parsed only
    # after their sha256 matched the requested version id, so that holds here.
    _FAST_FORMAT: Any = MANIFEST_FORMAT.compile()
except Exception:  # pragma: no cover - construct without compile support
    _FAST_FORMAT = MANIFEST_FORMAT


def is_hex_digest(value: str) -> bool:
    """True for a 64-char lowercase sha256 hex string (the only form used in paths)."""
    return HEX64.fullmatch(value) is not None


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """JSON with one spelling per value, so equal metadata hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One chunk of the archive stream; ``sha256`` names the stored (compressed) bytes."""

    sha256: str
    stored_size: int
    raw_size: int


@dataclass(frozen=True, slots=True)
class KernelRef:
    """The kernel booted with the capsule, stored raw under kernels/<sha256>."""

    sha256: str
    size: int
    path: str
    # The NIC/storage modules of this kernel, taken from the capsule's own /lib/modules/<release> at
    # import: a zstd newc archive stored as chunks/<modules>, which iPXE loads as a second initrd so the
    # stage one drives the NIC with modules that match the kernel by construction.
    modules: str | None = None
    release: str | None = None

    def as_meta(self) -> dict[str, Any]:
        """The manifest's ``kernel`` object; the module keys only when there are modules, so manifests
        of capsules without them keep their bytes (and version ids)."""
        meta: dict[str, Any] = {"sha256": self.sha256, "size": self.size, "path": self.path}
        if self.modules is not None:
            meta |= {"modules": self.modules, "release": self.release}
        return meta


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest; ``meta`` keeps unknown keys so newer writers stay readable."""

    meta: Mapping[str, Any]
    chunks: tuple[ChunkRef, ...]

    @property
    def kernel(self) -> KernelRef | None:
        k = self.meta.get("kernel")
        if not k:
            return None
        modules = k.get("modules")
        if modules is not None and not is_hex_digest(str(modules)):
            raise CapsuleError(f"manifest kernel modules {modules!r} is not a sha256 hex digest")
        return KernelRef(sha256=str(k["sha256"]), size=int(k["size"]), path=str(k["path"]),
                         modules=None if modules is None else str(modules),
                         release=None if k.get("release") is None else str(k["release"]))

    @property
    def raw_size(self) -> int:
        return sum(c.raw_size for c in self.chunks)

    @property
    def stored_size(self) -> int:
        return sum(c.stored_size for c in self.chunks)

    def to_json(self, vid: str | None = None, with_chunks: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.meta)
        if vid is not None:
            out["version"] = vid
        if with_chunks:
            out["chunk_list"] = [
                {"sha256": c.sha256, "stored_size": c.stored_size, "raw_size": c.raw_size}
                for c in self.chunks
            ]
        return out


def build_meta(
    chunks: Iterable[ChunkRef],
    kernel: KernelRef | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The required meta keys, computed from the chunk list so they cannot disagree with it."""
    chunk_list = list(chunks)
    meta: dict[str, Any] = dict(extra or {})
    meta.update(
        {
            "format": FORMAT_VERSION,
            "compression": "zstd",
            "archive": "pax",
            "kernel": kernel.as_meta() if kernel else None,
            "raw_size": sum(c.raw_size for c in chunk_list),
            "stored_size": sum(c.stored_size for c in chunk_list),
            "chunks": len(chunk_list),
        }
    )
    return meta


def encode_manifest(meta: Mapping[str, Any], chunks: Iterable[ChunkRef]) -> bytes:
    """Serialise a manifest; the caller's version id is ``version_id(result)``."""
    records = []
    for c in chunks:
        if not is_hex_digest(c.sha256):
            raise CapsuleError(f"chunk hash {c.sha256!r} is not a sha256 hex digest")
        records.append({"sha256": bytes.fromhex(c.sha256), "stored_size": c.stored_size,
                        "raw_size": c.raw_size})
    try:
        return bytes(MANIFEST_FORMAT.build(
            {"meta": canonical_json(meta), "count": len(records), "chunks": records}
        ))
    except cs.ConstructError as exc:
        raise CapsuleError(f"cannot encode manifest: {exc}") from exc


def decode_manifest(data: bytes) -> Manifest:
    """Parse manifest bytes; raises CapsuleError naming what is wrong."""
    if data[:8] != MAGIC:
        raise CapsuleError(f"not a bootd capsule manifest (magic {data[:8]!r}, expected {MAGIC!r})")
    if len(data) < 16:
        raise CapsuleError(f"corrupt manifest: {len(data)} bytes is too short")
    meta_len = int.from_bytes(data[8:12], "big")
    end = 12 + meta_len
    if end + 4 > len(data):
        raise CapsuleError("corrupt manifest: metadata length runs past the end")
    count = int.from_bytes(data[end:end + 4], "big")
    if len(data) != end + 4 + count * RECORD_SIZE:
        raise CapsuleError(
            f"corrupt manifest: {len(data)} bytes, but {count} chunk records need {end + 4 + count * RECORD_SIZE}"
        )
    try:
        parsed = _FAST_FORMAT.parse(data)
    except Exception as exc:  # the compiled parser raises struct.error etc., not only ConstructError
        raise CapsuleError(f"corrupt manifest: {exc}") from exc
    try:
        meta = json.loads(bytes(parsed.meta).decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CapsuleError(f"corrupt manifest metadata: {exc}") from exc
    if not isinstance(meta, dict):
        raise CapsuleError("corrupt manifest metadata: not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise CapsuleError(f"unsupported capsule format {meta.get('format')!r} (this bootd reads 1)")
    chunks = tuple(
        ChunkRef(sha256=bytes(r.sha256).hex(), stored_size=int(r.stored_size), raw_size=int(r.raw_size))
        for r in parsed.chunks
    )
    return Manifest(meta=meta, chunks=chunks)


def version_id(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()
