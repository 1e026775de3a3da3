"""The master's users and groups for the ``users`` overlay, read from its files.

Why files and not ``pwd``/``grp``: the master may use NSS sources (LDAP, sssd)
whose enumeration is slow or off; the overlay syncs the local accounts of a
uid range, which is what Perceus's passwd/group modules did. Password hashes
are read only when the caller asks (the admin enabled them), and then only go
into the secret ``users-shadow`` overlay.
"""

from __future__ import annotations

from pathlib import Path

from bootd.errors import OverlayError
from bootd.overlay.context import User, UserGroup


def _lines(path: Path, fields: int) -> list[list[str]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise OverlayError(f"cannot read {path}: {exc.strerror}") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("#", "+", "-")):
            continue
        parts = line.split(":")
        if len(parts) < fields:
            raise OverlayError(f"{path}:{n}: expected {fields} ':'-separated fields, got {len(parts)}")
        out.append(parts)
    return out


def _int(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() else None


def read_accounts(passwd: Path = Path("/etc/passwd"), group: Path = Path("/etc/group"), *, uid_min: int = 1000,
                  uid_max: int = 59999, shadow: Path | None = None) -> tuple[tuple[User, ...], tuple[UserGroup, ...]]:
    """Users with uid in [uid_min, uid_max] and groups with gid in the range (members limited to those users).

    ``shadow`` given: each user's hash is read from it (the caller has enabled hashes and can read the file).
    """
    if uid_min > uid_max:
        raise OverlayError(f"uid range {uid_min}-{uid_max} is empty")
    hashes: dict[str, str] = {}
    if shadow is not None:
        hashes = {p[0]: p[1] for p in _lines(shadow, 2)}
    users = []
    for p in _lines(passwd, 7):
        uid, gid = _int(p[2]), _int(p[3])
        if uid is None or gid is None or not uid_min <= uid <= uid_max:
            continue
        users.append(User(name=p[0], uid=uid, gid=gid, gecos=p[4], home=p[5], shell=p[6],
                          hash=hashes.get(p[0]) if shadow is not None else None))
    names = {u.name for u in users}
    groups = []
    for p in _lines(group, 4):
        gid = _int(p[2])
        if gid is None or not uid_min <= gid <= uid_max:
            continue
        members = tuple(m for m in p[3].split(",") if m and m in names)
        groups.append(UserGroup(name=p[0], gid=gid, members=members))
    return tuple(sorted(users, key=lambda u: u.uid)), tuple(sorted(groups, key=lambda g: g.gid))


def read_authorized_keys(path: Path) -> tuple[str, ...]:
    """The key lines of an authorized_keys file (comments and blanks dropped); a missing file is no keys."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    except OSError as exc:
        raise OverlayError(f"cannot read {path}: {exc.strerror}") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
