"""Contexts and overlays for the overlay tests."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from bootd.overlay import ClusterNode, ClusterView, Context, GroupInfo, HostKey, MasterInfo, NodeInfo, User, UserGroup
from bootd.overlay.meta import OverlayMeta
from bootd.overlay.overlay import Overlay
from bootd.overlay.store import OverlayStore


def cluster(n: int) -> ClusterView:
    return ClusterView(tuple(ClusterNode(f"n{i:04d}", f"10.1.{i // 250}.{i % 250 + 1}", "default")
                             for i in range(n)), domain="cluster")


MASTER = MasterInfo(name="master", address="10.1.255.254", authorized_keys=("ssh-ed25519 AAAAC3Nz root@master",),
                    users=(User("alice", 1000, 1000, "Alice", "/home/alice", "/bin/bash", "$6$salt$hash"),
                           User("bob", 1001, 1001, "", "/home/bob", "/bin/sh")),
                    groups=(UserGroup("alice", 1000, ("alice",)), UserGroup("hpc", 1500, ("alice", "bob"))))


def keys(tag: str) -> dict[str, HostKey]:
    return {t: HostKey(private=f"-----BEGIN OPENSSH PRIVATE KEY-----\n{tag}-{t}\n-----END OPENSSH PRIVATE KEY-----\n",
                       public=f"ssh-{t} AAAA{tag} root@{tag}\n") for t in ("ed25519", "rsa")}


def context(i: int = 1, *, view: ClusterView | None = None, master: MasterInfo = MASTER,
            node_vars: dict[str, str] | None = None, group_vars: dict[str, str] | None = None,
            network: str = "") -> Context:
    view = view or cluster(4)
    name = f"n{i:04d}"
    node = NodeInfo(name=name, mac=f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", group="default",
                    ip=f"10.1.{i // 250}.{i % 250 + 1}", vars=node_vars or {}, machine_id=f"{i:032x}",
                    host_keys=keys(name), network=network)
    return Context(node=node, group=GroupInfo("default", group_vars or {}), cluster=view, master=master)


def make(store: OverlayStore, name: str, content: dict[str, bytes | str], **meta: object) -> Overlay:
    data = {k: v.encode() if isinstance(v, str) else v for k, v in content.items()}
    return store.create(name, OverlayMeta(**meta), data)  # type: ignore[arg-type]


def members(blob: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        for m in tf.getmembers():
            fh = tf.extractfile(m) if m.isfile() else None
            out[m.name.rstrip("/")] = (m, fh.read() if fh else b"")
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
