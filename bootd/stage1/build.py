"""Build the stage-one kernel + initramfs that bootd serves under /stage1/.

Reproducible on purpose: the cpio archive is written here (sorted paths, uid/gid 0, fixed mtime, fixed
inode numbers) and gzip gets mtime=0 and no file name, so the same Debian packages always give the same
bytes and the same sha256 - an operator can check that two servers serve the identical stage one.

Inputs are Debian packages only: ``busybox-static``, GNU ``tar`` and ``zstd`` (with the shared libraries
``ldd`` reports, because busybox tar drops xattrs such as security.capability and busybox has no zstd),
and a ``linux-image-*`` package fetched with ``apt-get download`` and unpacked with ``dpkg-deb`` - never
installed. The NIC modules come from that package. It ships no modules.dep (depmod writes it at
install time), so the load order is computed here from each module's ``depends=`` field.

The agent's chunk fetcher, ``bootd-fetch`` (``fetch.c``), is compiled here with gcc, statically against
glibc and OpenSSL's ``libcrypto.a`` (its SHA-256 uses SHA-NI where the CPU has it): Debian packages
``gcc``, ``libc6-dev`` and ``libssl-dev``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bootd.errors import BootdError
from bootd.stage1.kmods import (
    LOAD_FIRST,
    NIC_MODULES,
    ROOT_MODULES,
    S_IFCHR,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    STORAGE_MODULES,
    CpioEntry,
    ModuleError,
    closure,
    is_module_file,
    mod_name,
    module_set_entries,
    plain_module,
    write_cpio,
)
from bootd.stage1.kmods import load_order as _load_order

HERE = Path(__file__).resolve().parent
# Debian's generic kernel: it has the drivers of real server NICs (e1000e, igb, ixgbe, i40e, ice, mlx4/mlx5,
# bnx2/bnxt, tg3). The cloud kernel (LZ4, boots faster under QEMU TCG) has virtio and vmxnet3 only; choose
# it with --kernel-package linux-image-cloud-amd64 for virtual machines.
DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"
FETCH_SRC = HERE / "fetch.c"
FETCH_CFLAGS = ("-O2", "-std=gnu11", "-static", "-s", "-pthread", "-Wall", "-Wextra")

Log = Callable[[str], None]


class Stage1Error(BootdError):
    """The stage one cannot be built; the message names the missing package, file or tool."""


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    kver: str
    vmlinuz: Path
    modules: dict[str, Path]  # module name -> .ko in the cache
    depends: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    initramfs: Path
    vmlinuz: Path
    initramfs_sha256: str
    vmlinuz_sha256: str
    kernel: Kernel
    load_order: tuple[str, ...]
    info: dict[str, object] = field(default_factory=dict)


def default_cache_dir() -> Path:
    env = os.environ.get("BOOTD_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bootd"


def _run(cmd: list[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    except FileNotFoundError as exc:
        raise Stage1Error(f"{cmd[0]} not found: {exc}") from exc
    if proc.returncode != 0:
        raise Stage1Error(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


def resolve_kernel_package(package: str) -> str:
    """The concrete linux-image-<abi>-<flavour> behind a metapackage (itself when already concrete)."""
    if re.search(r"\d+\.\d+", package):
        return package
    for attempt in range(2):
        proc = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            line = line.strip()
            if line.startswith("Depends:") and "linux-image-" in line:
                return line.split(":", 1)[1].strip().strip("<>")
        if attempt == 0 and os.geteuid() == 0:
            # A fresh machine (or CI image) may have no package lists yet.
            subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update", "-qq"],
                           capture_output=True, check=False, timeout=600)
    raise Stage1Error(f"apt-cache depends {package} names no linux-image package "
                      "(is it a Debian linux-image metapackage? run apt-get update)")


def download_deb(package: str, cache_dir: Path, log: Log) -> Path:
    """``apt-get download`` into the cache, once per package version."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(cache_dir.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    log(f"downloading {package} (apt-get download, not installed)")
    _run(["apt-get", "download", "-o", "Debug::NoDropPrivs=1", package], cwd=cache_dir)
    found = sorted(cache_dir.glob(f"{package}_*.deb"))
    if not found:
        raise Stage1Error(f"apt-get download {package} produced no .deb in {cache_dir}")
    return found[-1]


def unpack_kernel(deb: Path, cache_dir: Path, wanted: Iterable[str], log: Log) -> Kernel:
    """Extract vmlinuz and the dependency closure of ``wanted`` modules from a linux-image .deb."""
    wanted = tuple(wanted)
    if not deb.is_file():
        raise Stage1Error(f"kernel package {deb} does not exist")
    fields = _run(["dpkg-deb", "-f", str(deb), "Package", "Version"]).splitlines()
    values = dict(line.split(": ", 1) for line in fields if ": " in line)
    package, version = values.get("Package", ""), values.get("Version", "").replace(":", "%3a")
    if not package.startswith("linux-image-") or not version:
        raise Stage1Error(f"{deb} is not a linux-image package (Package: {package or '?'})")
    dest = cache_dir / f"{package}_{version}"
    stamp = dest / "kernel.json"
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if tuple(meta.get("wanted", ())) == wanted:
            return Kernel(
                package=package, version=version, kver=meta["kver"], vmlinuz=dest / "vmlinuz",
                modules={m: dest / "modules" / f"{m}.ko" for m in meta["modules"]},
                depends={k: tuple(v) for k, v in meta["depends"].items()},
            )
    log(f"unpacking {deb.name} (vmlinuz and modules: {', '.join(wanted)})")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "modules").mkdir(parents=True)
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    all_blobs: dict[str, bytes] = {}
    kver = ""
    vmlinuz_found = False
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for member in tar:
            name = member.name
            if not member.isfile():
                continue
            if re.match(r"^\./boot/vmlinuz-", name):
                fh = tar.extractfile(member)
                assert fh is not None
                (dest / "vmlinuz").write_bytes(fh.read())
                kver = name.split("vmlinuz-", 1)[1]
                vmlinuz_found = True
            elif "/lib/modules/" in name and is_module_file(name):
                fh = tar.extractfile(member)
                assert fh is not None
                filename = name.rsplit("/", 1)[1]
                all_blobs[mod_name(filename)] = plain_module(filename, fh.read())
    if proc.wait() != 0:
        raise Stage1Error(f"dpkg-deb --fsys-tarfile {deb} failed")
    if not vmlinuz_found:
        raise Stage1Error(f"{deb.name} contains no /boot/vmlinuz-*")
    try:
        blobs, kept_depends = closure({m: partial(all_blobs.__getitem__, m) for m in all_blobs}, wanted, deb.name)
    except ModuleError as exc:
        raise Stage1Error(str(exc)) from exc
    for mod in sorted(blobs):
        (dest / "modules" / f"{mod}.ko").write_bytes(blobs[mod])
    kept_depends = dict(sorted(kept_depends.items()))
    stamp.write_text(
        json.dumps(
            {"kver": kver, "wanted": list(wanted), "modules": sorted(blobs), "depends": kept_depends},
            indent=1,
            sort_keys=True,
        )
    )
    return Kernel(
        package=package,
        version=version,
        kver=kver,
        vmlinuz=dest / "vmlinuz",
        modules={m: dest / "modules" / f"{m}.ko" for m in sorted(blobs)},
        depends=kept_depends,
    )


def fetch_kernel(
    cache_dir: Path, package: str = DEFAULT_KERNEL_PACKAGE, deb: Path | None = None, log: Log = print
) -> Kernel:
    """A warm cache is used without asking apt (offline, and apt-cache takes seconds); set
    BOOTD_KERNEL_REFRESH=1 to look for a newer kernel behind a metapackage."""
    if deb is None:
        memo = cache_dir / f"{package}.resolved"
        concrete = memo.read_text().strip() if memo.exists() else ""
        if (
            not concrete
            or os.environ.get("BOOTD_KERNEL_REFRESH") == "1"
            or not list(cache_dir.glob(f"{concrete}_*.deb"))
        ):
            concrete = resolve_kernel_package(package)
            cache_dir.mkdir(parents=True, exist_ok=True)
            memo.write_text(concrete + "\n")
        deb = download_deb(concrete, cache_dir, log)
    return unpack_kernel(deb, cache_dir, (*LOAD_FIRST, *NIC_MODULES, *STORAGE_MODULES, *ROOT_MODULES),
                         log)


def load_order(kernel: Kernel, roots: Iterable[str]) -> tuple[str, ...]:
    """Dependencies before dependants (the order insmod needs without modules.dep)."""
    return _load_order(kernel.depends, roots)


def _ldd(binary: str) -> list[str]:
    out = _run(["ldd", binary])
    libs: list[str] = []
    for line in out.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0]
            if target.startswith("/"):
                libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split(" (", 1)[0])
    return libs


def _is_static(path: Path) -> bool:
    # busybox-static contains the *string* ld-linux-x86-64.so.2 (notes pitfall 15): ask ldd instead.
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=False)
    return "not a dynamic executable" in (proc.stdout + proc.stderr) or "statically linked" in proc.stdout


def _dpkg_versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions (recorded in stage1.json so a build can be traced to its inputs)."""
    packages = list(packages)
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *packages], capture_output=True, text=True, check=False
    )
    found = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    return {p: found.get(p, "unknown") for p in packages}


def _which(tool: str, package: str) -> str:
    path = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
    if path is None:
        raise Stage1Error(f"{tool} not found: apt-get install {package}")
    return path


def compile_fetcher(out: Path, *, cc: str = "gcc", extra_flags: Iterable[str] = (), static: bool = True) -> Path:
    """Compile ``fetch.c`` into a static ``bootd-fetch`` at ``out`` (also used by tests and bench/boot to
    run the agent in host mode). Reproducible: built in a temporary directory under a fixed name, with
    ``-ffile-prefix-map``, no timestamps, stripped.

    ``static=False`` is for tests only: a dynamically linked, unstripped build (sanitizers such as
    ``-fsanitize=address`` cannot link statically); the stage one always uses the static build."""
    if not FETCH_SRC.is_file():
        raise Stage1Error(f"{FETCH_SRC} is missing: this bootd was installed without its stage-one sources")
    compiler = shutil.which(cc, path="/usr/bin:/bin:/usr/local/bin") if "/" not in cc else cc
    if compiler is None or not os.access(compiler, os.X_OK):
        raise Stage1Error(f"{cc} not found: apt-get install gcc (it compiles bootd-fetch, the stage one's "
                          "chunk fetcher)")
    for lib, package in (("libc.a", "libc6-dev"), ("libcrypto.a", "libssl-dev")):
        found = subprocess.run([compiler, f"-print-file-name={lib}"], capture_output=True, text=True,
                               check=False).stdout.strip()
        if not os.path.isabs(found) or not os.path.isfile(found):
            raise Stage1Error(f"{lib} not found (static linking of bootd-fetch): apt-get install {package}")
    with tempfile.TemporaryDirectory(prefix="bootd-fetch-") as tmp:
        shutil.copyfile(FETCH_SRC, Path(tmp) / "fetch.c")
        flags = FETCH_CFLAGS if static else tuple(f for f in FETCH_CFLAGS if f not in ("-static", "-s"))
        cmd = [compiler, *flags, *extra_flags, f"-ffile-prefix-map={tmp}=.", "-o", "bootd-fetch",
               "fetch.c", "-l:libcrypto.a"]
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            hint = " (apt-get install libssl-dev)" if "openssl/" in proc.stderr else ""
            raise Stage1Error(f"compiling bootd-fetch failed{hint}: {proc.stderr.strip()[-1500:]}")
        data = (Path(tmp) / "bootd-fetch").read_bytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp_out.write_bytes(data)
    os.chmod(tmp_out, 0o755)
    os.replace(tmp_out, out)
    return out


def initramfs_entries(
    kernels: list[tuple[Kernel, tuple[str, ...]]], info: dict[str, object], with_openssl: bool = True,
    fetcher: bytes | None = None,
) -> dict[str, CpioEntry]:
    entries: dict[str, CpioEntry] = {}

    def add_dir(path: str) -> None:
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), CpioEntry(S_IFDIR | 0o755))

    def add_file(path: str, data: bytes, mode: int = 0o755) -> None:
        path = path.strip("/")
        if "/" in path:
            add_dir(path.rsplit("/", 1)[0])
        entries[path] = CpioEntry(S_IFREG | mode, data)

    def add_link(path: str, target: str) -> None:
        path = path.strip("/")
        if "/" in path:
            add_dir(path.rsplit("/", 1)[0])
        entries[path] = CpioEntry(S_IFLNK | 0o777, target.encode())

    for d in ("dev", "proc", "sys", "run", "tmp", "newroot", "etc", "root", "usr/sbin", "sbin", "lib64"):
        add_dir(d)
    entries["dev/console"] = CpioEntry(S_IFCHR | 0o600, rdev=(5, 1))  # the kernel opens it before /init
    entries["dev/null"] = CpioEntry(S_IFCHR | 0o666, rdev=(1, 3))

    busybox = Path(_which("busybox", "busybox-static"))
    if not _is_static(busybox):
        raise Stage1Error(f"{busybox} is not static: apt-get install busybox-static")
    add_file("bin/busybox", busybox.read_bytes())
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in sorted(applets):
        if applet.rsplit("/", 1)[-1] in ("tar", "busybox", "linuxrc") or applet.startswith("usr/bin/zstd"):
            continue  # GNU tar (xattrs) is installed as /usr/bin/tar instead
        add_link(applet, "/bin/busybox")

    tools = [("tar", "tar"), ("zstd", "zstd")]
    if with_openssl:
        tools.append(("openssl", "openssl"))
    for tool, package in tools:
        binary = _which(tool, package)
        add_file(f"usr/bin/{tool}", Path(binary).read_bytes())
        for lib in _ldd(binary):
            add_file(lib, Path(lib).resolve().read_bytes())

    if fetcher is not None:
        add_file("usr/bin/bootd-fetch", fetcher)
    add_file("init", (HERE / "init.sh").read_bytes())
    add_file("bootd/agent.sh", (HERE / "agent.sh").read_bytes())
    add_file("bootd/inventory.sh", (HERE / "inventory.sh").read_bytes())
    add_file("bootd/node-agent.sh", (HERE / "node-agent.sh").read_bytes())
    add_file("bootd/overlay.sh", (HERE / "overlay.sh").read_bytes())
    add_file("bootd/udhcpc.script", (HERE / "udhcpc.sh").read_bytes())
    add_file("etc/bootd-stage1.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    # One module set per kernel; the agent loads the set matching `uname -r`, so one stage one serves
    # capsules that bring different kernels.
    for kernel, order in kernels:
        entries.update(module_set_entries(kernel.kver, {m: ko.read_bytes() for m, ko in kernel.modules.items()},
                                          order))
    return entries


def compress_initramfs(cpio: bytes, compression: str) -> bytes:
    """zstd by default: Debian kernels have RD_ZSTD, the image is smaller than gzip -9 and unpacks
    faster, which counts under TCG. Both are deterministic (no timestamps, single-threaded)."""
    if compression == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=19, write_content_size=True, threads=0).compress(cpio))
    if compression == "gzip":
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(cpio)
        return buf.getvalue()
    raise Stage1Error(f"unknown initramfs compression {compression!r}: use zstd or gzip")


def _cached_compress(cpio: bytes, compression: str, cache: Path) -> bytes:
    """zstd -19 takes seconds; the same cpio always compresses to the same bytes, so keep them."""
    key = cache / f"{hashlib.sha256(cpio).hexdigest()}.{compression}"
    if key.exists():
        return key.read_bytes()
    image = compress_initramfs(cpio, compression)
    cache.mkdir(parents=True, exist_ok=True)
    for old in sorted(cache.glob(f"*.{compression}"), key=lambda p: p.stat().st_mtime)[:-8]:
        old.unlink(missing_ok=True)  # keep the cache small: the last few builds are what matters
    _atomic_write(key, image)
    return image


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def build(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    kernel_package: str = DEFAULT_KERNEL_PACKAGE,
    kernel_deb: Path | None = None,
    extra_kernel_packages: Iterable[str] = (),
    extra_kernel_debs: Iterable[Path] = (),
    with_openssl: bool | None = None,
    compression: str = "zstd",
    log: Log = print,
) -> BuildResult:
    """Build ``initramfs.img`` + ``vmlinuz`` (the fallback kernel) + ``stage1.json`` into ``out_dir``.

    The first kernel is the fallback kernel (for capsules without one); ``extra_kernel_*`` only add
        module sets, for capsules whose /boot holds another kernel release. ``with_openssl`` adds the openssl
    binary (+2 MB): on real hardware it hashes several times faster than busybox (SHA-NI), but under
    QEMU TCG its start-up (a 5 MB libcrypto, CPU probing) made the fetch 2-3x slower, so it is off by
    default.
    """
    if with_openssl is None:
        with_openssl = False
    cache = cache_dir or default_cache_dir()
    kernel = fetch_kernel(cache / "kernels", kernel_package, kernel_deb, log)
    others = [fetch_kernel(cache / "kernels", pkg, None, log) for pkg in extra_kernel_packages]
    others += [fetch_kernel(cache / "kernels", DEFAULT_KERNEL_PACKAGE, deb, log) for deb in extra_kernel_debs]
    sets: list[tuple[Kernel, tuple[str, ...]]] = []
    for k in [kernel, *others]:
        if any(k.kver == seen.kver for seen, _ in sets):
            continue
        k_order = load_order(k, (*NIC_MODULES, *ROOT_MODULES))
        if not any(m in k_order for m in NIC_MODULES):
            raise Stage1Error(f"{k.package} has none of the NIC modules {', '.join(NIC_MODULES)}")
        sets.append((k, k_order))
    order = sets[0][1]
    with tempfile.TemporaryDirectory(prefix="bootd-stage1-") as tmp:
        fetcher = compile_fetcher(Path(tmp) / "bootd-fetch").read_bytes()
    agent_sha = hashlib.sha256((HERE / "agent.sh").read_bytes()).hexdigest()
    node_agent_sha = hashlib.sha256((HERE / "node-agent.sh").read_bytes()).hexdigest()
    overlay_sha = hashlib.sha256((HERE / "overlay.sh").read_bytes()).hexdigest()
    info: dict[str, object] = {
        "kernel": {"package": kernel.package, "version": kernel.version, "release": kernel.kver},
        "module_sets": {k.kver: {"package": k.package, "version": k.version, "load_order": list(o)}
                        for k, o in sets},
        "load_order": list(order),
        "packages": _dpkg_versions(("busybox-static", "tar", "zstd", "libc6", "gcc", "libc6-dev", "libssl-dev",
                                    *(("openssl",) if with_openssl else ()))),
        "agent_sha256": agent_sha,
        "node_agent_sha256": node_agent_sha,
        "overlay_sha256": overlay_sha,
        "nic_drivers": [m for m in NIC_MODULES if m in order],
        "fetch_sha256": hashlib.sha256(fetcher).hexdigest(),
    }
    cpio = write_cpio(initramfs_entries(sets, info, with_openssl, fetcher))
    image = _cached_compress(cpio, compression, cache / "initramfs")
    vmlinuz = kernel.vmlinuz.read_bytes()
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / "initramfs.img", image)
    _atomic_write(out_dir / "vmlinuz", vmlinuz)
    init_sha = hashlib.sha256(image).hexdigest()
    kern_sha = hashlib.sha256(vmlinuz).hexdigest()
    info |= {
        "initramfs": {"sha256": init_sha, "size": len(image), "cpio_size": len(cpio), "compression": compression},
        "vmlinuz": {"sha256": kern_sha, "size": len(vmlinuz)},
    }
    _atomic_write(out_dir / "stage1.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    log(f"stage one: {out_dir / 'initramfs.img'} {len(image)} bytes sha256={init_sha[:16]}…; "
        f"kernel {kernel.kver} -> {out_dir / 'vmlinuz'}; NIC drivers: "
        f"{' '.join(m for m in NIC_MODULES if m in order)} (missing: "
        f"{' '.join(m for m in NIC_MODULES if m not in order) or 'none'}); modules: {' '.join(order)}")
    return BuildResult(out_dir=out_dir, initramfs=out_dir / "initramfs.img", vmlinuz=out_dir / "vmlinuz",
                       initramfs_sha256=init_sha, vmlinuz_sha256=kern_sha, kernel=kernel, load_order=order,
                       info=info)
