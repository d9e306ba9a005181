"""The project's layering, read from the source: imports point one way and no module imports itself back.

``service -> prompts_store -> lpt`` and ``trainer -> lpt``; only ``service`` imports the web framework; ``bench``
may use every package but never the tests, and its shared modules import no benchmark. Every import counts,
also one inside a function, since a late import is how a cycle hides.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lpt", "prompts_store", "service", "trainer", "bench")
# What each package may import from the project (besides itself).
ALLOWED = {
    "lpt": set(),
    "prompts_store": {"lpt"},
    "trainer": {"lpt"},
    "service": {"lpt", "prompts_store"},
    "bench": {"lpt", "prompts_store", "service", "trainer"},
}
WEB_FRAMEWORKS = ("fastapi", "starlette", "uvicorn")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every module name an import statement in ``path`` names (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {
        name: {imp for imp in imported_names(path, name) if imp in modules and imp != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_project_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_one_way() -> None:
    wrong = []
    for module, path in project_modules().items():
        package = module.split(".")[0]
        for imported in set(imported_names(path, module)):
            top = imported.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                wrong.append(f"{module} imports {imported}")
            if top == "tests":
                wrong.append(f"{module} imports {imported}")
            if top in WEB_FRAMEWORKS and package != "service":
                wrong.append(f"{module} imports {imported}")
    assert not wrong, "\n".join(sorted(wrong))


def test_bench_helpers_depend_on_no_benchmark() -> None:
    """The shared modules may use each other and the leaf helpers of bench, never a benchmark command
    (``bench.COMMANDS``)."""
    from bench import COMMANDS

    commands = {module for module, _ in COMMANDS.values()}
    graph = import_graph()
    for shared in ("bench.common", "bench.options", "bench.server"):
        assert not graph[shared] & commands, shared


def test_the_routes_hold_no_model_code() -> None:
    routes = ROOT / "service" / "api" / "routes.py"
    assert not {n.split(".")[0] for n in imported_names(routes, "service.api.routes")} & {"torch", "numpy"}
