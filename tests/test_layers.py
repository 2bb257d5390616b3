"""kdlib's rooms and floors: every import (at the top or inside a function) runs one way, down the
floors records <- train <- book <- fanout; the readers (analysis, publish) read only the records,
the params schema and each other, never the orchestration; no private name crosses modules; no
import circle; Optuna's private API in one named place at most."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import kdlib

PACKAGE = Path(kdlib.__file__).resolve().parent
# each room and the rooms it may import (besides itself)
MAY_IMPORT = {
    "records": set(),
    "train": {"records"},
    "book": {"records", "train"},
    "fanout": {"records", "train", "book", "analysis"},  # a tuning's record names its settings in words
    "analysis": {"records", "book.params"},
    "publish": {"records", "analysis", "book.params"},
    "bench": {"records", "train", "book"},
    "": {"records", "train", "book", "fanout", "analysis", "publish", "bench"},  # kdlib/__main__.py: the commands
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[tuple[str, tuple[str, ...]]]:
    """(kdlib module imported, names taken from it) for every import of ``source`` (the text of
    ``module``), at the top or inside a function: relative or absolute, ``from . import x`` as module x."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("kdlib"):
                continue
            names = tuple(a.name for a in node.names)
            submodules = [f"{target}.{n}" for n in names if (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).with_suffix(".py").is_file()
                          or (PACKAGE.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
            if submodules:
                found.update((m, ()) for m in submodules)
            else:
                found.add((target, names))
        elif isinstance(node, ast.Import):
            found.update((a.name, ()) for a in node.names if a.name.startswith("kdlib."))
    return found


def graph() -> dict[str, set[tuple[str, tuple[str, ...]]]]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        out[name] = {(m, n) for m, n in imports(path.read_text(), name, path.name == "__init__.py") if m != name}
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_every_form_of_import():
    source = ("from .a import x\nfrom . import cells\nimport kdlib.train.loop\nfrom kdlib.book.params import y\n"
              "from ..records import names\ndef f():\n    from ..fanout.tune import z\nimport os\n")
    found = imports(source, "kdlib.analysis.me")
    assert found == {("kdlib.analysis.a", ("x",)), ("kdlib.analysis.cells", ()), ("kdlib.train.loop", ()),
                     ("kdlib.book.params", ("y",)), ("kdlib.records.names", ()), ("kdlib.fanout.tune", ("z",))}


def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_kdlib_has_no_import_circle_over_its_modules():
    edges = {m: {t for t, _ in found} for m, found in graph().items()}
    assert {"kdlib.train.loop", "kdlib.book.steps", "kdlib.fanout.tune", "kdlib.analysis.cells"} <= set(edges)
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_import_runs_down_the_floors_and_readers_never_reach_the_orchestration():
    wrong = []
    for module, found in graph().items():
        mine = room(module)
        for target, _ in found:
            theirs = room(target)
            if theirs == mine or target == "kdlib":
                continue
            allowed = MAY_IMPORT[mine]
            if theirs not in allowed and target.removeprefix("kdlib.") not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "; ".join(sorted(wrong))


def test_no_private_name_is_imported_across_modules():
    private = [f"{module} imports {name} from {target}" for module, found in graph().items()
               for target, names in found for name in names if name.startswith("_") and name != "__version__"]
    assert not private, "; ".join(private)


def test_optunas_private_api_is_used_in_one_named_place_at_most():
    pattern = re.compile(r"\._storage\b|\._trial_id\b|\._study_id\b")
    users = [p for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert len(users) <= 1, users
    for p in users:  # and says why no public call serves
        assert "no public call serves" in p.read_text().lower(), p


def test_each_room_says_what_lives_there_and_what_it_may_import():
    for name in MAY_IMPORT:
        if not name:
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), name
