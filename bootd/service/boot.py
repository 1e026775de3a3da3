"""What does this machine boot now: the one answer DHCP, TFTP and HTTP all ask for.

pixiecore's ``Booter`` is the model: every transport asks one object and
none of them decides.  ``BootPolicy.plan`` is the pure part (which network
boot program or script URL a firmware gets; no I/O, so DHCP can call it per
packet); ``BootService`` adds the decisions that need the registry and the
capsule store (the iPXE script: who is this, may it boot, which capsule
version, with which kernel) and records the firmware's contact through the
lifecycle table.  ``reload`` swaps the policy, so SIGHUP changes what the
very next DISCOVER or script request gets.

Per-node overrides live in the node's variables (``bootd node set NAME
var.boot.file=...``) because ``Group`` has no free-form fields yet:

- ``boot.file``      the one program the firmware gets, iPXE ROMs included (TFTP name or URL): a site's
                     own loader such as ``pxelinux.0`` replaces bootd's chain (NBP, iPXE, script) whole;
                     never name an iPXE binary here (it would ask again and loop): use ``boot.bios_nbp``;
- ``boot.bios_nbp``, ``boot.uefi_nbp``, ``boot.uefi_arm64_nbp`` replace one NBP;
- ``boot.ipxe_url``  replaces the iPXE script URL;
- ``boot.root``      how the node holds its root (``tmpfs`` or ``squashfs``), else the config's boot.root.

In the ``squashfs`` root mode the script names the version's squashfs image (bootd.capsule.image) on the
kernel line; the first node to ask for a version that has none yet starts its build in a thread and
is told to ask again shortly (the build of a GB-sized tree takes minutes: no HTTP reply waits for it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from bootd.capsule.image import ImageStore
from bootd.capsule.manifest import KernelRef
from bootd.config import ROOT_MODES, Config
from bootd.errors import BootdError, NotFound, StoreError
from bootd.model import BootPlan, Firmware, Machine, Node, State
from bootd.proto.dhcp.pxe import ARM64_ARCHES
from bootd.service.credentials import Credentials
from bootd.service.lifecycle import Actor, Lifecycle, TransitionRefused
from bootd.service.registry import RegistryService
from bootd.service.scripts import BootScript, render_asset_script, render_boot_script, render_wait_script

log = logging.getLogger("bootd.boot")
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@runtime_checkable
class BootPlanner(Protocol):
    """What DHCP (and TFTP) ask: the boot plan for a machine (BootPolicy, or the BootService around it)."""

    def plan(self, machine: Machine, node: Node | None, *, pxe: bool, public_url: str | None = None,
             next_server: str | None = None) -> BootPlan | None: ...


@dataclass(frozen=True, slots=True)
class BootPolicy:
    public_url: str  # base of the HTTP service, e.g. http://10.0.0.1:8080
    next_server: str  # TFTP server address (siaddr)
    bios_nbp: str = "undionly.kpxe"
    uefi_nbp: str = "snponly.efi"
    uefi_arm64_nbp: str = "snponly-arm64.efi"

    @classmethod
    def from_config(cls, config: Config) -> BootPolicy:
        b = config.boot
        return cls(public_url=config.http.public_url, next_server=config.server.address, bios_nbp=b.bios_nbp,
                   uefi_nbp=b.uefi_nbp, uefi_arm64_nbp=b.uefi_arm64_nbp)

    def ipxe_url(self, mac: str, public_url: str | None = None) -> str:
        return f"{(public_url or self.public_url).rstrip('/')}/boot/{mac.replace(':', '-')}.ipxe"

    def plan(self, machine: Machine, node: Node | None, *, pxe: bool, public_url: str | None = None,
             next_server: str | None = None) -> BootPlan | None:
        """The boot plan, or None when no network boot program fits this firmware.

        ``pxe`` is False for plain DHCP clients (an OS's dhclient, stage one's
        udhcpc); they get the BIOS NBP in the BOOTP ``file`` field, as dnsmasq
        and ISC dhcpd do with a global filename, which they ignore.
        ``public_url`` and ``next_server`` replace this server's own for a DHCP subnet that reaches
        it by another address (a relayed rack).
        """
        v = node.vars if node is not None else {}
        base = (public_url or self.public_url).rstrip("/")
        nxt = next_server or self.next_server
        if "boot.file" in v:  # before iPXE: a BIOS PXE ROM is often iPXE itself (QEMU's), and loads it too
            return BootPlan(v["boot.file"], nxt)
        if machine.ipxe:
            url = v.get("boot.ipxe_url") or self.ipxe_url(machine.mac, base)
            return BootPlan(url, nxt, ipxe_no_proxydhcp=True)
        fw = machine.firmware
        if fw is Firmware.UEFI_HTTP:
            arm = machine.arch in ARM64_ARCHES
            nbp = v.get("boot.uefi_arm64_nbp", self.uefi_arm64_nbp) if arm else v.get("boot.uefi_nbp", self.uefi_nbp)
            return BootPlan(f"{base}/nbp/{nbp}", nxt)
        if fw is Firmware.BIOS or (fw is Firmware.UNKNOWN and not pxe):
            return BootPlan(v.get("boot.bios_nbp", self.bios_nbp), nxt)
        if fw is Firmware.UEFI_X64:
            return BootPlan(v.get("boot.uefi_nbp", self.uefi_nbp), nxt)
        if fw is Firmware.UEFI_ARM64:
            return BootPlan(v.get("boot.uefi_arm64_nbp", self.uefi_arm64_nbp), nxt)
        # uefi-ia32 (Debian ships no ia32 iPXE) or an architecture we do not know.
        return None


class CapsuleReader(Protocol):
    """The part of bootd.capsule.objects.CapsuleStore the daemon reads (decisions and file serving)."""

    def resolve(self, name: str) -> str | None: ...
    def names(self) -> dict[str, str]: ...
    def load_manifest(self, vid: str) -> Any: ...
    def manifest_path(self, vid: str) -> Path: ...
    def chunk_path(self, hexhash: str) -> Path: ...
    def kernel_path(self, hexhash: str) -> Path: ...


@dataclass(frozen=True, slots=True)
class ScriptAnswer:
    """The iPXE script for one request, and whether it registered a new node (for the metrics)."""

    text: str
    node: Node | None
    created: bool = False
    refused: str = ""


class BootService:
    def __init__(self, config: Config, registry: RegistryService, lifecycle: Lifecycle, capsules: CapsuleReader,
                 credentials: Credentials, images: ImageStore | None = None) -> None:
        self.registry = registry
        self.lifecycle = lifecycle
        self.capsules = capsules
        self.credentials = credentials
        self._kernels: OrderedDict[str, KernelRef | None] = OrderedDict()
        self.images = images
        self._image_builds: dict[str, asyncio.Future[str]] = {}
        self._image_failed: dict[str, tuple[float, str]] = {}  # vid -> (when, why): retried after a minute
        self.peers: Callable[[], Sequence[str]] | None = None  # the live servers' URLs, set by the composition root
        # A replica's way to a capsule name it has not synced (Replica.resolve): the upstream's version of
        # it, its manifest fetched and verified; set by the composition root when capsule.upstream is.
        self.upstream_resolve: Callable[[str], Awaitable[str | None]] | None = None
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.policy = BootPolicy.from_config(config)
        self.credentials.reload(config)
        self.kernel_args = config.boot.kernel_args
        self.sources = config.boot.sources
        self.root_mode = config.boot.root

    # -- firmware (DHCP, TFTP) ------------------------------------------------------------
    def plan(self, machine: Machine, node: Node | None, *, pxe: bool, public_url: str | None = None,
             next_server: str | None = None) -> BootPlan | None:
        return self.policy.plan(machine, node, pxe=pxe, public_url=public_url, next_server=next_server)

    async def firmware_contact(self, node: Node, reason: str, now: float) -> Node:
        """A boot firmware got its boot program or script: ``pxe``, if the table lets the firmware say so.

        Unauthenticated, so a running or booting node is left as it is (the refusal is counted and
        recorded by the lifecycle); a store fault costs the timeline a step, never the machine its answer.
        """
        if node.state is State.PXE:
            return node
        try:
            return await self.lifecycle.change(node.name, State.PXE, reason, actor=Actor.FIRMWARE, now=now,
                                               node=node)
        except TransitionRefused:
            return node
        except StoreError as exc:
            log.warning("event=state-failed node=%s error=%r", node.name, str(exc))
            return node

    async def node_env(self, name: str) -> str:
        """The node's own key/values as KEY=VALUE lines, for the stage one's node.env.

        Keys that are not shell identifiers are left out (the stage one sources the
        file); values are one line each, so a newline in a value is replaced.
        """
        node = await self.registry.store.get_node(name)
        if node is None:
            raise NotFound(f"no node named {name!r}")
        if not node.enabled:
            raise NotFound(f"node {name!r} is disabled")
        node, _ = await self.registry.with_group(node)
        lines = [f"{k}={v.replace(chr(10), ' ')}" for k, v in sorted(node.vars.items()) if _SHELL_NAME.fullmatch(k)]
        return "".join(line + "\n" for line in lines)

    def other_sources(self, base_url: str) -> tuple[str, ...]:
        """Where else the node may load from, in order, after ``base_url``: the other live servers (``peers``,
        this server's first, as Cluster.live_urls gives them), then ``boot.sources`` (replicas, plain HTTP
        copies).  Nodes verify every object, so a source needs no trust, only the same paths."""
        base = base_url.rstrip("/")
        others = list(self.peers()[1:]) if self.peers is not None else []
        urls = dict.fromkeys(u.rstrip("/") for u in [*others, *self.sources])
        return tuple(u for u in urls if u and u != base)

    # -- iPXE ----------------------------------------------------------------------------
    def kernel_of(self, vid: str) -> KernelRef | None:
        """Version ids are content hashes, so what a manifest says about its kernel is cached forever."""
        if vid in self._kernels:
            self._kernels.move_to_end(vid)
            return self._kernels[vid]
        kernel: KernelRef | None = self.capsules.load_manifest(vid).kernel
        self._kernels[vid] = kernel
        while len(self._kernels) > 256:
            self._kernels.popitem(last=False)
        return kernel

    def root_image(self, node: Node, vid: str) -> tuple[str, str | None, str]:
        """The node's root mode, its image id (squashfs) and, when it cannot boot yet, why: (mode, image, why).

        A missing image starts its build and the node waits (image None); a bad ``boot.root`` value waits
        with the reason until an administrator fixes it (image "", so the usual 30 s).
        """
        mode = node.vars.get("boot.root", self.root_mode)
        if mode not in ROOT_MODES:
            return mode, "", (f"variable boot.root={mode!r} of node {node.name} (or of its group) is not valid; "
                              f"expected one of: {', '.join(ROOT_MODES)}")
        if mode == "tmpfs":
            return mode, None, ""
        if self.images is None:
            return mode, "", "this bootd has no image store for the squashfs root mode"
        try:
            image = self.images.cached(vid)
        except (BootdError, OSError) as exc:
            return mode, "", f"the squashfs image of capsule {vid[:12]} cannot be read: {exc}"
        if image is not None:
            return mode, image, ""
        failed = self._image_failed.get(vid)
        if failed is not None and time.monotonic() - failed[0] < 60.0:
            return mode, "", f"the squashfs image of capsule {vid[:12]} could not be built: {failed[1]}"
        self._build_image(vid)
        return mode, None, f"building the squashfs image of capsule {vid[:12]} (first use of this version)"

    def _build_image(self, vid: str) -> None:
        """One build per version in a worker thread (ImageStore.ensure also locks across processes)."""
        if vid in self._image_builds or self.images is None:
            return
        images = self.images
        log.info("event=image-build version=%s", vid)
        future = asyncio.get_running_loop().run_in_executor(None, images.ensure, vid)
        self._image_builds[vid] = future

        def done(f: asyncio.Future[str]) -> None:
            self._image_builds.pop(vid, None)
            exc = f.exception() if not f.cancelled() else None
            if exc is not None:
                log.error("event=image-build-failed version=%s error=%r", vid, str(exc))
                self._image_failed[vid] = (time.monotonic(), str(exc))
            else:
                self._image_failed.pop(vid, None)

        future.add_done_callback(done)

    async def script(self, mac: str, base_url: str, now: float, *, peer: str | None = None,
                     asset: str | None = None) -> ScriptAnswer:
        """The whole boot decision for an iPXE client asking for its script.

        ``peer`` is the request's source address and ``asset`` the SMBIOS asset tag iPXE sent (if
        asked): the evidence a per-boot credential is issued against (bootd.service.credentials).
        """
        result = await self.registry.decide(Machine(mac=mac, ipxe=True), now)
        node = result.node
        if node is None:
            log.info("event=refused proto=http mac=%s reason=%r", mac, result.reason)
            return ScriptAnswer(render_wait_script(mac, base_url, result.reason), None, result.created,
                                result.reason)
        if "asset_tag" in node.vars and asset is None:
            # Ask iPXE for the machine's SMBIOS asset tag: one more round trip, then the real script.
            return ScriptAnswer(render_asset_script(mac, base_url), node, result.created)
        capsule, node_args = self.registry.boot_target(node, result.group)
        vid: str | None = None
        kernel: KernelRef | None = None
        if capsule is not None:
            try:
                vid = self.capsules.resolve(capsule)
                if vid is None and self.upstream_resolve is not None:
                    vid = await self.upstream_resolve(capsule)
                if vid is not None:
                    kernel = self.kernel_of(vid)
            except (BootdError, OSError) as exc:
                reason = f"capsule {capsule!r} of node {node.name} cannot be read: {exc}"
                log.error("event=script-failed node=%s reason=%r", node.name, reason)
                return ScriptAnswer(render_wait_script(mac, base_url, reason), node, result.created, reason)
            if vid is None:
                where = " here or on the upstream" if self.upstream_resolve is not None else ""
                reason = f"capsule {capsule!r} of node {node.name} does not exist{where} (bootd capsule list)"
                log.warning("event=script-refused node=%s reason=%r", node.name, reason)
                return ScriptAnswer(render_wait_script(mac, base_url, reason), node, result.created, reason)
        if vid is None:  # no capsule assigned: the script says so, and no credential is issued for nothing
            return ScriptAnswer(render_boot_script(BootScript(node, base_url, None, False, "", "", "")), node,
                                result.created, "no capsule")
        root, image, why = self.root_image(node, vid)
        if why:
            return ScriptAnswer(render_wait_script(mac, base_url, why, delay=10 if image is None else 30), node,
                                result.created, why)
        issued = await self.credentials.issue(node, peer, now, asset)
        if issued.token is None:
            return ScriptAnswer(render_wait_script(mac, base_url, issued.reason), node, result.created,
                                issued.reason)
        # iPXE is running and about to load the stage one; the stage one itself reports `stage1`.
        node = await self.firmware_contact(node, "iPXE fetched its boot script", now)
        text = render_boot_script(BootScript(
            node=node, base_url=base_url, version_id=vid, has_kernel=kernel is not None,
            modules=kernel.modules if kernel is not None else None, boot_args=self.kernel_args,
            node_args=node_args, token=issued.token, sources=self.other_sources(base_url), root=root, image=image,
        ))
        return ScriptAnswer(text, node, result.created)
