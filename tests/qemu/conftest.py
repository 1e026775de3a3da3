"""Shared fixtures for the stage-one and real-boot tests: one stage-one build and one sample capsule per
session (the kernel .deb is cached across sessions in ~/.cache/bootd), a lab per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bootd.lab import Lab, lab_available, qemu_available
from bootd.stage1.build import DEFAULT_KERNEL_PACKAGE, BuildResult, Stage1Error, build
from tests.qemu import standin

STANDIN = Path(standin.__file__).resolve()
# The stage one most QEMU tests boot: Debian's cloud kernel (LZ4) unless BOOTD_TEST_KERNEL_PACKAGE names
# another. Measured here (bench/boot/kernels.py, TCG) the generic kernel that bootd builds by default
# takes 6 s longer from initramfs loaded to /init and 7.4 s longer to `ready` per boot (16 s under heavy
# load); the tests that need the default stage one (real NIC drivers) use `stage1_default`.
STAGE1_KERNEL = os.environ.get("BOOTD_TEST_KERNEL_PACKAGE") or "linux-image-cloud-amd64"


def need_host_tools() -> None:
    for tool, pkg in (("busybox", "busybox-static"), ("zstd", "zstd"), ("tar", "tar")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install {pkg})")


def need_lab(firmware: str = "bios") -> None:
    reason = lab_available() or qemu_available(firmware)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return _build_stage1(tmp_path_factory, STAGE1_KERNEL)


@pytest.fixture(scope="session")
def stage1_default(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> BuildResult:
    """The stage one `bootd stage1 build` makes by default (the generic kernel)."""
    if STAGE1_KERNEL == DEFAULT_KERNEL_PACKAGE:
        return request.getfixturevalue("stage1")  # type: ignore[no-any-return]
    return _build_stage1(tmp_path_factory, DEFAULT_KERNEL_PACKAGE)


def _build_stage1(tmp_path_factory: pytest.TempPathFactory, package: str) -> BuildResult:
    need_host_tools()
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("stage one build needs apt-get and dpkg-deb (Debian)")
    try:
        return build(tmp_path_factory.mktemp("stage1"), log=lambda msg: None, kernel_package=package)
    except Stage1Error as exc:
        pytest.skip(f"cannot build the stage one here: {exc}")


@dataclass
class SampleCapsule:
    root: Path
    store: Path
    vid: str
    name: str = "busybox"


@pytest.fixture(scope="session")
def sample_capsule(tmp_path_factory: pytest.TempPathFactory) -> SampleCapsule:
    """The busybox root (init reports ready, then heartbeats) in a contract-format store."""
    need_host_tools()
    base = tmp_path_factory.mktemp("capsule")
    root = standin.make_busybox_root(base / "root", filler_bytes=2_000_000)
    store = base / "store"
    vid = standin.make_capsule(root, store, "busybox", chunk_size=256 * 1024)
    return SampleCapsule(root=root, store=store, vid=vid)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class StandinProc:
    proc: subprocess.Popen[bytes]
    base: str
    events: Path
    log: Path

    def event_lines(self) -> list[dict[str, object]]:
        import json

        if not self.events.exists():
            return []
        return [json.loads(line) for line in self.events.read_text().splitlines() if line.strip()]

    def wait_event(self, event: str, timeout: float = 30.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.event_lines():
                if ev.get("event") == event:
                    return ev
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} event within {timeout}s: {self.event_lines()}")


StartStandin = Callable[..., "StandinProc"]


@pytest.fixture
def loopback_standin(tmp_path: Path, stage1_or_none: Path, sample_capsule: SampleCapsule
                     ) -> Iterator[StartStandin]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> StandinProc:
        port = free_port()
        events = tmp_path / f"events-{port}.jsonl"
        log = tmp_path / f"standin-{port}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, str(STANDIN), "serve", "--bind", "127.0.0.1", "--port", str(port),
                 "--store", str(sample_capsule.store), "--stage1", str(stage1_or_none), "--events", str(events),
                 *extra],
                stdout=fh, stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        return StandinProc(proc=proc, base=f"http://127.0.0.1:{port}", events=events, log=log)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def stage1_or_none(tmp_path: Path) -> Path:
    """Host-mode agent tests never fetch the stage one; an empty directory stands in for it."""
    d = tmp_path / "no-stage1"
    d.mkdir()
    return d


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    need_lab()
    with Lab(workdir=tmp_path / "lab", prefix="bd-s1") as net:
        yield net
