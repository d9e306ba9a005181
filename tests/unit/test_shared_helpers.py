"""The test suites share one copy of each helper (``tests/support``): no test module defines its own free port,
polling loop, prompt-set builder or metrics parser, nor launches ``lpt-serve`` by itself."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SUPPORT = TESTS / "support"
# Helpers tests/support provides; a module-level or nested function of these names (leading underscores aside) is
# a copy of one of them.
SHARED_NAMES = {
    *("free_port", "wait_until", "wait_for", "make_set", "parse_metrics", "metric", "metric_value"),
    *("setting_args", "train_argv"),
}
# Modules that may define a copy, by (path under tests/, function name): none.
ALLOWED: set[tuple[str, str]] = set()


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Module-level and nested functions; methods are left out (a class may well have a ``wait_for``)."""
    methods = {
        id(node)
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and id(node) not in methods
    ]


def _launches_lpt_serve(node: ast.AST) -> bool:
    """``shutil.which("lpt-serve")`` or the module path ``"service.cli"`` as a string: a launcher of its own."""
    if isinstance(node, ast.Constant) and node.value == "service.cli":
        return True
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        return name == "which" and node.args[0].value == "lpt-serve"
    return False


def copies_in(source: str) -> list[str]:
    """What in ``source`` duplicates a shared helper, one line each (``name`` and line number)."""
    tree = ast.parse(source)
    found = [f"{f.name} (line {f.lineno})" for f in _functions(tree) if f.name.lstrip("_") in SHARED_NAMES]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client.parser":
            found.append(f"its own Prometheus parser import (line {node.lineno})")
        elif _launches_lpt_serve(node):
            found.append(f"its own lpt-serve command line (line {node.lineno})")
    return found


def test_no_test_module_defines_its_own_copy_of_a_shared_helper():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        if SUPPORT in path.parents or path == Path(__file__).resolve():  # the helpers, and the patterns above
            continue
        rel = path.relative_to(TESTS).as_posix()
        copies = [c for c in copies_in(path.read_text()) if (rel, c.split(" ")[0]) not in ALLOWED]
        if copies:
            offenders[rel] = copies
    assert not offenders, f"use tests/support instead of these copies: {offenders}"


def test_the_scan_finds_each_kind_of_copy():
    source = """
import shutil
from prometheus_client.parser import text_string_to_metric_families

def _free_port(): ...
async def wait_until(predicate, timeout): ...
def make_set(info): ...
def outer():
    def metric(text, name): ...
class Recorder:
    def wait_for(self, event): ...
COMMAND = [shutil.which("lpt-serve") or "python", "-m", "service.cli"]
"""
    found = copies_in(source)
    names = [line.split(" ")[0] for line in found]
    assert names[:4] == ["_free_port", "wait_until", "make_set", "metric"]  # the method wait_for is not a copy
    assert sum("Prometheus parser" in line for line in found) == 1
    assert sum("lpt-serve command line" in line for line in found) == 2
    assert copies_in("from tests.support.ports import free_port\nport = free_port()\n") == []
