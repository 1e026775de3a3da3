"""An overlay's metadata file (``overlay.json``): kind, secrecy, modes, owners, directories.

Why a metadata file rather than the modes and owners of the stored files: the
overlay root belongs to the bootd user, which cannot chown files to root or to
a node's users, and an export/import through tar or git must not lose them
(Warewulf keeps them on disk and needs ``overlay chown``; we keep them in text).

Format (every key optional)::

    {
      "kind": "system",                  # "system": stage one, before switch_root; "runtime": node agent too
      "secret": false,                   # served only to the node's own credential, redacted for admins
      "description": "what it is for",
      "defaults": {"mode": "0644", "owner": "root", "group": "root"},
      "files": {"etc/ssh/ssh_host_ed25519_key.j2": {"mode": "0600"},
                "etc/literal.j2": {"template": false}},
      "directories": [{"path": "root/.ssh", "mode": "0700"},
                      {"each": "master.users", "path": "{{ item.home }}",
                       "owner": "{{ item.uid }}", "group": "{{ item.gid }}", "mode": "0700"}]
    }

Owners are uid/gid numbers or names; a name is written into the archive as
the user name (the node's tar maps it to the node's number) with uid 0 as the
fallback, so prefer numbers for anything but root.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bootd.errors import OverlayError

META_FILE = "overlay.json"
FILES_DIR = "files"
TEMPLATE_SUFFIX = ".j2"
KINDS = ("system", "runtime")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_OWNER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$")

Owner = int | str


@dataclass(frozen=True, slots=True)
class FileMeta:
    mode: int = 0o644
    owner: Owner = "root"
    group: Owner = "root"
    template: bool | None = None  # None: decided by the .j2 suffix


@dataclass(frozen=True, slots=True)
class DirSpec:
    """A directory the overlay creates; with ``each``, one per item of a context list (fields are templates)."""

    path: str
    mode: str = "0755"
    owner: str = "root"
    group: str = "root"
    each: str | None = None


@dataclass(frozen=True, slots=True)
class OverlayMeta:
    kind: str = "system"
    secret: bool = False
    description: str = ""
    defaults: FileMeta = field(default_factory=FileMeta)
    files: Mapping[str, FileMeta] = field(default_factory=dict)
    directories: tuple[DirSpec, ...] = ()

    def file(self, path: str) -> FileMeta:
        return self.files.get(path, self.defaults)

    def to_json(self) -> dict[str, Any]:
        def fm(m: FileMeta) -> dict[str, Any]:
            out: dict[str, Any] = {"mode": f"{m.mode:04o}", "owner": m.owner, "group": m.group}
            if m.template is not None:
                out["template"] = m.template
            return out

        dirs = []
        for d in self.directories:
            entry = {"path": d.path, "mode": d.mode, "owner": d.owner, "group": d.group}
            if d.each:
                entry["each"] = d.each
            dirs.append(entry)
        return {"kind": self.kind, "secret": self.secret, "description": self.description,
                "defaults": fm(self.defaults), "files": {k: fm(v) for k, v in sorted(self.files.items())},
                "directories": dirs}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise OverlayError(f"bad overlay name {name!r}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit")
    return name


def check_path(path: str, what: str = "path") -> str:
    """A relative path inside the node's root: no '..', no absolute part, no empty or '.' parts."""
    clean = path.strip("/")
    parts = clean.split("/")
    if not clean or any(p in ("", ".", "..") for p in parts) or "\0" in clean:
        raise OverlayError(f"bad {what} {path!r}: expected a path inside the node's root such as etc/hosts")
    return clean


def parse_mode(value: Any, where: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        mode = int(value, 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise OverlayError(f"{where}: mode {value!r} is not valid; expected an octal string such as \"0644\"")
    if not 0 <= mode <= 0o7777:
        raise OverlayError(f"{where}: mode {value!r} is out of range 0000-7777")
    return mode


def parse_owner(value: Any, where: str) -> Owner:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) < 2**31:
        return int(value)
    if isinstance(value, str) and _OWNER_NAME.match(value):
        return value
    raise OverlayError(f"{where}: owner {value!r} is not valid; expected a uid/gid number or a user/group name")


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise OverlayError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise OverlayError(f"{where}: unknown key {unknown[0]!r}; valid keys are: {', '.join(allowed)}")


def _file_meta(data: Any, base: FileMeta, where: str) -> FileMeta:
    d = _obj(data, where)
    _keys(d, ("mode", "owner", "group", "template"), where)
    template = d.get("template", base.template)
    if template is not None and not isinstance(template, bool):
        raise OverlayError(f"{where}: template must be true or false, got {template!r}")
    return FileMeta(mode=parse_mode(d["mode"], where) if "mode" in d else base.mode,
                    owner=parse_owner(d["owner"], where) if "owner" in d else base.owner,
                    group=parse_owner(d["group"], where) if "group" in d else base.group,
                    template=template)


def _text(d: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise OverlayError(f"{where}: {key} must be a string, got {value!r}")
    return value


def parse_meta(text: str, where: str = META_FILE) -> OverlayMeta:
    """Parse and validate ``overlay.json``; every error names the key and what is valid."""
    try:
        raw = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise OverlayError(f"{where}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    data = _obj(raw, where)
    _keys(data, ("kind", "secret", "description", "defaults", "files", "directories"), where)
    kind = data.get("kind", "system")
    if kind not in KINDS:
        raise OverlayError(f"{where}: kind {kind!r} is not valid; expected one of: {', '.join(KINDS)}")
    secret = data.get("secret", False)
    if not isinstance(secret, bool):
        raise OverlayError(f"{where}: secret must be true or false, got {secret!r}")
    defaults = _file_meta(data.get("defaults", {}), FileMeta(), f"{where}: defaults")
    files = {check_path(p, f"{where}: files key"): _file_meta(v, defaults, f"{where}: files[{p!r}]")
             for p, v in _obj(data.get("files", {}), f"{where}: files").items()}
    dirs_raw = data.get("directories", [])
    if not isinstance(dirs_raw, list):
        raise OverlayError(f"{where}: directories must be a list")
    dirs: list[DirSpec] = []
    for i, item in enumerate(dirs_raw):
        w = f"{where}: directories[{i}]"
        d = _obj(item, w)
        _keys(d, ("path", "mode", "owner", "group", "each"), w)
        each = d.get("each")
        if each is not None and not isinstance(each, str):
            raise OverlayError(f"{w}: each must be a string naming a context list, e.g. master.users")
        path = _text(d, "path", "", w)
        spec = DirSpec(path=path, mode=str(d.get("mode", "0755")), owner=str(d.get("owner", "root")),
                       group=str(d.get("group", "root")), each=each)
        if each is None:  # static fields are checked now; templated ones when rendered
            check_path(path, f"{w}: path")
            parse_mode(spec.mode, w)
            parse_owner(spec.owner, w)
            parse_owner(spec.group, w)
        dirs.append(spec)
    return OverlayMeta(kind=kind, secret=secret, description=_text(data, "description", "", where),
                       defaults=defaults, files=files, directories=tuple(dirs))
