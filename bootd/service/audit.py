"""The audit log: every administrator's write, who made it, what, and when.

One JSON object a line in ``state_dir/audit.log`` (0600), appended with
O_APPEND (a line is one write, so the daemon and the CLI never interleave
within a line), and fsynced: a change that was made is on record even if the
machine loses power right after.  Who is the admin API's caller address, or
the CLI's user (and the user behind sudo).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bootd.audit")


class AuditLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, who: str, action: str, target: str, details: Any = None) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "who": who, "action": action, "target": target,
                           "details": details}, sort_keys=True, default=str) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # The write itself was made; say loudly that its record was not.
            log.error("event=audit-failed path=%s error=%r who=%s action=%s target=%s", self.path, exc.strerror,
                      who, action, target)
            return
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        except OSError as exc:
            log.error("event=audit-failed path=%s error=%r", self.path, exc.strerror)
        finally:
            os.close(fd)

    def read(self, limit: int = 1000) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text().splitlines()[-limit:]
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]


def cli_user() -> str:
    """The CLI's caller: the login user, and who ran sudo."""
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    sudo = os.environ.get("SUDO_USER")
    return f"cli:{me}" + (f" (sudo from {sudo})" if sudo else "")
