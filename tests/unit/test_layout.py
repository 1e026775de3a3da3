"""The import rules of DESIGN.md, enforced by walking every module's AST."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "bootd"
IO_MODULES = {"asyncio", "socket", "aiohttp", "sqlite3", "selectors", "bootd.config"}

RULES: list[tuple[str, set[str]]] = [
    ("bootd/proto", IO_MODULES | {"bootd.store", "bootd.service", "bootd.net", "bootd.capsule"}),
    ("bootd/capsule", IO_MODULES | {"bootd.store", "bootd.service", "bootd.net"}),
    ("bootd/overlay", IO_MODULES | {"bootd.store", "bootd.service", "bootd.net", "bootd.capsule"}),
    ("bootd/model.py", IO_MODULES | {"bootd.store", "bootd.service", "bootd.net"}),
    ("bootd/service", {"bootd.net", "aiohttp", "bootd.store.sqlite", "bootd.compose", "bootd.daemon"}),
    ("bootd/net", {"bootd.store", "bootd.compose", "bootd.daemon"}),
]


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def banned(name: str, rules: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in rules)


@pytest.mark.parametrize(("where", "rules"), RULES, ids=[r[0] for r in RULES])
def test_import_rules(where: str, rules: set[str]) -> None:
    target = ROOT / where
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    if not files:
        pytest.skip(f"{where} does not exist yet")
    bad = [f"{f.relative_to(ROOT)} imports {n}" for f in files for n in imports(f) if banned(n, rules)]
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli() -> None:
    bad = [f"{f.relative_to(ROOT)} imports {n}" for f in PKG.rglob("*.py")
           if "cli" not in f.relative_to(PKG).parts and f.name != "__main__.py"
           for n in imports(f) if banned(n, {"bootd.cli"})]
    assert not bad, "\n".join(bad)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "bootd.service").read_text()
    assert "Type=notify" in unit and "AF_NETLINK" in unit
    # A dedicated user, private files, and no packet sockets (nothing in bootd opens one).
    assert "User=bootd" in unit and "UMask=0077" in unit and "StateDirectoryMode=0700" in unit
    assert "AF_PACKET" not in unit.split("RestrictAddressFamilies=")[1].splitlines()[0]
    # verify checks that ExecStart exists; point it at a binary that does.
    (tmp_path / "bootd.service").write_text(unit.replace("/usr/local/bin/bootd", "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "bootd.service")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    score = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(tmp_path / "bootd.service")],
                           capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for bootd.service: (\d+\.\d+)", score.stdout)
    assert found is not None, score.stdout[-2000:] + score.stderr
    assert float(found.group(1)) <= 1.5, score.stdout


def test_helper_unit_verifies(tmp_path: Path) -> None:
    """The root helper that runs the API's capsule jobs (systemd/bootd-helper.service) is a valid unit."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "bootd-helper.service").read_text()
    assert " helper" in unit and "KillMode=control-group" in unit and "UMask=0077" in unit
    (tmp_path / "bootd-helper.service").write_text(unit.replace("/usr/local/bin/bootd", "/bin/true"))
    (tmp_path / "bootd.service").write_text((ROOT / "systemd" / "bootd.service").read_text()
                                            .replace("/usr/local/bin/bootd", "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "bootd-helper.service")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# -- one composition root, no cycles, transports and the CLI never hold a store -------------------------


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_graph() -> dict[str, set[str]]:
    """Every bootd module -> the bootd modules it imports (at any depth of the file: lazy imports count).

    ``from pkg import sub`` where ``sub`` is a module is an edge to ``pkg.sub`` only: the usual
    package pattern (``pkg/__init__`` re-exporting from ``pkg.sub``, which imports a sibling through
    ``from pkg import other``) is not a cycle.
    """
    files = {module_name(f): f for f in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t for t in subs if t in files] or [node.module]
                if len(targets) < len(subs):
                    targets.append(node.module)  # some names are attributes of the module itself
            edges.update(t for t in targets if t in files and t != mod)
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


STORE_NAMES = {"store", "repo", "SqliteRepo", "SqliteNodeStore", "NodeStore", "memory_store", "open_store"}


def store_touches(path: Path) -> list[str]:
    """Imports of bootd.store, names of store classes, and any `.store`/`.repo` attribute access."""
    tree = ast.parse(path.read_text(), str(path))
    found = [f"imports {n}" for n in imports(path) if banned(n, {"bootd.store"})]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in STORE_NAMES:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in STORE_NAMES - {"store", "repo"}:
            found.append(f"line {node.lineno}: {node.id}")
    return found


@pytest.mark.parametrize("where", ["bootd/net", "bootd/cli"])
def test_transports_and_cli_never_touch_a_store(where: str) -> None:
    bad = [f"{f.relative_to(ROOT)} {t}" for f in sorted((ROOT / where).rglob("*.py")) for t in store_touches(f)]
    assert not bad, "\n".join(bad)


def test_store_touch_check_sees_attribute_access(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(self):\n    return self.registry.store.list_nodes()\n")
    assert store_touches(sample) == ["line 2: .store"]


def test_only_the_lifecycle_writes_states() -> None:
    """Every state change goes through bootd/service/lifecycle.py (its table); nobody else calls set_state."""
    owner = PKG / "service" / "lifecycle.py"
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        if f == owner or "store" in f.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Attribute) and node.attr == "set_state":
                bad.append(f"{f.relative_to(ROOT)} line {node.lineno}")
    assert not bad, "state changes outside the lifecycle table:\n" + "\n".join(bad)
