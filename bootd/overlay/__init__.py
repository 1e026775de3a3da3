"""Per-node overlays: files and sandboxed Jinja2 templates rendered on the master.

Pure: no sockets, no event loop, no store, no configuration. The caller (the
overlay service, the CLI) builds a :class:`Context` from its registry and asks
:func:`render` for a deterministic tar and its ETag. System overlays are
fetched by the stage one before ``switch_root``; runtime overlays again by the
node agent every interval. After unpacking, the applier runs the executables
in ``/usr/lib/bootd/apply.d/`` in name order with ``BOOTD_ROOT`` set to the
root it unpacked into (the ``users`` overlay merges accounts that way).
"""

from __future__ import annotations

from bootd.overlay.context import (
    ClusterNode,
    ClusterView,
    Context,
    GroupInfo,
    HostKey,
    MasterInfo,
    Nic,
    NodeInfo,
    User,
    UserGroup,
    cluster_view,
    node_info,
)
from bootd.overlay.meta import FileMeta, OverlayMeta
from bootd.overlay.overlay import Overlay, load_overlay
from bootd.overlay.render import RenderCache, RenderedFile, RenderedOverlay, render
from bootd.overlay.store import BUILTIN_DIR, OverlayStore

# The shipped set, in the order they apply, split the way the stage one and the node agent fetch them.
SYSTEM_OVERLAYS = ("hostname", "machine-id", "ssh-host-keys", "network", "chrony")
RUNTIME_OVERLAYS = ("hosts", "authorized-keys", "users")
APPLY_DIR = "usr/lib/bootd/apply.d"

__all__ = [
    "APPLY_DIR",
    "BUILTIN_DIR",
    "RUNTIME_OVERLAYS",
    "SYSTEM_OVERLAYS",
    "ClusterNode",
    "ClusterView",
    "Context",
    "FileMeta",
    "GroupInfo",
    "HostKey",
    "MasterInfo",
    "Nic",
    "NodeInfo",
    "Overlay",
    "OverlayMeta",
    "OverlayStore",
    "RenderCache",
    "RenderedFile",
    "RenderedOverlay",
    "User",
    "UserGroup",
    "cluster_view",
    "load_overlay",
    "node_info",
    "render",
]
