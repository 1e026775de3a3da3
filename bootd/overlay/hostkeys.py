"""Per-node identity the render takes from the context: machine-id and ssh host keys.

bootd makes them once per node and stores them with the node (the service
does the storing), so a node keeps its identity across reboots and
``ssh`` does not warn that the host key changed. Generation uses
``ssh-keygen`` from openssh-client: the format sshd reads, written by the
tool that defines it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from bootd.errors import OverlayError
from bootd.overlay.context import HostKey

KEY_TYPES = ("ed25519", "rsa")
_KEY_BITS = {"rsa": "3072"}
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")


def needed_host_keys(have: Iterable[str] | Mapping[str, HostKey], wanted: Iterable[str] = KEY_TYPES) -> list[str]:
    """The key types a node still needs (stored keys are never regenerated)."""
    present = set(have)
    return [t for t in wanted if t not in present]


def new_machine_id() -> str:
    """A random 128-bit id in machine-id(5) form (32 lowercase hex digits)."""
    return secrets.token_hex(16)


def check_machine_id(value: str) -> str:
    if not _MACHINE_ID.match(value):
        raise OverlayError(f"machine id {value!r} is not 32 lowercase hex digits")
    return value


def generate_host_keys(directory: Path, types: Iterable[str], *, comment: str = "",
                       ssh_keygen: str | None = None, timeout: float = 60.0) -> dict[str, HostKey]:
    """Generate ``types`` with ssh-keygen into ``directory`` (0700, private files 0600) and return them.

    Existing key files of a type are refused rather than overwritten: the caller stores keys and asks
    only for what ``needed_host_keys`` says is missing.
    """
    exe = ssh_keygen or shutil.which("ssh-keygen")
    if exe is None:
        raise OverlayError("ssh-keygen is not installed (Debian: apt-get install openssh-client)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    out: dict[str, HostKey] = {}
    for kind in types:
        if kind not in KEY_TYPES:
            raise OverlayError(f"unknown host key type {kind!r}; expected one of: {', '.join(KEY_TYPES)}")
        path = directory / f"ssh_host_{kind}_key"
        if path.exists():
            raise OverlayError(f"{path} exists; refusing to overwrite a host key")
        cmd = [exe, "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
        if kind in _KEY_BITS:
            cmd[2:2] = ["-b", _KEY_BITS[kind]]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise OverlayError(f"ssh-keygen -t {kind} took more than {timeout:g} s") from None
        if proc.returncode != 0:
            raise OverlayError(f"ssh-keygen -t {kind} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        out[kind] = HostKey(private=path.read_text(), public=path.with_name(path.name + ".pub").read_text())
    return out
