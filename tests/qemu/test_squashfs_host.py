"""The stage one's squashfs root mode on the build host (host mode: it fetches and verifies the image but
mounts nothing) against the stand-in over loopback, through bootd-fetch and the shell workers: the image it
writes is the master's image byte for byte, and a corrupted image chunk, a list that is not the image list
or the image of another capsule is refused before any image file exists to be mounted."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bootd.capsule.image import ImageStore
from bootd.capsule.objects import CapsuleStore
from tests.qemu import standin
from tests.qemu.conftest import SampleCapsule, StandinProc, StartStandin
from tests.qemu.test_agent_host import AGENT, agent_env, fetch_mode, fetcher  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def image_id(sample_capsule: SampleCapsule) -> str:
    if shutil.which("mksquashfs") is None or os.geteuid() != 0:
        pytest.skip("building the squashfs image needs squashfs-tools and root")
    return ImageStore(CapsuleStore(sample_capsule.store), chunk_size=256 * 1024).ensure(sample_capsule.vid)


def _run(tmp_path: Path, server: StandinProc, vid: str, fetch: str, image: str
         ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The agent in host mode with the squashfs words; the image file it writes (BOOTD_ROOT_RAM)."""
    tmp_path.mkdir(exist_ok=True)
    env, _ = agent_env(tmp_path, server, vid, fetch, extra=f"bootd.root=squashfs bootd.image={image}")
    env["BOOTD_ROOT_RAM"] = str(tmp_path / "ram")
    proc = subprocess.run(["busybox", "sh", str(AGENT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    return proc, tmp_path / "ram" / "image.squashfs"


def test_squashfs_image_is_fetched_verified_and_whole(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str,  # noqa: F811
        image_id: str) -> None:
    server = loopback_standin()
    proc, img = _run(tmp_path, server, sample_capsule.vid, fetch_mode, image_id)
    assert proc.returncode == 0, proc.stderr
    listing = ImageStore(CapsuleStore(sample_capsule.store)).load(image_id)
    n = len(listing.chunks)
    assert f"BOOTD-STAGE1 image list ok image={image_id} chunks={n} size={listing.size}" in proc.stderr
    assert f"BOOTD-STAGE1 verified {n}/{n} chunks" in proc.stderr
    assert f"BOOTD-STAGE1 image ok size={listing.size}" in proc.stderr
    store = CapsuleStore(sample_capsule.store)
    assert img.read_bytes() == b"".join(store.chunk_path(c.sha256).read_bytes() for c in listing.chunks)
    out = subprocess.run(["unsquashfs", "-l", str(img)], capture_output=True, text=True, check=True).stdout
    assert "squashfs-root/sbin/init" in out
    assert [e["event"] for e in server.event_lines()][-2:] == ["verified", "booted"]


def test_corrupted_image_chunk_is_refused_and_never_mounted(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetch_mode: str,  # noqa: F811
        image_id: str) -> None:
    bad = ImageStore(CapsuleStore(sample_capsule.store)).load(image_id).chunks[-1].sha256
    server = loopback_standin("--corrupt", bad)
    proc, img = _run(tmp_path, server, sample_capsule.vid, fetch_mode, image_id)
    assert proc.returncode == 1
    assert f"BOOTD-STAGE1 FAILED chunk {bad} failed verification (got sha256 " in proc.stderr
    assert "image ok" not in proc.stderr and "root squashfs" not in proc.stderr
    assert not img.exists()  # nothing left that could be mounted
    events = server.event_lines()
    assert events[-1]["event"] == "failed" and bad in str(events[-1]["reason"])
    assert not any(e["event"] in ("verified", "booted") for e in events)


def test_image_list_must_be_the_list_of_this_capsule(
        tmp_path: Path, loopback_standin: StartStandin, sample_capsule: SampleCapsule, fetcher: Path,  # noqa: F811
        image_id: str) -> None:
    server = loopback_standin()
    # A chunk that is not an image list (the capsule's first chunk): its hash matches, its content does not.
    first = standin.chunk_hashes(sample_capsule.store, sample_capsule.vid)[0]
    proc, img = _run(tmp_path / "a", server, sample_capsule.vid, str(fetcher), first)
    assert proc.returncode == 1 and "image list has no 'BDIMAGE1 squashfs' header" in proc.stderr
    # A well-formed list with the same chunks, made for another capsule version: not this capsule's image.
    store = CapsuleStore(sample_capsule.store)
    listing = ImageStore(store).load(image_id)
    foreign = dataclasses.replace(listing, version="0" * 64)
    path = store.chunk_path(foreign.image_id)
    path.write_bytes(foreign.encode())
    try:
        proc, img = _run(tmp_path / "b", server, sample_capsule.vid, str(fetcher), foreign.image_id)
    finally:
        path.unlink()
    assert proc.returncode == 1 and not img.exists()
    assert f"image list is the image of capsule {'0' * 64}, not of bootd.capsule {sample_capsule.vid}" in proc.stderr
    # The list served with a flipped byte: its hash is not bootd.image.
    server = loopback_standin("--corrupt", image_id)
    proc, img = _run(tmp_path / "c", server, sample_capsule.vid, str(fetcher), image_id)
    assert proc.returncode == 1 and "image list failed verification" in proc.stderr and not img.exists()
