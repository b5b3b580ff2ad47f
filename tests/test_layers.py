"""The project's layers (README "Layout"): no import cycle, and every import points down.

core (schema, fold rule, Hub I/O) <- models (networks, data, training, labelling) <- builder (the build
and what combines data and models) <- affectnet_plus.py, scripts. Function-local imports count.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "models", "builder", "scripts")
# What each package may import from the project (besides itself).
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "builder": {"core", "models"},
    "scripts": {"core", "models", "builder", "affectnet_plus"},
    "affectnet_plus": {"core", "builder"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """``{module: project modules it imports}``, counting imports anywhere in the file."""
    files = [ROOT / "affectnet_plus.py", *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                candidates = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            else:
                continue
            targets.update(c for c in candidates if c in modules and c != name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = project_imports()
    assert len(graph) > 30 and graph["affectnet_plus"]  # the walk found the project
    assert find_cycle(graph) is None


def test_imports_point_down():
    wrong = []
    for module, targets in project_imports().items():
        package = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong
