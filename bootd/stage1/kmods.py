"""Kernel modules for the stage one, pure: which NIC drivers, their dependency order, and the newc
archives that carry them.

Shared by the stage-one builder (modules from a linux-image .deb) and the capsule importer (modules from
a capsule's own /lib/modules/KVER, so a capsule that brings its kernel boots with that kernel's drivers).
Neither source has a usable modules.dep (a .deb ships none; a tree's may be stale), so the load order is
computed from each module's own ``depends=`` field. No I/O here beyond the callables it is handed.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

# NIC drivers for the machines bootd boots in QEMU and on common server hardware (a kernel flavour that
# lacks some, such as Debian's cloud kernel, simply ships fewer), then storage (not loaded by the agent,
# shipped so that a capsule's init can use local scratch disks). Some need firmware files the image does
# not carry (bnx2; ice runs in safe mode without its DDP package).
NIC_MODULES = ("virtio_net", "e1000", "e1000e", "igb", "ixgbe", "i40e", "ice", "mlx4_en", "mlx5_core", "bnx2",
               "bnxt_en", "tg3", "vmxnet3")
STORAGE_MODULES = ("virtio_blk", "virtio_scsi", "nvme", "ahci", "sd_mod")
LOAD_FIRST = ("virtio_pci",)  # virtio_net binds only once the PCI transport is there
# The squashfs root mode (bootd.capsule.image): the in-RAM image is loop-mounted and put under an overlayfs.
# Loaded with the NIC drivers (Debian builds all three as modules; a kernel with them built in ships none).
ROOT_MODULES = ("loop", "squashfs", "overlay")
WANTED = (*LOAD_FIRST, *NIC_MODULES, *STORAGE_MODULES, *ROOT_MODULES)
FIXED_MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
_MODULE_FILE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


class ModuleError(ValueError):
    """A module set cannot be assembled; the message names the module and what it lacks."""


def mod_name(filename: str) -> str:
    """``e1000e.ko.xz`` -> ``e1000e``; dashes become underscores as the kernel names modules."""
    return _MODULE_FILE.sub("", filename).replace("-", "_")


def is_module_file(filename: str) -> bool:
    return _MODULE_FILE.search(filename) is not None


def plain_module(filename: str, data: bytes) -> bytes:
    """The ELF bytes of a module file, which newer distributions compress (busybox insmod wants ELF)."""
    if filename.endswith(".xz"):
        return lzma.decompress(data)
    if filename.endswith(".gz"):
        return gzip.decompress(data)
    if filename.endswith(".zst"):
        import zstandard

        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))
    return data


def modinfo_depends(data: bytes) -> tuple[str, ...]:
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)", data)
    if not match or not match.group(1):
        return ()
    return tuple(d.decode().replace("-", "_") for d in match.group(1).split(b",") if d)


def closure(read: Mapping[str, Callable[[], bytes]], wanted: Iterable[str], where: str
            ) -> tuple[dict[str, bytes], dict[str, tuple[str, ...]]]:
    """The ``wanted`` modules present in ``read`` (name -> reader of its ELF bytes) and everything they
    depend on, read once each; a dependency that is missing is an error naming both modules."""
    blobs: dict[str, bytes] = {}
    depends: dict[str, tuple[str, ...]] = {}
    stack = [m for m in wanted if m in read]
    while stack:
        mod = stack.pop()
        if mod in blobs:
            continue
        blobs[mod] = read[mod]()
        depends[mod] = modinfo_depends(blobs[mod])
        for dep in depends[mod]:
            if dep not in read:
                raise ModuleError(f"module {mod} depends on {dep}, which {where} does not contain")
            stack.append(dep)
    return blobs, depends


def load_order(depends: Mapping[str, tuple[str, ...]], roots: Iterable[str]) -> tuple[str, ...]:
    """Dependencies before dependants (the order insmod needs without modules.dep)."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(mod: str) -> None:
        if mod in seen or mod not in depends:
            return
        seen.add(mod)
        for dep in depends.get(mod, ()):
            visit(dep)
        order.append(mod)

    for mod in (*LOAD_FIRST, *roots):
        visit(mod)
    return tuple(order)


# cpio (newc) -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CpioEntry:
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


def write_cpio(entries: Mapping[str, CpioEntry]) -> bytes:
    """A newc archive with deterministic metadata (uid/gid 0, fixed mtime and inodes), parents before
    children, so the same inputs always give the same bytes."""
    out = io.BytesIO()

    def header(ino: int, name: str, entry: CpioEntry) -> None:
        name_b = name.encode() + b"\x00"
        fields = (ino, entry.mode, 0, 0, 2 if entry.mode & S_IFDIR == S_IFDIR else 1, FIXED_MTIME,
                  len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name_b), 0)
        out.write(b"070701" + b"".join(f"{v:08x}".encode() for v in fields))
        out.write(name_b)
        out.write(b"\x00" * (-(110 + len(name_b)) % 4))
        out.write(entry.data)
        out.write(b"\x00" * (-len(entry.data) % 4))

    for ino, name in enumerate(sorted(entries), start=1):
        header(ino, name, entries[name])
    header(0, "TRAILER!!!", CpioEntry(mode=0))
    out.write(b"\x00" * (-out.tell() % 512))
    return out.getvalue()


def module_set_entries(kver: str, blobs: Mapping[str, bytes], order: Iterable[str]) -> dict[str, CpioEntry]:
    """lib/modules/KVER/<name>.ko plus the load-order file the stage one's agent reads."""
    moddir = f"lib/modules/{kver}"
    entries = {d: CpioEntry(S_IFDIR | 0o755) for d in ("lib", "lib/modules", moddir)}
    for mod, data in sorted(blobs.items()):
        entries[f"{moddir}/{mod}.ko"] = CpioEntry(S_IFREG | 0o644, data)
    entries[f"{moddir}/load-order"] = CpioEntry(S_IFREG | 0o644, ("\n".join(order) + "\n").encode())
    return entries


@dataclass(frozen=True)
class ModuleSet:
    kver: str
    image: bytes  # a zstd-compressed newc archive: a second initramfs for the stage one
    drivers: tuple[str, ...]  # the NIC drivers in it
    order: tuple[str, ...]


def module_initramfs(kver: str, read: Mapping[str, Callable[[], bytes]], where: str) -> ModuleSet | None:
    """The NIC (and storage) modules of kernel ``kver`` with their dependencies, as an initramfs that the
    boot loader loads after the stage one's (Linux unpacks concatenated archives in turn); None when
    ``read`` has none of the NIC drivers (for instance a kernel with them built in)."""
    import zstandard

    blobs, depends = closure(read, WANTED, where)
    drivers = tuple(m for m in NIC_MODULES if m in blobs)
    if not drivers:
        return None
    order = load_order(depends, (*NIC_MODULES, *ROOT_MODULES))
    cpio = write_cpio(module_set_entries(kver, blobs, order))
    image = zstandard.ZstdCompressor(level=19, write_content_size=True, threads=0).compress(cpio)
    return ModuleSet(kver=kver, image=bytes(image), drivers=drivers, order=order)
