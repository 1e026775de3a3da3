"""Status-page sessions: log in once with a credential, then a cookie; actions carry a CSRF token.

A browser should not hold the admin token in script-readable storage, so the
page trades it once for a random session id in an HttpOnly, SameSite=Strict
cookie (the transport sets the flags).  Sessions live in memory only: a
restart of bootd logs everyone out, which is cheap, and no session id ever
reaches the disk.  They are bounded (the least recently used goes first) and
expire after ``session_idle`` seconds unused, and at the latest after
``MAX_LIFETIME``.

Who may act is decided here too: the admin credential gives role ``admin``,
the viewer credential (state_dir/viewer-token, for wall screens) role
``viewer``, which may read and never act.  Every action must also present
the session's CSRF token: a cookie alone (which a browser attaches to any
request it is tricked into sending) is never enough.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bootd.config import AdminConfig
from bootd.service.credentials import Credentials

MAX_LIFETIME = 7 * 86400.0


@dataclass(slots=True)
class Session:
    id: str
    role: str  # "admin" or "viewer"
    csrf: str
    created: float
    used: float

    @property
    def may_act(self) -> bool:
        return self.role == "admin"


class Refused(Exception):
    """Why a session may not do what it asked (the transport answers 401 or 403 with this text)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Sessions:
    def __init__(self, credentials: Credentials, config: AdminConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credentials = credentials
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.reload(config)

    def reload(self, config: AdminConfig) -> None:
        self.idle = config.session_idle
        self.max_sessions = config.max_sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def login(self, presented: str | None) -> Session:
        role = self.credentials.role(presented)
        if role is None:
            raise Refused(401, "wrong credential: log in with the contents of state_dir/admin-token, or of "
                               "state_dir/viewer-token for a read-only view")
        now = self.clock()
        self._expire(now)
        while len(self._sessions) >= self.max_sessions:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), role, secrets.token_urlsafe(32), now, now)
        self._sessions[session.id] = session
        return session

    def get(self, sid: str | None) -> Session:
        """The live session of this cookie value (its idle time starts over), or Refused(401)."""
        session = self._sessions.get(sid) if sid else None
        now = self.clock()
        if session is not None and (now - session.used >= self.idle or now - session.created >= MAX_LIFETIME):
            del self._sessions[session.id]
            session = None
        if session is None:
            raise Refused(401, "not logged in, or the session expired: log in again")
        session.used = now
        self._sessions.move_to_end(session.id)
        return session

    def check_csrf(self, sid: str | None, csrf: str | None) -> Session:
        """The live session of this cookie, if the request also carries its CSRF token; else Refused(401/403)."""
        session = self.get(sid)
        if not csrf or not hmac.compare_digest(csrf.encode("ascii", "replace"), session.csrf.encode()):
            raise Refused(403, "missing or wrong X-CSRF-Token: actions must carry the token of the page's session")
        return session

    def authorize_action(self, sid: str | None, csrf: str | None) -> Session:
        """A session that may act and presented its own CSRF token; Refused(401/403) says why not."""
        session = self.check_csrf(sid, csrf)
        if not session.may_act:
            raise Refused(403, "the viewer credential may look, not act: log in with the admin credential")
        return session

    def logout(self, sid: str | None) -> None:
        if sid:
            self._sessions.pop(sid, None)

    def _expire(self, now: float) -> None:
        stale = [s.id for s in self._sessions.values() if now - s.used >= self.idle
                 or now - s.created >= MAX_LIFETIME]
        for sid in stale:
            del self._sessions[sid]
