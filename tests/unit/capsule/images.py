"""Container images built by hand from the OCI image specification (tarfile + json + sha256).

Nothing can be pulled here, so the tests write the layouts themselves: an OCI
image layout (directory or tar, as ``skopeo copy ... oci-archive:`` writes)
and a ``docker save`` archive, from layers given as lists of members.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

MTIME = 1_700_000_000


@dataclass(frozen=True)
class M:
    """One layer member: a file (data), a directory (data None, kind 'dir'), a symlink or a hardlink."""

    name: str
    data: bytes | None = None
    kind: str = "file"  # file, dir, sym, link
    target: str = ""
    mode: int = 0o644


def layer_tar(members: list[M]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.mtime, info.mode, info.uid, info.gid = MTIME, m.mode, 0, 0
            if m.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif m.kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, m.target
                tf.addfile(info)
            elif m.kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, m.target
                tf.addfile(info)
            else:
                data = m.data or b""
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _compress(data: bytes, how: str) -> tuple[bytes, str]:
    if how == "gzip":
        return gzip.compress(data, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(data), "application/vnd.oci.image.layer.v1.tar+zstd"
    return data, "application/vnd.oci.image.layer.v1.tar"


def oci_files(layers: list[list[M]], compress: tuple[str, ...] = ()) -> dict[str, bytes]:
    """The files of an OCI image layout (path -> bytes) holding one image of these layers."""
    files: dict[str, bytes] = {}
    descs, diff_ids = [], []
    for i, members in enumerate(layers):
        plain = layer_tar(members)
        blob, media = _compress(plain, compress[i] if i < len(compress) else "none")
        files["blobs/sha256/" + _sha(blob)[7:]] = blob
        descs.append({"mediaType": media, "digest": _sha(blob), "size": len(blob)})
        diff_ids.append(_sha(plain))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    files["blobs/sha256/" + _sha(config)[7:]] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _sha(config), "size": len(config)},
                           "layers": descs}).encode()
    files["blobs/sha256/" + _sha(manifest)[7:]] = manifest
    files["index.json"] = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}).encode()
    files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
    return files


def docker_files(layers: list[list[M]]) -> dict[str, bytes]:
    """The files of a classic ``docker save`` archive (<id>/layer.tar, <config>.json, manifest.json)."""
    files: dict[str, bytes] = {}
    paths, diff_ids = [], []
    for members in layers:
        plain = layer_tar(members)
        layer_id = hashlib.sha256(b"id" + plain).hexdigest()
        files[f"{layer_id}/layer.tar"] = plain
        files[f"{layer_id}/VERSION"] = b"1.0"
        paths.append(f"{layer_id}/layer.tar")
        diff_ids.append(_sha(plain))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    files[_sha(config)[7:] + ".json"] = config
    files["manifest.json"] = json.dumps([{"Config": _sha(config)[7:] + ".json",
                                          "RepoTags": ["test:latest"], "Layers": paths}]).encode()
    return files


def write_dir(files: dict[str, bytes], dest: Path) -> Path:
    for rel, data in files.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(data)
    return dest


def write_tar(files: dict[str, bytes], dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        for rel, data in sorted(files.items()):
            info = tarfile.TarInfo(rel)
            info.size, info.mtime = len(data), MTIME
            tf.addfile(info, io.BytesIO(data))
    return dest


# Three layers with a whiteout, a directory whiteout, an opaque directory, a file replacing a
# directory and a hard link into a lower layer; EXPECTED is the tree they describe.
LAYERS: list[list[M]] = [
    [M("etc", kind="dir"), M("etc/a", b"a1"), M("etc/keep", b"keep"), M("usr", kind="dir"),
     M("usr/b", b"b1"), M("usr/lib", kind="dir"), M("usr/lib/libx.so", b"x" * 5000),
     M("opt", kind="dir"), M("opt/data", kind="dir"), M("opt/data/x", b"x"), M("opt/data/sub", kind="dir"),
     M("opt/data/sub/y", b"y"), M("var", kind="dir"), M("var/old", kind="dir"), M("var/old/f", b"f"),
     M("srv", kind="dir"), M("srv/dir", kind="dir"), M("srv/dir/child", b"c")],
    [M("etc", kind="dir"), M("etc/a", b"a2"), M("usr", kind="dir"), M("usr/.wh.b"),
     M("opt/data", kind="dir"), M("opt/data/.wh..wh..opq"), M("opt/data/z", b"z"),
     M("var", kind="dir"), M("var/.wh.old")],
    [M("etc/new", b"new", mode=0o600), M("lib", kind="sym", target="usr/lib"), M("srv/dir", b"now a file"),
     M("etc/keep-link", kind="link", target="etc/keep"), M("opt/data/z2", b"z2")],
]
EXPECTED: dict[str, bytes | None] = {  # path -> content (None: directory or link)
    "etc": None, "etc/a": b"a2", "etc/keep": b"keep", "etc/keep-link": b"keep", "etc/new": b"new",
    "usr": None, "usr/lib": None, "usr/lib/libx.so": b"x" * 5000, "opt": None, "opt/data": None,
    "opt/data/z": b"z", "opt/data/z2": b"z2", "var": None, "lib": None, "srv": None, "srv/dir": b"now a file",
}
