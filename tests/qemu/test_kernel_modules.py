"""Kernels and NIC modules match by construction, and the default stage one drives real server NICs.

Host part (seconds): a capsule that brings its own kernel and /lib/modules/<release> gets, at import, a
small second initramfs of that kernel's NIC modules, stored as a chunk and kept by gc; the iPXE script
loads it after the stage one's. QEMU part (one bootd for the module): a node boots such a capsule with
a kernel the stage one has no modules for and reaches `ready`; an e1000 node boots the default stage one.
"""

from __future__ import annotations

import io
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from bootd.capsule.importer import ImportOptions, import_capsule
from bootd.capsule.objects import CapsuleStore
from bootd.errors import CapsuleError
from bootd.lab import Lab, QemuNode, lab_available, qemu_available
from bootd.lab.sample import make_busybox_root
from bootd.lab.serve import BootdServer, ServeError
from bootd.model import Node
from bootd.service.scripts import BootScript, render_boot_script
from bootd.stage1.build import BuildResult, Kernel, Stage1Error, default_cache_dir, fetch_kernel
from tests.qemu.conftest import need_host_tools

OTHER_KERNEL = "linux-image-cloud-amd64"  # the stage one is built from the generic kernel (the default)
READY_TIMEOUT = 240.0
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def other_kernel() -> Kernel:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb (Debian)")
    try:
        return fetch_kernel(default_cache_dir() / "kernels", OTHER_KERNEL, log=lambda m: None)
    except Stage1Error as exc:
        pytest.skip(f"cannot fetch {OTHER_KERNEL}: {exc}")


def tree_with_kernel(root: Path, kernel: Kernel) -> Path:
    """The busybox root plus a kernel in /boot and its modules where merged-/usr Debian puts them."""
    need_host_tools()
    make_busybox_root(root)
    (root / "boot").mkdir(exist_ok=True)
    shutil.copyfile(kernel.vmlinuz, root / "boot" / f"vmlinuz-{kernel.kver}")
    base = root / "usr/lib/modules" / kernel.kver / "kernel" / "drivers"
    base.mkdir(parents=True)
    for name, ko in kernel.modules.items():
        shutil.copyfile(ko, base / f"{name}.ko")
    return root


def cpio_names(image: bytes) -> dict[str, bytes]:
    data = zstandard.ZstdDecompressor().decompressobj().decompress(image)
    out: dict[str, bytes] = {}
    f = io.BytesIO(data)
    while True:
        head = f.read(110)
        assert head[:6] == b"070701", head[:6]
        size, namesize = int(head[54:62], 16), int(head[94:102], 16)
        name = f.read(namesize)[:-1].decode()
        f.read(-(110 + namesize) % 4)
        body = f.read(size)
        f.read(-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = body


def test_import_takes_the_capsule_kernels_own_modules(tmp_path: Path, other_kernel: Kernel) -> None:
    store = CapsuleStore(tmp_path / "store")
    result = import_capsule(store, "own", tree_with_kernel(tmp_path / "tree", other_kernel))
    kref = store.load_manifest(result.version).kernel
    assert kref is not None and kref.modules is not None and kref.release == other_kernel.kver
    assert result.to_json()["kernel"]["modules"] == kref.modules
    image = store.chunk_path(kref.modules).read_bytes()
    files = cpio_names(image)
    moddir = f"lib/modules/{other_kernel.kver}"
    order = files[f"{moddir}/load-order"].decode().split()
    assert "virtio_net" in order and order.index("virtio_pci") < order.index("virtio_net")
    assert all(f"{moddir}/{m}.ko" in files for m in order)
    assert files[f"{moddir}/virtio_net.ko"][:4] == b"\x7fELF"
    # gc keeps it while the version is referenced, and the iPXE script loads it after the stage one.
    store.gc()
    assert store.chunk_path(kref.modules).exists()
    script = render_boot_script(BootScript(
        node=Node(mac="52:54:00:00:00:01", name="n1", group="g"), base_url="http://10.0.0.1:8080",
        version_id=result.version, has_kernel=True, boot_args="", node_args="", token="t", modules=kref.modules))
    lines = script.splitlines()
    stage1 = lines.index("initrd http://10.0.0.1:8080/stage1/initramfs.img || goto failed")
    assert lines[stage1 + 1] == f"initrd --name modules.img http://10.0.0.1:8080/chunks/{kref.modules} || goto failed"
    assert "initrd=initramfs.img initrd=modules.img" in script
    store.delete("own")
    store.gc()
    assert not store.chunk_path(kref.modules).exists()


def test_a_kernel_without_modules_in_the_tree_gets_none(tmp_path: Path, other_kernel: Kernel) -> None:
    """Nothing to take: the manifest (and version id) look as before; the stage one's sets must match."""
    need_host_tools()
    root = make_busybox_root(tmp_path / "tree")
    (root / "boot").mkdir()
    shutil.copyfile(other_kernel.vmlinuz, root / "boot" / f"vmlinuz-{other_kernel.kver}")
    store = CapsuleStore(tmp_path / "store")
    result = import_capsule(store, "bare", root)
    meta = store.load_manifest(result.version).meta
    assert meta["kernel"] is not None and set(meta["kernel"]) == {"sha256", "size", "path"}
    # A stage one with modules for this release boots it; one without is a mismatch, refused at import.
    matching = ImportOptions(stage1_releases=frozenset({other_kernel.kver}))
    assert import_capsule(store, "bare2", root, options=matching).version == result.version
    with pytest.raises(CapsuleError, match="would boot without a network") as refused:
        import_capsule(store, "bare3", root, options=ImportOptions(stage1_releases=frozenset({"6.1.0-1-other"})))
    assert f"/lib/modules/{other_kernel.kver}" in str(refused.value) and store.resolve("bare3") is None


# QEMU -----------------------------------------------------------------------------------------------
@dataclass
class Served:
    lab: Lab
    bootd: BootdServer
    stage1: BuildResult


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, stage1_default: BuildResult, other_kernel: Kernel
           ) -> Iterator[Served]:
    stage1 = stage1_default
    reason = lab_available() or qemu_available("bios")
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("kmods")
    with Lab(workdir=work / "lab", prefix="bd-km") as lab:
        bootd = BootdServer(lab, state_dir=work / "state", stage1_dir=stage1.out_dir)
        bootd.write_config()
        try:
            bootd.import_capsule("busybox", make_busybox_root(work / "busybox"))
            bootd.import_capsule("ownkernel", tree_with_kernel(work / "own", other_kernel))
            bootd.start()
        except ServeError as exc:
            pytest.fail(f"bootd could not import or start: {exc}\n{bootd.log_text()[-2000:]}")
        yield Served(lab, bootd, stage1)
        if TIMINGS:
            print("\nkernel/NIC boot timings (s to ready): " + ", ".join(f"{k}={v:.1f}" for k, v in TIMINGS.items()))


def boot(served: Served, name: str, mac: str, capsule: str, nic: str = "virtio-net-pci") -> QemuNode:
    served.bootd.cli("node", "add", name, "--mac", mac, "--capsule", capsule)
    node = QemuNode(served.lab, name, mac, firmware="bios", nic=nic).start()
    try:
        TIMINGS[name] = node.wait_for(rf"BOOTD-CAPSULE ready node={name}", timeout=READY_TIMEOUT).t
        served.bootd.wait_state(mac, ("ready",), timeout=20)
    except BaseException:
        node.stop()
        raise
    node.stop()
    return node


def test_e1000_node_boots_the_default_stage_one(served: Served) -> None:
    if "e1000" not in served.stage1.info["nic_drivers"]:  # type: ignore[operator]
        pytest.skip(f"this stage one ({served.stage1.kernel.package}) has no e1000 driver")
    node = boot(served, "e1000n", "52:54:00:77:06:01", "busybox", nic="e1000")
    console = node.console()
    assert f"BOOTD-STAGE1 start kernel={served.stage1.kernel.kver}" in console
    assert re.search(r"BOOTD-STAGE1 net eth0 ip=\d", console)


def test_capsule_kernel_boots_with_its_own_modules(served: Served, other_kernel: Kernel) -> None:
    sets = served.stage1.info["module_sets"]
    assert other_kernel.kver not in sets, "the stage one must not carry this kernel's modules itself"  # type: ignore[operator]
    t0 = time.monotonic()
    node = boot(served, "ownk", "52:54:00:77:06:02", "ownkernel")
    store = CapsuleStore(served.bootd.state_dir / "capsules")
    kernel = store.load_manifest(served.bootd.capsule_vid("ownkernel")).kernel
    assert kernel is not None and kernel.modules is not None and kernel.release == other_kernel.kver
    console = re.sub(r"\r?\n", "", node.console())  # iPXE wraps long URLs at 80 columns
    assert f"/chunks/{kernel.modules}... ok" in console, "iPXE should have loaded the kernel's module archive"
    assert f"BOOTD-STAGE1 start kernel={other_kernel.kver}" in node.console()
    assert "no NIC modules for kernel" not in node.console()
    assert time.monotonic() - t0 < READY_TIMEOUT + 30
