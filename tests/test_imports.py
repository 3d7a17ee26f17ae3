"""The package's import graph (top-level and function-level imports, read with ast): no cycle and
no import of another module's private (_underscore) name, over the whole package (CHECKED)."""

from __future__ import annotations

import ast
from pathlib import Path

import structprune

ROOT = Path(structprune.__file__).parent
CHECKED = ("structprune",)  # every module


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> structprune modules it imports, [(importer, module, private name)])."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    dest = sub if sub in mods else target
                    if dest in mods and dest != mod:
                        graph[mod].add(dest)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and dest in mods:
                        private.append((mod, dest, alias.name))
            elif isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names if a.name in mods and a.name != mod}
    for mod in graph:  # importing a.b.c runs a.b's __init__ (its own package excepted)
        for dest in list(graph[mod]):
            parent = dest.rsplit(".", 1)[0]
            while parent in mods and parent not in ("structprune", mod) and not mod.startswith(parent + "."):
                graph[mod].add(parent)
                parent = parent.rsplit(".", 1)[0]
    return graph, private


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def _checked(mod: str) -> bool:
    return any(mod == c or mod.startswith(c + ".") for c in CHECKED)


def test_no_import_cycle_through_the_checked_modules():
    graph, _ = _imports(_modules())
    cycles = [m for m in graph if _checked(m) and m in _reaches(graph, m)]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_checkpoint_side_never_imports_model_resolution():
    graph, _ = _imports(_modules())
    assert "structprune.io.resolve" not in _reaches(graph, "structprune.io.checkpoint")


def test_no_private_name_imported_from_another_module():
    _, private = _imports(_modules())
    bad = [p for p in private if _checked(p[0]) or _checked(p[1])]
    assert not bad, f"(importer, module, private name): {bad}"
