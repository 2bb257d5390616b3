"""kdlib's modules form floors: each imports only modules below it, so no import circle."""
from __future__ import annotations

import ast
from pathlib import Path

import kdlib

PACKAGE = Path(kdlib.__file__).resolve().parent


def kdlib_imports(source: str, module: str) -> set[str]:
    """The kdlib modules ``source`` (the text of kdlib.<module>) imports anywhere, at the
    top or inside a function: ``from .x import y``, ``from . import x``, ``import kdlib.x``,
    ``from kdlib.x import y``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "kdlib":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("kdlib."))
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: kdlib_imports(p.read_text(), p.stem) & modules for p in PACKAGE.glob("*.py")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_every_form_of_import():
    source = ("from .a import x\nfrom . import b\nimport kdlib.c\nfrom kdlib.d import y\nfrom kdlib import e\n"
              "def f():\n    from .g import z\nimport os\nfrom pathlib import Path\n")
    assert kdlib_imports(source, "me") == {"a", "b", "c", "d", "e", "g"}


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_kdlib_has_no_import_circle():
    graph = import_graph()
    assert {"train", "assemble", "book", "runner", "records", "bench"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_loop_and_the_records_sit_low():
    """The training loop knows nothing of how teachers and students are assembled, and the
    records' helpers import nothing of kdlib."""
    graph = import_graph()
    assert "assemble" not in graph["train"] and "book" not in graph["train"]
    assert graph["records"] == set()
