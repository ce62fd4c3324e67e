"""The house a newcomer walks (#23): the top-level modules import one another without a circle, model.py
imports nothing of ours, and no file is too long to read."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {path.stem: path for path in sorted(REPO.glob("*.py"))}


def imports_of_ours(path: Path) -> set[str]:
    """The top-level modules `path` imports, wherever the import stands: at the top, inside a function, or
    under TYPE_CHECKING (a circle that only type hints close is still one a reader has to untangle)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name in MODULES and name != path.stem}


def a_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it (first and last the same), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is known
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state and (circle := visit(imported)):
                return circle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_the_top_level_modules_import_each_other_without_a_circle():
    graph = {name: imports_of_ours(path) for name, path in MODULES.items()}
    circle = a_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_a_circle_is_found_wherever_it_closes():
    assert a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert a_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_model_py_imports_nothing_of_ours():
    assert imports_of_ours(MODULES["model"]) == set()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_is_over_750_lines(name):
    assert len(MODULES[name].read_text().splitlines()) <= 750


def test_main_py_is_at_most_500_lines():
    assert len(MODULES["main"].read_text().splitlines()) <= 500


def test_the_readme_is_at_most_300_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
