"""OCI image layouts (directory, tar) and docker-save archives import to exactly the tree their layers describe."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from bootd.capsule.export import write_archive
from bootd.capsule.importer import ImportResult, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.capsule.oci import image_kind
from bootd.errors import CapsuleError
from tests.unit.capsule.images import EXPECTED, LAYERS, M, docker_files, oci_files, write_dir, write_tar


def tree_of(store: CapsuleStore, vid: str) -> dict[str, bytes | None]:
    buf = io.BytesIO()
    write_archive(store, vid, buf)
    buf.seek(0)
    out: dict[str, bytes | None] = {}
    with tarfile.open(fileobj=buf) as tf:
        for m in tf.getmembers():
            name = m.name.removeprefix("./").rstrip("/")
            if name in ("", "."):
                continue
            f = tf.extractfile(m) if m.isreg() or m.islnk() else None
            out[name] = f.read() if f is not None else None
    return out


@pytest.fixture
def store(tmp_path: Path) -> CapsuleStore:
    return CapsuleStore(tmp_path / "store")


@pytest.mark.parametrize("form", ["oci-dir", "oci-tar", "docker"])
def test_three_layers_with_whiteouts_and_opaque_dir(tmp_path: Path, store: CapsuleStore, form: str) -> None:
    if form == "docker":
        src = write_tar(docker_files(LAYERS), tmp_path / "docker.tar")
    else:
        files = oci_files(LAYERS, compress=("gzip", "none", "zstd"))
        src = write_dir(files, tmp_path / "oci") if form == "oci-dir" else write_tar(files, tmp_path / "oci.tar")
    assert image_kind(src) == ("docker" if form == "docker" else "oci")
    r = import_capsule(store, "img", src)
    assert tree_of(store, r.version) == EXPECTED
    with tarfile.open(fileobj=_archive(store, r)) as tf:
        assert tf.getmember("./lib").issym() and tf.getmember("./lib").linkname == "usr/lib"
        assert tf.getmember("./etc/new").mode == 0o600
        assert tf.getmember("./etc/keep-link").islnk()
        assert not any(".wh." in n for n in tf.getnames())


def _archive(store: CapsuleStore, r: ImportResult) -> io.BytesIO:
    buf = io.BytesIO()
    write_archive(store, r.version, buf)
    buf.seek(0)
    return buf


def test_same_image_in_every_form_gives_one_version(tmp_path: Path, store: CapsuleStore) -> None:
    files = oci_files(LAYERS)
    a = import_capsule(store, "a", write_dir(files, tmp_path / "oci"))
    b = import_capsule(store, "b", write_tar(files, tmp_path / "oci.tar"))
    c = import_capsule(store, "c", write_tar(docker_files(LAYERS), tmp_path / "d.tar"))
    assert a.version == b.version == c.version


def test_corrupt_layer_is_refused_naming_its_digest(tmp_path: Path, store: CapsuleStore) -> None:
    files = oci_files(LAYERS, compress=("gzip", "none", "zstd"))
    plain = manifest_of(files)["layers"][1]  # uncompressed: the flip cannot hide in a decompression error
    rel = "blobs/sha256/" + plain["digest"][7:]
    data = bytearray(files[rel])
    data[700] ^= 0x01
    files[rel] = bytes(data)
    with pytest.raises(CapsuleError, match=f"layer 2 .*{plain['digest']} is corrupt: its content hashes to"):
        import_capsule(store, "img", write_dir(files, tmp_path / "oci"))
    assert store.names() == {}
    # A damaged gzip layer is named too.
    files = oci_files(LAYERS, compress=("gzip", "none", "zstd"))
    gz = manifest_layer(files, 0)
    rel = "blobs/sha256/" + gz[7:]
    files[rel] = files[rel][:-12] + b"\0" * 12
    with pytest.raises(CapsuleError, match=f"layer 1 .*{gz} is corrupt"):
        import_capsule(store, "img", write_tar(files, tmp_path / "oci.tar"))
    assert store.names() == {}


def manifest_of(files: dict[str, bytes]) -> dict[str, Any]:
    return dict(next(json.loads(v) for k, v in files.items()
                     if k.startswith("blobs/") and v.startswith(b'{"schemaVersion"')))


def manifest_layer(files: dict[str, bytes], i: int) -> str:
    return str(manifest_of(files)["layers"][i]["digest"])


def test_docker_layer_that_does_not_match_its_diff_id_is_refused(tmp_path: Path, store: CapsuleStore) -> None:
    files = docker_files(LAYERS)
    rel = json.loads(files["manifest.json"])[0]["Layers"][2]
    files[rel] = files[rel].replace(b"now a file", b"now a fil3")
    with pytest.raises(CapsuleError, match=r"layer 3 .*uncompressed.* is corrupt"):
        import_capsule(store, "img", write_tar(files, tmp_path / "d.tar"))
    assert store.names() == {}


def test_bad_images_are_refused_with_a_reason(tmp_path: Path, store: CapsuleStore) -> None:
    files = oci_files([[M("a", b"a")]])
    digest = manifest_layer(files, 0)
    key = next(k for k, v in files.items() if k.startswith("blobs/") and v.startswith(b'{"schemaVersion"'))
    files[key] = files[key].replace(b"v1.tar", b"v1.tar+lz4")
    # The manifest no longer matches its digest in index.json: refused before any layer is read.
    with pytest.raises(CapsuleError, match=r"manifest sha256:.* is corrupt"):
        import_capsule(store, "x", write_dir(files, tmp_path / "a"))
    files = oci_files([[M("a", b"a")]])
    del files["blobs/sha256/" + digest[7:]]
    with pytest.raises(CapsuleError, match=r"blob blobs/sha256/.* is missing"):
        import_capsule(store, "x", write_dir(files, tmp_path / "b"))
    files = oci_files([[M("a", b"a")]])
    index = json.loads(files["index.json"])
    index["manifests"] *= 2
    index["manifests"][1] = dict(index["manifests"][1], platform={"os": "linux", "architecture": "arm64"})
    index["manifests"][0] = dict(index["manifests"][0], platform={"os": "linux", "architecture": "arm64"})
    files["index.json"] = json.dumps(index).encode()
    with pytest.raises(CapsuleError, match=r"holds 2 images .* 0 of them are for linux/amd64"):
        import_capsule(store, "x", write_dir(files, tmp_path / "c"))
    assert store.names() == {}


def test_plain_tarball_is_not_mistaken_for_an_image(tmp_path: Path) -> None:
    src = tmp_path / "root.tar"
    with tarfile.open(src, "w") as tf:
        for name in ("etc/", "manifest.json"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tf.addfile(info, io.BytesIO(b""))
    assert image_kind(src) is None
    assert image_kind(tmp_path) is None


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_umoci_layout_imports_with_its_whiteout(tmp_path: Path, store: CapsuleStore) -> None:
    """An image made by another tool: umoci writes the .wh. whiteout for a file removed in layer 2."""
    layout = tmp_path / "layout"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, timeout=120)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    bundle = tmp_path / "bundle"
    umoci("unpack", "--rootless", "--image", f"{layout}:t", str(bundle))
    (bundle / "rootfs" / "etc").mkdir()
    (bundle / "rootfs" / "etc" / "gone").write_text("soon removed")
    (bundle / "rootfs" / "etc" / "stays").write_text("here")
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    (bundle / "rootfs" / "etc" / "gone").unlink()
    umoci("repack", "--image", f"{layout}:t", str(bundle))
    r = import_capsule(store, "umoci", layout)
    tree = tree_of(store, r.version)
    assert tree.get("etc/stays") == b"here" and "etc/gone" not in tree
