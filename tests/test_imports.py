"""The package's import graph has no cycle: every `import` of a lit_icl module, at module level or
inside a function (those run too, later), but not under `if TYPE_CHECKING:` (never at run time).
An edge goes to the module named (`from lit_icl.a import b` is an edge to lit_icl.a.b when b is a
module, else to lit_icl.a). A package's parents are not counted: importing lit_icl.x.y runs
lit_icl/__init__.py first by Python's rules, not by a choice of the code."""
import ast
from pathlib import Path

import pytest

import lit_icl

PACKAGE = Path(lit_icl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The lit_icl modules that module `name` imports anywhere except under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", set(files))
            for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"lit_icl.model", "lit_icl.config", "lit_icl.hf"} <= set(graph)
    assert "lit_icl.config" in graph["lit_icl.model"] and "lit_icl.hf" in graph["lit_icl.model"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_config_imports_nothing_of_the_model_at_module_level():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in top if "lit_icl" in ast.unparse(n)]


@pytest.mark.parametrize("source,expected", [
    ("from lit_icl.a import b\n", {"lit_icl.a", "lit_icl.a.b"}),
    ("def f():\n    import lit_icl.a\n", {"lit_icl.a"}),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lit_icl.a import x\n", set()),
    ("from . import b\n", {"lit_icl.a", "lit_icl.a.b"}),
])
def test_the_graph_counts_function_level_imports_and_skips_type_checking(source, expected):
    modules = {"lit_icl.a", "lit_icl.a.b", "lit_icl.a.c"}
    assert imported(ast.parse(source), "lit_icl.a.c", False, modules) == expected
    assert cycles({"x": {"y"}, "y": {"x"}, "z": set()}) == [["x", "y"]]
