"""Capsule recipes: a Debian root tree described by a small TOML file.

A recipe says what goes into a node image, never how to build it; build.py turns
it into an ``mmdebstrap`` run. It is validated completely before anything runs,
so a typo costs a second, not a half-finished build; every error names the
file, the key and what would be valid (the style of bootd/config.py)::

    suite = "bookworm"                 # Debian suite
    mirror = "http://deb.debian.org/debian"   # default: the sources apt on this machine uses
    components = ["main"]
    variant = "minbase"                # mmdebstrap variant
    packages = ["systemd-sysv", "openssh-server"]
    build_packages = ["gcc"]           # installed for the commands, purged after them
    commands = ["gcc -o /usr/local/bin/x /usr/local/src/x.c"]   # run in the tree (chroot, /bin/sh -e)
    epoch = 1700000000                 # SOURCE_DATE_EPOCH: same inputs, same bytes

    [[files]]                          # copied into the tree before the commands run
    src = "files/x.c"                  # relative to the recipe file
    dest = "/usr/local/src/x.c"
    mode = "0644"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootd.errors import CapsuleError

VARIANTS = ("essential", "apt", "required", "minbase", "buildd", "important", "debootstrap", "standard")
KEYS = ("suite", "mirror", "components", "variant", "packages", "build_packages", "commands", "epoch", "files")
FILE_KEYS = ("src", "dest", "mode")
DEFAULT_EPOCH = 1_700_000_000
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:[=/][A-Za-z0-9.+~:_-]+)?")
_SUITE = re.compile(r"[a-z][a-z0-9-]*")
_COMPONENT = re.compile(r"[a-z0-9][a-z0-9/-]*")
_URL = re.compile(r"(https?|file)://\S+")


class RecipeError(CapsuleError):
    """A recipe value is missing or invalid; the message names the file, the key and what is valid."""

    def __init__(self, path: Path | str, key: str, message: str) -> None:
        self.path, self.key = str(path), key
        super().__init__(f"{path}: {key}: {message}")


@dataclass(frozen=True)
class FileSpec:
    src: Path  # absolute, on the master
    dest: str  # absolute, in the tree
    mode: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    suite: str
    sources: tuple[str, ...]  # "deb URI SUITE COMPONENTS..." lines
    components: tuple[str, ...]
    variant: str
    packages: tuple[str, ...]
    build_packages: tuple[str, ...]
    commands: tuple[str, ...]
    files: tuple[FileSpec, ...]
    epoch: int


def _strings(path: Path, key: str, value: Any, pattern: re.Pattern[str] | None, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RecipeError(path, key, f"{value!r} is not valid; expected a list of {what}")
    for item in value:
        if not isinstance(item, str) or not item.strip() or (pattern is not None and not pattern.fullmatch(item)):
            raise RecipeError(path, key, f"{item!r} is not valid; expected {what}")
    return tuple(value)


def _mode(path: Path, key: str, value: Any) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        return int(value, 8)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o7777:
        return value
    raise RecipeError(path, key, f"{value!r} is not valid; expected an octal mode such as \"0644\" or \"0755\"")


def _files(path: Path, value: Any) -> tuple[FileSpec, ...]:
    if not isinstance(value, list):
        raise RecipeError(path, "files", f"{value!r} is not valid; expected [[files]] tables with src, dest, mode")
    out = []
    for i, item in enumerate(value):
        key = f"files[{i}]"
        if not isinstance(item, dict):
            raise RecipeError(path, key, "expected a table with src, dest and mode")
        unknown = sorted(set(item) - set(FILE_KEYS))
        if unknown:
            raise RecipeError(path, f"{key}.{unknown[0]}", f"unknown key; valid keys are: {', '.join(FILE_KEYS)}")
        for need in ("src", "dest"):
            if not isinstance(item.get(need), str) or not item[need]:
                raise RecipeError(path, f"{key}.{need}", "missing or not a string; expected a path")
        src = (path.parent / item["src"]).resolve()
        if not src.is_file():
            raise RecipeError(path, f"{key}.src", f"{item['src']!r} is not a file (looked at {src})")
        dest = item["dest"]
        if not dest.startswith("/") or ".." in dest.split("/") or dest.endswith("/"):
            raise RecipeError(path, f"{key}.dest", f"{dest!r} is not valid; expected an absolute file path in "
                              "the tree without '..', such as /usr/local/bin/tool")
        mode = _mode(path, f"{key}.mode", item.get("mode", "0644"))
        out.append(FileSpec(src, dest, mode))
    return tuple(out)


def load_recipe(path: Path | str, apt_root: Path = Path("/")) -> Recipe:
    """Parse and check a recipe file completely; RecipeError says what is wrong and where."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(path, "-", "file not found") from None
    except OSError as exc:
        raise RecipeError(path, "-", f"cannot read the file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(path, "-", f"not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise RecipeError(path, unknown[0], f"unknown key; valid keys are: {', '.join(KEYS)}")
    suite = data.get("suite", "bookworm")
    if not isinstance(suite, str) or not _SUITE.fullmatch(suite):
        raise RecipeError(path, "suite", f"{suite!r} is not valid; expected a Debian suite such as bookworm")
    components = _strings(path, "components", data.get("components", ["main"]), _COMPONENT,
                          "Debian archive components such as main, contrib")
    if not components:
        raise RecipeError(path, "components", "must not be empty; expected e.g. [\"main\"]")
    variant = data.get("variant", "minbase")
    if variant not in VARIANTS:
        raise RecipeError(path, "variant", f"{variant!r} is not valid; expected one of: {', '.join(VARIANTS)}")
    packages = _strings(path, "packages", data.get("packages", []), _PACKAGE,
                        "Debian package names such as openssh-server (optionally pkg=version)")
    build_packages = _strings(path, "build_packages", data.get("build_packages", []), _PACKAGE,
                              "Debian package names such as gcc")
    commands = _strings(path, "commands", data.get("commands", []), None, "shell commands (non-empty strings)")
    epoch = data.get("epoch", DEFAULT_EPOCH)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 <= epoch < 2**40:
        raise RecipeError(path, "epoch", f"{epoch!r} is not valid; expected seconds since 1970 (SOURCE_DATE_EPOCH)")
    files = _files(path, data.get("files", []))
    if "mirror" in data:
        mirror = data["mirror"]
        if not isinstance(mirror, str) or not _URL.fullmatch(mirror):
            raise RecipeError(path, "mirror", f"{mirror!r} is not valid; expected an http://, https:// or "
                              "file:// URL of a Debian archive")
        sources: tuple[str, ...] = (f"deb {mirror} {suite} {' '.join(components)}",)
    else:
        found = machine_sources(suite, apt_root)
        if not found:
            raise RecipeError(path, "mirror", f"not set, and apt on this machine has no source for {suite} in "
                              f"{apt_root / 'etc/apt'}; expected a URL such as http://deb.debian.org/debian")
        sources = tuple(f"deb {uri} {s} {' '.join(components)}" for uri, s in found)
    return Recipe(path=path.resolve(), suite=suite, sources=sources, components=components, variant=variant,
                  packages=packages, build_packages=build_packages, commands=commands, files=files, epoch=epoch)


def _one_line_sources(text: str) -> Iterable[tuple[str, str]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [ options ]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], words[1]


def _deb822_sources(text: str) -> Iterable[tuple[str, str]]:
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in para.splitlines():
            if line.startswith("#"):
                continue
            if line[:1].isspace() and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                yield uri, suite


def machine_sources(suite: str, apt_root: Path = Path("/")) -> list[tuple[str, str]]:
    """(URI, suite) of this machine's apt sources for ``suite``, its -updates and its -security.

    A recipe without a mirror uses what the master itself installs from: that
    is the mirror the cluster can reach, and security fixes come with it.
    """
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    etc = apt_root / "etc" / "apt"
    files = [etc / "sources.list"]
    d = etc / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    out: list[tuple[str, str]] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        parse = _deb822_sources if f.suffix == ".sources" else _one_line_sources
        for uri, s in parse(text):
            if s in wanted and (uri, s) not in out:
                out.append((uri, s))
    return out
