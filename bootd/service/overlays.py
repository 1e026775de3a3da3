"""Which files a node gets: its overlays, rendered on the master for that node.

The rendering itself is bootd.overlay's (pure); this service supplies what it
needs from the world: the node and its group, the cluster view, the master's
accounts and keys, and each node's identity (machine-id and ssh host keys),
made once by bootd and kept private in the state directory, so a node keeps
them across reboots and no two nodes share them.

System overlays are fetched by the stage one before ``switch_root``, runtime
overlays again by the node agent; both answer a conditional request with 304
when nothing changed, which is why the render is deterministic and cached.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from bootd.config import Config
from bootd.errors import NotFound, OverlayError
from bootd.model import Node
from bootd.overlay import (
    RUNTIME_OVERLAYS,
    SYSTEM_OVERLAYS,
    ClusterView,
    Context,
    GroupInfo,
    HostKey,
    MasterInfo,
    OverlayStore,
    RenderCache,
    RenderedOverlay,
    cluster_view,
    node_info,
    render,
)
from bootd.overlay.accounts import read_accounts, read_authorized_keys
from bootd.overlay.hostkeys import KEY_TYPES, generate_host_keys, needed_host_keys, new_machine_id
from bootd.service.registry import RegistryService
from bootd.store.base import NodeStore

log = logging.getLogger("bootd.overlays")

KINDS = {"system": SYSTEM_OVERLAYS, "runtime": RUNTIME_OVERLAYS}
VIEW_TTL = 5.0  # seconds a cluster view (every node's name and address) is reused between renders
MASTER_TTL = 1.0  # seconds the master's accounts and keys are reused without looking at their files again


class OverlayService:
    def __init__(self, store: NodeStore, config: Config, registry: RegistryService) -> None:
        self.store = store
        self.registry = registry
        self.reload(config)
        self._cache = RenderCache()
        self._view: tuple[float, ClusterView] | None = None
        self._master: tuple[float, tuple[object, ...], MasterInfo] | None = None
        self._identity_lock = asyncio.Lock()

    def reload(self, config: Config) -> None:
        self.config = config
        self.overlays = OverlayStore(config.overlay.dir)
        self.identities = config.server.state_dir / "node-identity"
        self._master = None

    def assigned(self, node: Node, kind: str) -> tuple[str, ...]:
        """The node's overlays of one kind: its ``overlays`` variable (comma-separated) or the shipped set."""
        shipped = KINDS[kind]
        if kind == "runtime" and self.config.overlay.password_hashes:
            shipped = (*shipped, "users-shadow")
        chosen = node.vars.get("overlays")
        if not chosen:
            return shipped
        names = tuple(n.strip() for n in chosen.split(",") if n.strip())
        return tuple(n for n in names if n in shipped or self._kind_of(n) == kind)

    def _kind_of(self, name: str) -> str | None:
        try:
            return self.overlays.load(name).kind
        except OverlayError:
            return None

    async def render(self, name: str, kind: str, now: float | None = None) -> RenderedOverlay:
        """The node's overlays of ``kind`` ("system" or "runtime") as one deterministic tar."""
        if kind not in KINDS:
            raise NotFound(f"no overlay kind {kind!r}; expected system or runtime")
        node = await self.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}")
        node, group = await self.registry.with_group(node)
        now = time.time() if now is None else now
        overlays = self.overlays.load_many(self.assigned(node, kind))
        machine_id, keys = await self._identity(node) if kind == "system" else (None, {})
        ctx = Context(node=node_info(node, machine_id=machine_id, host_keys=keys),
                      group=GroupInfo(node.group, vars=group.vars if group else {}),
                      cluster=await self._cluster(now), master=self._master_info(now))
        return render(overlays, ctx, cache=self._cache)

    async def _cluster(self, now: float) -> ClusterView:
        if self._view is None or now - self._view[0] > VIEW_TTL:
            self._view = (now, cluster_view(await self.store.list_nodes(), domain=self.config.dhcp.domain or ""))
        return self._view[1]

    def _master_info(self, now: float) -> MasterInfo:
        """The master's accounts and keys, read again when one of their files changed (a user added on the
        master reaches the nodes at their next runtime refresh), at most once a MASTER_TTL."""
        o = self.config.overlay
        if self._master is not None and now - self._master[0] <= MASTER_TTL:
            return self._master[2]
        shadow = o.shadow if o.password_hashes else None
        key = tuple(_file_key(f) for f in (o.passwd, o.group, o.authorized_keys, shadow) if f is not None)
        if self._master is not None and self._master[1] == key:
            self._master = (now, key, self._master[2])
        else:
            users, groups = read_accounts(o.passwd, o.group, uid_min=o.uid_min, uid_max=o.uid_max, shadow=shadow)
            try:
                keys = read_authorized_keys(o.authorized_keys)
            except OverlayError as exc:
                log.warning("event=overlay-no-authorized-keys reason=%r", str(exc))
                keys = ()
            self._master = (now, key, MasterInfo(name=socket.gethostname().split(".")[0],
                                                 address=self.config.server.address, authorized_keys=keys,
                                                 users=users, groups=groups, uid_min=o.uid_min, uid_max=o.uid_max))
        return self._master[2]

    async def _identity(self, node: Node) -> tuple[str, dict[str, HostKey]]:
        """The node's machine-id and host keys: made on first use, then the same on every boot."""
        directory = self.identities / node.mac.replace(":", "-")
        async with self._identity_lock:
            return await asyncio.to_thread(_load_or_make_identity, directory, node.name, KEY_TYPES)


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is edited or replaced (editors and useradd write a new file and rename it)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _load_or_make_identity(directory: Path, name: str, types: Sequence[str]) -> tuple[str, dict[str, HostKey]]:
    directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys: dict[str, HostKey] = {}
    for kind in types:
        private = directory / f"ssh_host_{kind}_key"
        if private.exists():
            public = private.with_name(private.name + ".pub")
            keys[kind] = HostKey(private=private.read_text(), public=public.read_text())
    missing = needed_host_keys(keys, types)
    if missing:
        keys.update(generate_host_keys(directory, missing, comment=f"root@{name}"))
    id_file = directory / "machine-id"
    if not id_file.exists():
        tmp = id_file.with_name(".machine-id.tmp")
        tmp.write_text(new_machine_id() + "\n")
        tmp.chmod(0o600)
        tmp.replace(id_file)
    return id_file.read_text().strip(), keys
