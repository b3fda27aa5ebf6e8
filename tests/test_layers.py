"""The package's layers import downwards only (docs/architecture.md): a module may import its own layer or one below.

The walk reads every module's source (no import), so it also sees imports inside functions and under
TYPE_CHECKING: a lazy import that runs upward is still an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ringlet"
# top to bottom; a module directly under ringlet/ (other than __main__) is the composition root
LAYERS = ("cli", "root", "api", "master", "worker", "net", "models", "shared")


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "ringlet", module
    if len(parts) == 1 or parts[1] == "__main__":
        return "cli"  # `python -m ringlet` and the package itself are the command line's entry
    return parts[1] if parts[1] in LAYERS else "root"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, module) of every import of a ringlet module in the file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name == "ringlet" or name.startswith("ringlet.")]


def upward_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        here = layer_of(module_name(path, root))
        for line, name in imported_modules(path, root):
            there = layer_of(name)
            if LAYERS.index(there) < LAYERS.index(here):
                problems.append(f"{path.relative_to(root.parent)}:{line} ({here}) imports {name} ({there})")
    return problems


def test_every_layer_imports_only_its_own_or_lower_layers() -> None:
    assert upward_imports() == []


def test_the_walk_sees_upward_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy import from a lower layer into a higher one is reported."""
    module = tmp_path / "ringlet" / "models" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text("def f():\n    from ringlet.api.app import create_app\n    from . import sibling\n")
    assert upward_imports(tmp_path / "ringlet") == [
        "ringlet/models/example.py:2 (models) imports ringlet.api.app (api)"]


def test_only_the_composition_root_imports_api_master_worker_and_net_together() -> None:
    together = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layers = {layer_of(name) for _, name in imported_modules(path)}
        if {"api", "master", "worker", "net"} <= layers:
            together.append(module_name(path))
    assert together and all(layer_of(m) == "root" for m in together), together


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a name like `pkg.mod.func` counts as `pkg.mod`)."""
    modules = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imported_modules(path, root):
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (Tarjan's components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while (member := stack.pop()) != module:
                group.append(member)
            group.append(module)
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_modules_import_each_other() -> None:
    """Not even lazily: two modules that need each other are one concept split badly, or a missing third."""
    # a package's __init__ re-exporting its modules is not a loop between them
    graph = {m: {t for t in targets if not m.startswith(f"{t}.")} for m, targets in import_graph().items()}
    assert cycles(graph) == []


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_test_modules_import_no_other_test_module() -> None:
    """What tests share lives in tests/support/ (or a conftest), never in another test module."""
    tests = PACKAGE.parent / "tests"
    problems = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            problems += [f"{path.relative_to(tests.parent)}:{node.lineno} imports {name}" for name in names
                         if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")]
    assert problems == []
