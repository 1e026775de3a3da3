"""Who may call the node routes and the admin routes.

Node credentials are issued per boot, and only against evidence that the
asker is the machine it claims to be (the threat model in the README says
how strong each kind is):

* ``lease`` (full DHCP mode): the iPXE script request must come from the
  address bootd leased to that MAC, and the lease must be current;
* ``pxe`` (proxy mode): bootd answered a PXE request from that MAC in the
  last ``registry.evidence_window`` seconds (from that address, when the
  boot-server exchange told us one);
* ``none`` (bootd runs no DHCP): no evidence; use approve-first.

A node variable ``asset_tag`` adds the machine's SMBIOS asset tag, which
iPXE sends when asked (the script first chains to a URL carrying
``${asset}``): a spoofed MAC alone is then not enough.

A token is 128 random bits.  The store keeps only its sha256, so the
database (or a backup of it) reveals no credential, and any bootd server
sharing the store can check one.  A new boot replaces the previous
credential; deleting or re-registering a node drops it (the row belongs to
the node's id, not to its reusable name).  A credential expires after
``registry.credential_lifetime`` seconds without use; a node that keeps
reporting keeps it alive.  A host without evidence can neither obtain a
node's credential nor revoke the running node's: issuing is the only way to
replace one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from bootd.config import Config
from bootd.errors import NotFound
from bootd.model import Node
from bootd.service.scripts import load_or_create_secret
from bootd.store.base import Credential, NodeStore

log = logging.getLogger("bootd.credentials")

TOKEN_BYTES = 16  # 32 hex characters on the kernel command line, as the stage one expects


def digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode("ascii", "replace")).hexdigest()


def evidence_mode(config: Config) -> str:
    """``registry.evidence = "auto"`` follows what bootd itself knows about the LAN."""
    mode = config.registry.evidence
    if mode != "auto":
        return mode
    if not config.dhcp.enabled:
        return "none"
    return "lease" if config.dhcp.mode == "full" else "pxe"


@dataclass(frozen=True, slots=True)
class Issued:
    """A token for the script, or why none was issued (the wait script says so)."""

    token: str | None
    reason: str = ""


class Credentials:
    """Admin secrets are read (or made) on first use, so a read-only CLI command never creates them."""

    def __init__(self, store: NodeStore, config: Config) -> None:
        self.store = store
        self.state_dir = config.server.state_dir
        self._admin: bytes | None = None
        self._viewer: bytes | None = None
        self.reload(config)

    def reload(self, config: Config) -> None:
        self.viewer_enabled = config.admin.viewer
        self.mode = evidence_mode(config)
        self.window = config.registry.evidence_window
        self.lifetime = config.registry.credential_lifetime

    def load(self) -> None:
        """Read or create the admin token now (the daemon does, before it listens)."""
        self._admin = load_or_create_secret(self.state_dir / "admin-token")
        if self.viewer_enabled:
            self._viewer = load_or_create_secret(self.state_dir / "viewer-token")

    @property
    def admin_token(self) -> bytes:
        if self._admin is None:
            self.load()
        assert self._admin is not None
        return self._admin

    def check_admin(self, presented: str | None) -> bool:
        """Constant-time: the admin token must not be guessable from response timing."""
        if not presented:
            return False
        return hmac.compare_digest(presented.strip().encode("ascii", "replace"), self.admin_token)

    def role(self, presented: str | None) -> str | None:
        """``admin``, ``viewer`` (state_dir/viewer-token: the status page, read-only) or None."""
        if self.check_admin(presented):
            return "admin"
        if not presented or not self.viewer_enabled:
            return None
        if self._viewer is None:
            self._viewer = load_or_create_secret(self.state_dir / "viewer-token")
        return "viewer" if hmac.compare_digest(presented.strip().encode("ascii", "replace"), self._viewer) else None

    # -- node credentials --------------------------------------------------------------------
    async def evidence(self, node: Node, peer: str | None, now: float) -> str:
        """"" when the asker has the evidence the configured mode needs, else why not."""
        if self.mode == "none":
            return ""
        if self.mode == "lease":
            lease = await self.store.get_lease_by_mac(node.mac)
            if lease is None or lease.expires <= now:
                return f"no current DHCP lease for {node.mac}: boot through bootd's DHCP first"
            if lease.ip != peer:
                return f"{peer} is not the address leased to {node.mac}"
            return ""
        seen = await self.store.pxe_seen(node.mac)
        if seen is None or now - seen[0] > self.window:
            return f"no PXE exchange with {node.mac} in the last {self.window:g} s: boot through PXE first"
        if seen[1] is not None and seen[1] != peer:
            return f"{peer} is not the address {node.mac} used in its PXE exchange"
        return ""

    async def issue(self, node: Node, peer: str | None, now: float, asset: str | None = None) -> Issued:
        why = await self.evidence(node, peer, now)
        expected_asset = node.vars.get("asset_tag")
        if not why and expected_asset is not None and asset != expected_asset:
            why = f"the asset tag sent does not match node {node.name}'s asset_tag"
        if why:
            log.info("event=credential-refused node=%s peer=%s reason=%r", node.name, peer, why)
            return Issued(None, why)
        token = secrets.token_hex(TOKEN_BYTES)
        await self.store.put_credential(Credential(node.name, digest(token), now, now + self.lifetime,
                                                   f"{self.mode}:{peer}"))
        return Issued(token)

    async def check_node(self, name: str, presented: str | None, now: float) -> bool:
        if not presented:
            return False
        cred = await self.store.get_credential(name)
        if cred is None:
            if await self.store.get_node(name) is None:
                raise NotFound(f"no node named {name!r}")  # names are not secret; say which is wrong
            return False
        if cred.expires <= now:
            return False
        if not hmac.compare_digest(digest(presented), cred.digest):
            return False
        if cred.expires - now < self.lifetime / 2:
            # In use: slide the expiry (at most one write per half lifetime).
            await self.store.extend_credential(name, cred.digest, now + self.lifetime)
        return True

    async def note_pxe(self, mac: str, now: float, address: str | None) -> None:
        """Proxy mode's evidence: bootd answered a PXE request from this MAC."""
        if self.mode == "pxe":
            await self.store.note_pxe(mac, now, address)
