"""Error types shared by every layer.

Protocol errors follow h11's split between *local* and *remote* faults: a
``RemoteProtocolError`` means a peer sent something we cannot accept (log it,
count it, drop it, keep serving); a ``LocalProtocolError`` means our own code
asked for something the protocol forbids (a bug, so it should surface loudly).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit


class BootdError(Exception):
    """Base of every error bootd raises on purpose; anything else is a bug."""


class ConfigError(BootdError):
    """A configuration value is missing or invalid.

    The message always names the file, the key, the bad value and what would
    be valid, because the administrator reading it has only the log line.
    """

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.detail = message
        super().__init__(f"{path}: {key}: {message}")


class ProtocolError(BootdError):
    """Base for protocol violations; ``reason`` is a short stable slug for counters."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        self.reason = reason
        super().__init__(message)


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid: drop it, count it by ``reason``, keep serving."""


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol does not allow."""


class StoreError(BootdError):
    """The node registry could not do what was asked (and changed nothing)."""


class NotFound(StoreError):
    """The named node, group or lease does not exist."""


class Conflict(StoreError):
    """The change would break a uniqueness rule (name or MAC already taken)."""


class RegistryFull(StoreError):
    """Registering one more node would pass registry.max_nodes."""


class StateChanged(Conflict):
    """A compare-and-set of a node's state lost: another process changed the state first."""

    def __init__(self, name: str, expected: str, actual: str) -> None:
        super().__init__(f"node {name!r} is {actual}, not {expected}: another writer changed it first")
        self.expected = expected
        self.actual = actual


class CapsuleError(BootdError):
    """A capsule operation failed; the store is left as it was."""


def mask_url(url: str) -> str:
    """The URL (or key=value conninfo) with any password replaced by ``***``, for logs and errors."""
    if "://" in url:
        parts = urlsplit(url)
        netloc = parts.netloc
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", url)


class OverlayError(BootdError):
    """An overlay could not be stored, validated or rendered; what was stored is unchanged."""


class TemplateError(OverlayError):
    """A template is broken or failed to render; ``where`` is ``overlay:file:line`` for the admin to open."""

    def __init__(self, message: str, *, overlay: str, file: str, line: int | None, node: str | None = None) -> None:
        self.overlay = overlay
        self.file = file
        self.line = line
        self.node = node
        where = f"{overlay}:{file}" + (f":{line}" if line else "")
        prefix = f"node {node}: " if node else ""
        super().__init__(f"{prefix}overlay {where}: {message}")


class CapsuleNotFound(CapsuleError, NotFound):
    """No capsule by that name or version: a 404 through the API, an error line in the CLI."""
