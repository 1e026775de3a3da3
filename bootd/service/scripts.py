"""The per-node iPXE script and the node token it hands to the stage one.

The script is the last thing the firmware-side boot chain reads from bootd;
everything the stage one needs to know (where bootd is, who it is, which
capsule version, its per-boot credential) travels on the kernel command line,
because that is the only channel from iPXE into the Linux initramfs.
Credentials themselves are bootd.service.credentials'.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from bootd.model import Node

TOKEN_HEX_CHARS = 32
_UNSAFE = re.compile(r"[^\x20-\x7e]")


def load_or_create_secret(path: Path, nbytes: int = 32) -> bytes:
    """Read a secret file, creating it (mode 0600) if missing, safely against a concurrent creator.

    The new secret is written to a private temporary file and then hard-linked
    into place: ``link`` fails if the name exists, so two processes starting at
    once agree on one secret and nobody ever reads a half-written file.  The
    content is hex text so an administrator can copy it with ordinary tools.
    """
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(nbytes).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    data = path.read_bytes().strip()
    if not data:
        raise ValueError(f"{path} is empty; delete it so bootd creates a new secret")
    return data


def ipxe_safe(text: str) -> str:
    """Keep operator-supplied text on one line: a newline in kernel args would inject iPXE commands."""
    return " ".join(_UNSAFE.sub(" ", text).split())


@dataclass(frozen=True, slots=True)
class BootScript:
    """Everything the script needs, gathered by the caller from registry, capsule store and config."""

    node: Node
    base_url: str
    version_id: str | None
    has_kernel: bool
    boot_args: str
    node_args: str
    token: str
    # sha256 of the capsule kernel's own NIC modules (an initramfs stored as a chunk), loaded after the
    # stage one's initramfs so the two archives are unpacked in turn and /lib/modules/<release> matches.
    modules: str | None = None
    # Other base URLs the node may load from, in order, when this server fails it (other live servers,
    # replicas): iPXE tries each for the kernel and initrds, the stage one for the manifest and chunks.
    sources: tuple[str, ...] = ()
    # The root mode (bootd.capsule.image): "squashfs" with the image id of the version's squashfs image.
    root: str = "tmpfs"
    image: str | None = None


def render_boot_script(s: BootScript) -> str:
    """The script for a known, allowed node: stage-one kernel + initramfs with bootd.* parameters."""
    base = s.base_url.rstrip("/")
    if s.version_id is None:
        return render_wait_script(
            s.node.mac, base, f"node {s.node.name} has no capsule assigned (set one with bootd node set)"
        )
    kernel_path = f"/capsules/{s.version_id}/kernel" if s.has_kernel else "/stage1/vmlinuz"
    others = tuple(u.rstrip("/") for u in s.sources if u.rstrip("/") != base)
    args = [
        "initrd=initramfs.img",
        "initrd=modules.img" if s.modules else "",  # the EFI stub loads each initrd= it is given, in turn
        ipxe_safe(s.boot_args),
        ipxe_safe(s.node_args),
        f"bootd.url={base}",
        f"bootd.node={s.node.name}",
        f"bootd.capsule={s.version_id}",
        f"bootd.token={s.token}",
        f"bootd.mac={s.node.mac}",
        f"bootd.sources={','.join(others)}" if others else "",
        f"bootd.root={s.root} bootd.image={s.image}" if s.root != "tmpfs" and s.image else "",
    ]
    cmdline = " ".join(a for a in args if a)

    def load(command: str, path: str, args: str = "") -> str:
        """One line: the command from each source in turn, as long as one fails (iPXE's ``||``)."""
        return " || ".join(f"{command} {url}{path}{args}" for url in (base, *others)) + " || goto failed\n"

    return (
        "#!ipxe\n"
        f"# bootd: node {s.node.name} ({s.node.mac}), capsule version {s.version_id}\n"
        f"echo bootd: booting {s.node.name}\n"
        + load("kernel", kernel_path, f" {cmdline}")
        + load("initrd", "/stage1/initramfs.img")
        + (load("initrd --name modules.img", f"/chunks/{s.modules}") if s.modules else "")
        + "boot || goto failed\n"
        ":failed\n"
        "echo bootd: loading the stage one failed, retrying in 10 s\n"
        f"{_sleep(10)}\n"
        f"chain --replace {base}/boot/{mac_path(s.node.mac)}.ipxe\n"
    )


def render_wait_script(mac: str, base_url: str, reason: str, delay: int = 30) -> str:
    """For a machine bootd will not boot yet: say why on the console and ask again later.

    Waiting instead of exiting lets an administrator approve or assign a capsule
    without walking to the machine to power-cycle it.
    """
    base = base_url.rstrip("/")
    return (
        "#!ipxe\n"
        f"echo bootd: not booting {mac}: {ipxe_safe(reason)}\n"
        f"echo bootd: asking again in {delay} s\n"
        f"{_sleep(delay)}\n"
        f"chain --replace {base}/boot/{mac_path(mac)}.ipxe\n"
    )


def render_asset_script(mac: str, base_url: str) -> str:
    """Ask iPXE to request the script again with the machine's SMBIOS asset tag (a credential's evidence)."""
    base = base_url.rstrip("/")
    return f"#!ipxe\nchain --replace {base}/boot/{mac_path(mac)}.ipxe?asset=${{asset:uristring}}\n"


def _sleep(seconds: int) -> str:
    """``sleep`` is an optional iPXE command; ``prompt --timeout`` still waits where it is compiled out."""
    return f"sleep {seconds} || prompt --timeout {seconds * 1000} || echo"


def mac_path(mac: str) -> str:
    """MACs appear in URLs with dashes: colons are legal but some HTTP stacks escape them."""
    return mac.replace(":", "-")
