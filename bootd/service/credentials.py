"""Who may call the node routes and the admin routes: one object, built once from the state directory.

The transports only pass on what a request presented; whether it is good is
decided here, so the HTTP server, a second server sharing the store, and the
CLI all agree.  The secrets are files in the state directory (mode 0600),
created on first use by ``load_or_create_secret``.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from bootd.service.scripts import check_node_token, load_or_create_secret, node_token


class Credentials:
    """Secrets are read (or made) on first use, so a read-only CLI command never creates them."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._secret: bytes | None = None
        self._admin: bytes | None = None

    def load(self) -> None:
        """Read or create both secrets now (the daemon does, before it listens)."""
        self._secret = load_or_create_secret(self.state_dir / "secret")
        self._admin = load_or_create_secret(self.state_dir / "admin-token")

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self.load()
        assert self._secret is not None
        return self._secret

    @property
    def admin_token(self) -> bytes:
        if self._admin is None:
            self.load()
        assert self._admin is not None
        return self._admin

    def node_token(self, name: str) -> str:
        return node_token(self.secret, name)

    def check_node(self, name: str, presented: str | None) -> bool:
        return check_node_token(self.secret, name, presented)

    def check_admin(self, presented: str | None) -> bool:
        """Constant-time: the admin token must not be guessable from response timing."""
        if not presented:
            return False
        return hmac.compare_digest(presented.strip().encode("ascii", "replace"), self.admin_token)
