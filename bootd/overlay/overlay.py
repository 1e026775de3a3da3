"""An overlay read from disk and compiled: every template parsed once, checked once.

Loading is where a bad overlay is refused (syntax, unknown variables, metadata
naming files that are not there, two files landing on one path), so that
``create``/``edit``/``import`` fail with file and line and a node never meets
the error at boot.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from bootd.errors import OverlayError, TemplateError
from bootd.overlay import templates
from bootd.overlay.context import SHARED
from bootd.overlay.meta import FILES_DIR, META_FILE, TEMPLATE_SUFFIX, DirSpec, FileMeta, OverlayMeta, parse_meta

MAX_FILES = 10_000
MAX_BYTES = 64 * 1024 * 1024
MAX_PATH = 255  # what a ustar header can name


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored file: static bytes, or a compiled template."""

    src: str  # path under files/ as stored (with .j2)
    dest: str  # path on the node
    meta: FileMeta
    data: bytes | None
    template: jinja2.Template | None
    shared: bool  # reads only cluster/master, so one rendering serves every node of a batch


@dataclass(frozen=True, slots=True)
class CompiledDir:
    """A directory spec; each field is its literal text, or a compiled template when it has ``{``."""

    spec: DirSpec
    each: Callable[..., Any] | None
    path: jinja2.Template | str
    mode: jinja2.Template | str
    owner: jinja2.Template | str
    group: jinja2.Template | str
    shared: bool  # reads only cluster/master (and item): the same directories for every node of a batch


@dataclass(frozen=True, slots=True)
class Overlay:
    name: str
    source: str  # "builtin" or "site"
    path: Path
    meta: OverlayMeta
    entries: tuple[Entry, ...]
    dirs: tuple[CompiledDir, ...]
    digest: str  # sha256 over metadata and files: changes whenever what the overlay can render changes

    @property
    def shared(self) -> bool:
        """Renders the same for every node of a batch (nothing reads ``node``, ``vars`` or ``group``)."""
        return all(e.template is None or e.shared for e in self.entries) and all(d.shared for d in self.dirs)

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def secret(self) -> bool:
        return self.meta.secret


def walk_files(root: Path) -> list[str]:
    """Regular files under root, relative, sorted; anything else is refused by name."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            full = Path(dirpath, name)
            st = full.lstat()
            rel = full.relative_to(root).as_posix()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise OverlayError(f"{FILES_DIR}/{rel}: only regular files and directories can be stored "
                                   f"(this is a {'symlink' if stat.S_ISLNK(st.st_mode) else 'special file'})")
            out.append(rel)
    return sorted(out)


def _compile_dir(name: str, i: int, spec: DirSpec) -> CompiledDir:
    where = f"{META_FILE}: directories[{i}]"

    used: set[str] = set()

    def t(field: str, value: str) -> jinja2.Template | str:
        if "{" not in value:
            return value
        used.update(templates.used_variables(value))
        return templates.compile_template_any(value, overlay=name, file=f"{where}.{field}")

    each = None
    if spec.each is not None:
        each = templates.compile_expression(spec.each, overlay=name, where=f"{where}.each")
        used.update(templates.used_variables("{{ " + spec.each + " }}"))
    fields = t("path", spec.path), t("mode", spec.mode), t("owner", spec.owner), t("group", spec.group)
    return CompiledDir(spec, each, *fields, shared=used <= SHARED | {"item"})


def load_overlay(path: Path, name: str, source: str) -> Overlay:
    meta_path = path / META_FILE
    try:
        meta_text = meta_path.read_text() if meta_path.exists() else ""
    except (OSError, UnicodeDecodeError) as exc:
        raise OverlayError(f"overlay {name}: cannot read {META_FILE}: {exc}") from None
    try:
        meta = parse_meta(meta_text, f"overlay {name}: {META_FILE}")
    except OverlayError:
        raise
    files = walk_files(path / FILES_DIR)
    if len(files) > MAX_FILES:
        raise OverlayError(f"overlay {name}: {len(files)} files, more than the limit of {MAX_FILES}")
    missing = sorted(set(meta.files) - set(files))
    if missing:
        raise OverlayError(f"overlay {name}: {META_FILE} sets files[{missing[0]!r}], which is not in {FILES_DIR}/")
    digest = hashlib.sha256(meta_text.encode())
    total = 0
    entries: list[Entry] = []
    dests: dict[str, str] = {}
    for rel in files:
        data = (path / FILES_DIR / rel).read_bytes()
        total += len(data)
        if total > MAX_BYTES:
            raise OverlayError(f"overlay {name}: larger than the limit of {MAX_BYTES} bytes")
        digest.update(f"\0{rel}\0{len(data)}\0".encode())
        digest.update(data)
        fmeta = meta.file(rel)
        is_template = fmeta.template if fmeta.template is not None else rel.endswith(TEMPLATE_SUFFIX)
        dest = rel[: -len(TEMPLATE_SUFFIX)] if is_template and rel.endswith(TEMPLATE_SUFFIX) else rel
        if len(dest) > MAX_PATH:
            raise OverlayError(f"overlay {name}: {rel}: path longer than {MAX_PATH} characters")
        if dest in dests:
            raise OverlayError(f"overlay {name}: {dests[dest]} and {rel} would both write /{dest}")
        dests[dest] = rel
        if not is_template:
            entries.append(Entry(rel, dest, fmeta, data, None, False))
            continue
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            raise TemplateError(f"a template must be UTF-8 text ({exc.reason} at byte {exc.start}); "
                                "set \"template\": false in overlay.json to copy it as is",
                                overlay=name, file=rel, line=None) from None
        template = templates.compile_template(text, overlay=name, file=rel)
        leaks = templates.secret_reads(text)
        if leaks and not meta.secret:
            raise TemplateError(f"reads {', '.join(sorted(leaks))}, which are secrets: set \"secret\": true in "
                                f"{META_FILE} so only the node itself gets it", overlay=name, file=rel, line=None)
        shared = templates.used_variables(text) <= SHARED
        entries.append(Entry(rel, dest, fmeta, None, template, shared))
    dirs = tuple(_compile_dir(name, i, d) for i, d in enumerate(meta.directories))
    return Overlay(name=name, source=source, path=path, meta=meta, entries=tuple(entries), dirs=dirs,
                   digest=digest.hexdigest())
