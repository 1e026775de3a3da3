"""Container images as capsule sources: OCI image layouts (directory or tar) and ``docker save`` archives.

Nothing can be pulled from a registry on a cluster's master, but administrators
bring images as files: ``skopeo copy ... oci:DIR`` / ``oci-archive:FILE.tar``,
``umoci``, ``buildah push ... oci-archive:``, or ``docker save``. Such an image
is a stack of layer tarballs; the root tree is what extracting them in order
gives, with the OCI whiteouts honoured (image-spec, layer.md):

* ``DIR/.wh.NAME`` in a layer removes ``DIR/NAME`` (and everything under it)
  of the layers below;
* ``DIR/.wh..wh..opq`` hides every child of ``DIR`` the layers below had;
* an entry replaces the same path below; a non-directory replacing a
  directory removes that directory's children.

The layers are not extracted: their members are merged by name and handed to
the importer as one ``TarSource``, so no root privileges, device nodes or
disk space for an unpacked tree are needed. Every blob is checked before it
is used: the manifest, config and each layer against the sha256 (or sha512)
digest that names it, each layer's uncompressed bytes against the config's
``rootfs.diff_ids``. A blob that does not match is refused, naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard

from bootd.capsule.archive import Member, TarSource, normalize_member_name, open_tar
from bootd.errors import CapsuleError

WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": None,
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": None,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
}
_MAX_JSON = 16 << 20  # manifests, indexes and configs are small; refuse a huge one before parsing it


@dataclass(frozen=True)
class Layer:
    """One layer as the image names it: where its blob is, how it is packed, what it must hash to."""

    blob: str  # path inside the layout or archive
    digest: str | None  # "sha256:<hex>" of the blob as stored (None: docker-save v1 names)
    size: int | None
    compression: str | None  # None, "gzip", "zstd", or "auto" (sniffed)
    diff_id: str | None  # "sha256:<hex>" of the uncompressed tar, from the config


class _Blobs:
    """Read files of an image laid out in a directory or inside an (uncompressed) tar."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.tf: tarfile.TarFile | None = None
        self.members: dict[bytes, tarfile.TarInfo] = {}
        if source.is_file():
            self.tf, members = open_tar(source)
            for m in members:
                if m.isreg():
                    self.members[normalize_member_name(m.name)] = m

    def has(self, rel: str) -> bool:
        if self.tf is None:
            return (self.source / rel).is_file()
        return normalize_member_name(rel) in self.members

    def open(self, rel: str) -> BinaryIO:
        if self.tf is None:
            path = (self.source / rel).resolve()
            if not path.is_relative_to(self.source.resolve()):
                raise CapsuleError(f"image {self.source}: blob path {rel!r} leaves the layout; refusing it")
            try:
                return open(path, "rb")
            except FileNotFoundError:
                raise CapsuleError(f"image {self.source}: blob {rel} is missing") from None
        m = self.members.get(normalize_member_name(rel))
        f = None if m is None else self.tf.extractfile(m)
        if f is None:
            raise CapsuleError(f"image {self.source}: blob {rel} is missing")
        return cast(BinaryIO, f)

    def size(self, rel: str) -> int:
        if self.tf is None:
            return (self.source / rel).stat().st_size
        return self.members[normalize_member_name(rel)].size

    def close(self) -> None:
        if self.tf is not None:
            self.tf.close()


def _blob_path(digest: str) -> str:
    algo, _, hexdigest = digest.partition(":")
    if algo not in ("sha256", "sha512") or not hexdigest or any(c not in "0123456789abcdef" for c in hexdigest):
        raise CapsuleError(f"unsupported or malformed digest {digest!r}; expected sha256:<hex> or sha512:<hex>")
    return f"blobs/{algo}/{hexdigest}"


class _Hashing:
    """A reader that hashes what passes through it, so a blob is checked while it is consumed."""

    def __init__(self, f: BinaryIO, algo: str) -> None:
        self.f = f
        self.h = hashlib.new(algo)
        self.n = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.n += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _check(where: str, digest: str, got: _Hashing, size: int | None) -> None:
    if size is not None and got.n != size:
        raise CapsuleError(f"{where} {digest} is corrupt: {got.n} bytes, the image says {size}; refusing the image")
    if f"{digest.partition(':')[0]}:{got.h.hexdigest()}" != digest:
        raise CapsuleError(f"{where} {digest} is corrupt: its content hashes to "
                           f"{digest.partition(':')[0]}:{got.h.hexdigest()}; refusing the image")


def _read_json(blobs: _Blobs, rel: str, digest: str | None, what: str) -> Any:
    with blobs.open(rel) as f:
        data = f.read(_MAX_JSON + 1)
    if len(data) > _MAX_JSON:
        raise CapsuleError(f"image {blobs.source}: {what} {rel} is larger than {_MAX_JSON} bytes; refusing it")
    if digest is not None:
        algo = digest.partition(":")[0]
        got = f"{algo}:{hashlib.new(algo, data).hexdigest()}"
        if got != digest:
            raise CapsuleError(f"{what} {digest} is corrupt: its content hashes to {got}; refusing the image")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CapsuleError(f"image {blobs.source}: {what} {rel} is not valid JSON: {exc}") from None


def _pick_manifest(blobs: _Blobs, index: Any, platform: str, depth: int = 0) -> dict[str, Any]:
    """The image manifest an index names: the only one, or the one for ``platform`` (os/arch)."""
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list) or not manifests:
        raise CapsuleError(f"image {blobs.source}: index lists no manifests")
    if len(manifests) > 1:
        want_os, _, want_arch = platform.partition("/")
        fits = [m for m in manifests if isinstance(m, dict)
                and m.get("platform", {}).get("os", want_os) == want_os
                and m.get("platform", {}).get("architecture", want_arch) == want_arch]
        if len(fits) != 1:
            names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name", m.get("digest", "?"))
                     for m in manifests if isinstance(m, dict)]
            raise CapsuleError(f"image {blobs.source} holds {len(manifests)} images ({', '.join(names)}) "
                               f"and {len(fits)} of them are for {platform}; give an image with one")
        manifests = fits
    desc = manifests[0]
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise CapsuleError(f"image {blobs.source}: index entry without a digest")
    doc = _read_json(blobs, _blob_path(desc["digest"]), desc["digest"], "manifest")
    media = desc.get("mediaType") or (doc.get("mediaType") if isinstance(doc, dict) else None)
    if media in INDEX_TYPES:
        if depth > 4:
            raise CapsuleError(f"image {blobs.source}: indexes nested too deeply")
        return _pick_manifest(blobs, doc, platform, depth + 1)
    if not isinstance(doc, dict):
        raise CapsuleError(f"image {blobs.source}: manifest {desc['digest']} is not a JSON object")
    return doc


def _oci_layers(blobs: _Blobs, platform: str) -> list[Layer]:
    index = _read_json(blobs, "index.json", None, "index")
    manifest = _pick_manifest(blobs, index, platform)
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config_desc, dict) or not isinstance(layers, list):
        raise CapsuleError(f"image {blobs.source}: manifest has no config or layers")
    config = _read_json(blobs, _blob_path(str(config_desc.get("digest"))), str(config_desc.get("digest")), "config")
    diff_ids = _diff_ids(config, len(layers), blobs.source)
    out = []
    for i, desc in enumerate(layers):
        if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
            raise CapsuleError(f"image {blobs.source}: layer {i + 1} has no digest")
        media = desc.get("mediaType", "")
        if media not in LAYER_TYPES:
            raise CapsuleError(f"image {blobs.source}: layer {i + 1} has media type {media!r}; "
                               f"expected one of: {', '.join(LAYER_TYPES)}")
        size = desc.get("size")
        out.append(Layer(_blob_path(desc["digest"]), desc["digest"], size if isinstance(size, int) else None,
                         LAYER_TYPES[media], diff_ids[i] if diff_ids else None))
    return out


def _diff_ids(config: Any, count: int, source: Path) -> list[str] | None:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != count or not all(isinstance(x, str) for x in ids):
        raise CapsuleError(f"image {source}: config lists {len(ids) if isinstance(ids, list) else '?'} "
                           f"diff_ids for {count} layers")
    return ids


def _docker_layers(blobs: _Blobs) -> list[Layer]:
    doc = _read_json(blobs, "manifest.json", None, "manifest")
    if not isinstance(doc, list) or len(doc) != 1 or not isinstance(doc[0], dict):
        n = len(doc) if isinstance(doc, list) else "?"
        raise CapsuleError(f"image {blobs.source}: docker archive holds {n} images; save one image per archive")
    entry = doc[0]
    config_rel, layer_rels = entry.get("Config"), entry.get("Layers")
    if not isinstance(config_rel, str) or not isinstance(layer_rels, list):
        raise CapsuleError(f"image {blobs.source}: manifest.json has no Config or Layers")
    # The config is named by its sha256 (<hex>.json, or blobs/sha256/<hex> since Docker 25).
    base = os.path.basename(config_rel).removesuffix(".json")
    config_digest = f"sha256:{base}" if len(base) == 64 else None
    config = _read_json(blobs, config_rel, config_digest, "config")
    diff_ids = _diff_ids(config, len(layer_rels), blobs.source)
    if diff_ids is None:
        raise CapsuleError(f"image {blobs.source}: config has no rootfs.diff_ids, so its layers cannot be checked")
    out = []
    for rel, diff_id in zip(layer_rels, diff_ids, strict=True):
        if not isinstance(rel, str):
            raise CapsuleError(f"image {blobs.source}: a layer path in manifest.json is not a string")
        digest = None
        if rel.startswith("blobs/sha256/"):
            digest = "sha256:" + rel.rsplit("/", 1)[1]
        out.append(Layer(rel, digest, None, "auto", diff_id))
    return out


def _decompressor(kind: str | None, raw: _Hashing) -> BinaryIO:
    if kind == "auto":
        head = raw.read(4)
        kind = "gzip" if head[:2] == b"\x1f\x8b" else "zstd" if head == b"\x28\xb5\x2f\xfd" else None
        raw = cast(_Hashing, _Prefixed(head, raw))
    if kind == "gzip":
        return cast(BinaryIO, gzip.GzipFile(fileobj=cast(BinaryIO, raw), mode="rb"))
    if kind == "zstd":
        return cast(BinaryIO, zstandard.ZstdDecompressor().stream_reader(cast(BinaryIO, raw), read_across_frames=True))
    return cast(BinaryIO, raw)


class _Prefixed:
    """Bytes already read (a sniffed magic) followed by the rest of the stream."""

    def __init__(self, head: bytes, rest: _Hashing) -> None:
        self.head = head
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.rest.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.rest.read(n)

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)


def _spool_layer(blobs: _Blobs, layer: Layer, n: int, dest: Path, progress: Callable[[int], None] | None) -> None:
    """Copy one layer to ``dest`` as a plain tar, checking its blob digest and its diff_id."""
    where = f"layer {n} ({layer.blob})"
    algo = layer.digest.partition(":")[0] if layer.digest else "sha256"
    try:
        with blobs.open(layer.blob) as f:
            raw = _Hashing(f, algo)
            plain = _Hashing(_decompressor(layer.compression, raw), "sha256")
            with open(dest, "wb") as out:
                while block := plain.read(1 << 20):
                    out.write(block)
                    if progress is not None:
                        progress(len(block))
            raw.drain()
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        if layer.digest is not None:  # a damaged compressed blob: say it is the digest that fails
            raise CapsuleError(f"{where} {layer.digest} is corrupt: it does not decompress ({exc}); "
                               "refusing the image") from None
        raise CapsuleError(f"{where} does not decompress: {exc}; refusing the image") from None
    if layer.digest is not None:
        _check(where, layer.digest, raw, layer.size)
    if layer.diff_id is not None:
        _check(f"{where}, uncompressed,", layer.diff_id, plain, None)


def image_kind(source: Path) -> str | None:
    """"oci" for an OCI layout (directory or tar), "docker" for a docker-save tar, else None."""
    if source.is_dir():
        return "oci" if (source / "oci-layout").is_file() and (source / "index.json").is_file() else None
    try:
        with tarfile.open(source, "r:") as tf:
            names = set()
            for i, m in enumerate(tf):  # the first entries are enough to tell a layout from a root tree
                names.add(normalize_member_name(m.name))
                if i > 10_000:
                    break
    except (tarfile.TarError, OSError, EOFError, CapsuleError):
        return None
    if b"oci-layout" in names and b"index.json" in names:
        return "oci"
    if b"manifest.json" in names and not (b"etc" in names or b"bin" in names or b"usr" in names):
        return "docker"
    return None


def merge_layers(layer_tars: list[Path], source: Path) -> TarSource:
    """Apply the layers in order with OCI whiteout rules; the merged tree as one TarSource."""
    tfs: list[tarfile.TarFile] = []
    merged: dict[bytes, Member] = {}
    try:
        for path in layer_tars:
            tf, members = open_tar(path)
            tfs.append(tf)
            own: dict[bytes, Member] = {}
            hide: list[bytes] = []  # subtrees of lower layers this layer removes
            opaque: list[bytes] = []  # directories whose lower children this layer hides
            for m in members:
                name = normalize_member_name(m.name)
                parent, _, base = name.rpartition(b"/")
                if base == OPAQUE:
                    opaque.append(parent)
                elif base.startswith(WHITEOUT):
                    hide.append((parent + b"/" if parent else b"") + base[len(WHITEOUT):])
                else:
                    own[name] = (tf, m)
            for top in hide:
                _drop(merged, top, itself=True)
            for top in opaque:
                _drop(merged, top, itself=False)
            for name, member in own.items():
                below = merged.get(name)
                if below is not None and below[1].isdir() and not member[1].isdir():
                    _drop(merged, name, itself=False)
                merged[name] = member
    except BaseException:
        for tf in tfs:
            tf.close()
        raise
    return TarSource.merged(source, tfs, merged)


def _drop(merged: dict[bytes, Member], top: bytes, itself: bool) -> None:
    prefix = top + b"/" if top else b""
    for name in [n for n in merged if n.startswith(prefix) and n != top]:
        del merged[name]
    if itself:
        merged.pop(top, None)


def open_image(source: Path, workdir: Path, platform: str = "linux/amd64",
               progress: Callable[[int], None] | None = None) -> TarSource | None:
    """The root tree of the image at ``source`` (None if it is no image); layers are spooled into ``workdir``."""
    kind = image_kind(source)
    if kind is None:
        return None
    blobs = _Blobs(source)
    try:
        if kind == "oci":
            layout = _read_json(blobs, "oci-layout", None, "oci-layout")
            if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
                raise CapsuleError(f"image {source}: unsupported oci-layout {layout!r}; "
                                   "expected imageLayoutVersion 1.x")
            layers = _oci_layers(blobs, platform)
        else:
            layers = _docker_layers(blobs)
        if not layers:
            raise CapsuleError(f"image {source} has no layers")
        tars = []
        for n, layer in enumerate(layers, 1):
            dest = workdir / f"layer-{n:03d}.tar"
            _spool_layer(blobs, layer, n, dest, progress)
            tars.append(dest)
    finally:
        blobs.close()
    return merge_layers(tars, source)
