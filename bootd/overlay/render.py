"""Render a node's overlays into one deterministic tar, with a strong ETag.

Why a plain ustar written here rather than ``tarfile``: the bytes must be the
same for the same inputs (the ETag is their sha256, so an unchanged runtime
overlay costs the node one conditional request), and ``tarfile`` pads every
archive to 10 KiB, which would be most of what a refresh transfers. GNU tar
and busybox ``tar -x`` both read it; owners are numbers, plus the user name
when the overlay gave a name.

Order: overlays apply in the order given; a later overlay's file replaces an
earlier one's at the same path (as Warewulf does).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bootd.errors import OverlayError, TemplateError
from bootd.overlay import templates
from bootd.overlay.context import Context
from bootd.overlay.meta import Owner, check_path, parse_mode, parse_owner
from bootd.overlay.overlay import MAX_PATH, CompiledDir, Overlay

BLOCK = 512
MAX_DIRS = 100_000  # directories one "each" spec may create


@dataclass(frozen=True, slots=True)
class RenderedFile:
    path: str  # on the node, without the leading /
    kind: str  # "file" or "dir"
    mode: int
    owner: Owner
    group: Owner
    size: int
    overlay: str
    template: bool


@dataclass(frozen=True, slots=True)
class RenderedOverlay:
    data: bytes
    sha256: str
    files: tuple[RenderedFile, ...]
    secret: bool  # any overlay in it is secret: serve only to the node's own credential

    @property
    def etag(self) -> str:
        """A strong HTTP ETag (quoted)."""
        return f'"{self.sha256}"'


@dataclass
class RenderCache:
    """What reads only ``cluster``/``master`` rendered once per batch (while they are the same objects).

    Keys name an overlay version and a part of it (a template, a directory spec) or a whole set of
    overlays that reads nothing per node (a runtime set of hosts, keys and users: one tar for all).
    Entries are replaced, not added, when the cluster view changes, so the cache stays as small as
    the overlay set.
    """

    entries: dict[tuple[str, ...], tuple[object, object, Any]] = field(default_factory=dict)
    hits: int = 0

    def get(self, key: tuple[str, ...], ctx: Context) -> Any:
        hit = self.entries.get(key)
        if hit is not None and hit[0] is ctx.cluster and hit[1] is ctx.master:
            self.hits += 1
            return hit[2]
        return None

    def put(self, key: tuple[str, ...], ctx: Context, value: Any) -> None:
        self.entries[key] = (ctx.cluster, ctx.master, value)


def _octal(value: int, width: int) -> bytes:
    text = f"{value:0{width - 1}o}".encode()
    if len(text) > width - 1:
        raise OverlayError(f"value {value} does not fit a tar header field")
    return text + b"\0"


def _split_name(path: str) -> tuple[bytes, bytes]:
    raw = path.encode()
    if len(raw) <= 100:
        return raw, b""
    for i in range(len(raw) - 1, 0, -1):  # prefix (<=155) "/" name (<=100)
        if raw[i : i + 1] == b"/" and i <= 155 and len(raw) - i - 1 <= 100:
            return raw[i + 1 :], raw[:i]
    raise OverlayError(f"path {path!r} is too long for a tar archive")


def _ids(owner: Owner) -> tuple[int, bytes]:
    if isinstance(owner, int):
        return owner, b""
    return (0, owner.encode()) if owner != "root" else (0, b"root")


@functools.lru_cache(maxsize=65536)  # the same file of the same size for 5,000 nodes: one header
def tar_header(path: str, *, size: int, mode: int, owner: Owner, group: Owner, mtime: int, typeflag: bytes) -> bytes:
    name, prefix = _split_name(path)
    uid, uname = _ids(owner)
    gid, gname = _ids(group)
    header = bytearray(BLOCK)
    header[0:100] = name.ljust(100, b"\0")
    header[100:108] = _octal(mode, 8)
    header[108:116] = _octal(uid, 8)
    header[116:124] = _octal(gid, 8)
    header[124:136] = _octal(size, 12)
    header[136:148] = _octal(mtime, 12)
    header[148:156] = b" " * 8
    header[156:157] = typeflag
    header[257:265] = b"ustar\x0000"
    header[265:297] = uname.ljust(32, b"\0")
    header[297:329] = gname.ljust(32, b"\0")
    header[345:500] = prefix.ljust(155, b"\0")
    header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    return bytes(header)


def _dir_entries(ov: Overlay, ctx: Context, variables: dict[str, Any],
                 cache: RenderCache | None) -> list[RenderedFile]:
    out: list[RenderedFile] = []
    for i, d in enumerate(ov.dirs):
        key = (ov.name, ov.digest, f"dir{i}")
        hit = cache.get(key, ctx) if cache is not None and d.shared else None
        if hit is None:
            hit = list(_dir_spec(ov, i, d, ctx, variables))
            if cache is not None and d.shared:
                cache.put(key, ctx, hit)
        out.extend(hit)
    return out


def _dir_spec(ov: Overlay, i: int, d: CompiledDir, ctx: Context, variables: dict[str, Any]) -> Iterable[RenderedFile]:
    node = ctx.node.name
    where = f"overlay.json: directories[{i}]"
    items: Sequence[Any] = [None]
    if d.each is not None:
        value = templates.render_value(d.each, variables, overlay=ov.name, where=f"{where}.each", node=node)
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise TemplateError(f"each = {d.spec.each!r} is not a list", overlay=ov.name, file=where,
                                line=None, node=node)
        items = list(value)[: MAX_DIRS + 1]
        if len(items) > MAX_DIRS:
            raise TemplateError(f"each = {d.spec.each!r} yields more than {MAX_DIRS} directories",
                                overlay=ov.name, file=where, line=None, node=node)
    for item in items:
        scope = variables if item is None else {**variables, "item": item}

        def field(t: Any, name: str, scope: dict[str, Any] = scope) -> str:
            if isinstance(t, str):
                return t
            return templates.render_template(t, scope, overlay=ov.name, file=f"{where}.{name}",
                                             node=node).decode().strip()

        try:
            path = check_path(field(d.path, "path"), "directory path")
            if len(path) > MAX_PATH:
                raise OverlayError(f"path longer than {MAX_PATH} characters")
            mode = parse_mode(field(d.mode, "mode"), "mode")
            owner = parse_owner(field(d.owner, "owner"), "owner")
            group = parse_owner(field(d.group, "group"), "group")
        except TemplateError:
            raise
        except OverlayError as exc:
            raise TemplateError(str(exc), overlay=ov.name, file=where, line=None, node=node) from None
        yield RenderedFile(path, "dir", mode, owner, group, 0, ov.name, d.each is not None)


def render(overlays: Sequence[Overlay], context: Context, *, cache: RenderCache | None = None,
           mtime: int = 0) -> RenderedOverlay:
    """Render ``overlays`` for ``context.node``; errors name the node, overlay, file and line."""
    whole = ("*", *(ov.digest for ov in overlays), str(mtime))
    if cache is not None and all(ov.shared for ov in overlays):
        hit = cache.get(whole, context)
        if hit is None:
            hit = _render(overlays, context, cache, mtime)
            cache.put(whole, context, hit)
        return hit  # type: ignore[no-any-return]
    return _render(overlays, context, cache, mtime)


def _render(overlays: Sequence[Overlay], context: Context, cache: RenderCache | None, mtime: int) -> RenderedOverlay:
    variables = context.variables()
    node = context.node.name
    chosen: dict[str, tuple[RenderedFile, bytes]] = {}
    for ov in overlays:
        for d in _dir_entries(ov, context, variables, cache):
            prev = chosen.get(d.path)
            if prev is not None and prev[0].kind != "dir":
                raise OverlayError(f"node {node}: overlay {ov.name} makes /{d.path} a directory, but overlay "
                                   f"{prev[0].overlay} writes a file there")
            chosen[d.path] = (d, b"")
        for e in ov.entries:
            if e.template is None:
                assert e.data is not None
                data = e.data
            else:
                key = (ov.name, ov.digest, e.src)
                hit = cache.get(key, context) if cache is not None and e.shared else None
                if hit is None:
                    data = templates.render_template(e.template, variables, overlay=ov.name, file=e.src, node=node)
                    if cache is not None and e.shared:
                        cache.put(key, context, data)
                else:
                    data = hit
            prev = chosen.get(e.dest)
            if prev is not None and prev[0].kind == "dir":
                raise OverlayError(f"node {node}: overlay {ov.name} writes a file at /{e.dest}, but overlay "
                                   f"{prev[0].overlay} makes it a directory")
            m = e.meta
            chosen[e.dest] = (RenderedFile(e.dest, "file", m.mode, m.owner, m.group, len(data), ov.name,
                                           e.template is not None), data)
    parts: list[bytes] = []
    files: list[RenderedFile] = []
    for path in sorted(chosen, key=lambda p: p.split("/")):
        f, data = chosen[path]
        files.append(f)
        if f.kind == "dir":
            parts.append(tar_header(path + "/", size=0, mode=f.mode, owner=f.owner, group=f.group, mtime=mtime,
                                    typeflag=b"5"))
            continue
        parts.append(tar_header(path, size=len(data), mode=f.mode, owner=f.owner, group=f.group, mtime=mtime,
                                typeflag=b"0"))
        parts.append(data)
        if len(data) % BLOCK:
            parts.append(b"\0" * (BLOCK - len(data) % BLOCK))
    parts.append(b"\0" * (2 * BLOCK))
    blob = b"".join(parts)
    return RenderedOverlay(blob, hashlib.sha256(blob).hexdigest(), tuple(files), any(o.secret for o in overlays))
