"""The package split: the core dependencies cover what kdlib and the notebooks import, each
command that needs more stops at once with one line naming its extra, and (slow, ``make
test-colab``) a Colab-like runtime takes the core install without a version changed and runs
notebooks 01, 02 and 03 in its own kernel."""
from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import nbformat
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kdlib.records import extras
from kdlib.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
BOOK = ["01_train_teachers.ipynb", "02_distill_students.ipynb", "03_fidelity_analysis.ipynb"]
NOTEBOOKS = BOOK + ["04_sweep_analysis.ipynb"]
KERNEL_OWN = {"ipython"}  # the notebooks' IPython.display: any kernel has it


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """pyproject.toml's core dependencies and each extra's, with the extras it includes expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    raw = {k: [Requirement(r) for r in v] for k, v in project["optional-dependencies"].items()}

    def expand(reqs) -> set[str]:
        names = set()
        for r in reqs:
            if canonicalize_name(r.name) == canonicalize_name(project["name"]):
                names |= set().union(*(expand(raw[e]) for e in r.extras))
            else:
                names.add(canonicalize_name(r.name))
        return names

    return expand(Requirement(r) for r in project["dependencies"]), {k: expand(v) for k, v in raw.items()}


def third_party(tree: ast.AST, module: str = "") -> tuple[set[str], set[str], set[str]]:
    """What ``tree`` (kdlib's ``module``, dotted, or a notebook) imports: the top-level names of the
    non-standard-library packages (those inside ``try: ... except ImportError`` are optional, left
    out), the same at module level only, and the kdlib modules it imports at module level (dotted)."""
    optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)
                if any(h.type and re.search(r"\b(ImportError|ModuleNotFoundError)\b", ast.unparse(h.type))
                       for h in t.handlers)
                for s in t.body for n in ast.walk(s)}
    module_level = {id(n) for n in tree.body}
    every, top, internal = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.split(".")[0] == "kdlib"):
            if id(node) in module_level:
                internal |= kdlib_targets(node, module)
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) else []
        for first in {n.split(".")[0] for n in names} - {"kdlib"} - set(sys.stdlib_module_names):
            if id(node) not in optional:
                every.add(first)
                if id(node) in module_level:
                    top.add(first)
    return every, top, internal


def kdlib_targets(node: ast.ImportFrom, module: str) -> set[str]:
    """The kdlib modules (dotted) an ``import from`` in ``module`` loads: the one it names, and each
    name it takes that is itself a module (``from kdlib.analysis import plots``)."""
    if node.level:
        here = module.split(".")
        here = here if (ROOT / Path(*here) / "__init__.py").is_file() else here[:-1]
        target = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
    else:
        target = node.module
    found = {target}
    for alias in node.names:
        sub = ROOT / Path(*f"{target}.{alias.name}".split("."))
        if sub.with_suffix(".py").is_file() or sub.is_dir():
            found.add(f"{target}.{alias.name}")
    return {m for m in found if (ROOT / Path(*m.split("."))).with_suffix(".py").is_file()
            or (ROOT / Path(*m.split(".")) / "__init__.py").is_file()}


def module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.AST]:
    """kdlib's modules (by dotted name) and the book's notebooks (their code cells), parsed."""
    found = {module_of(p): ast.parse(p.read_text()) for p in sorted((ROOT / "kdlib").rglob("*.py"))}
    for name in NOTEBOOKS:
        cells = nbformat.read(ROOT / "notebooks" / name, as_version=4).cells
        found[name] = ast.parse("\n".join(c.source for c in cells if c.cell_type == "code"))
    return found


@functools.cache
def distribution(module: str) -> str:
    return canonicalize_name(_distributions()[module][0])


_distributions = functools.cache(packages_distributions)


def test_core_and_extras_cover_every_import():
    """Every package kdlib or a notebook imports is declared: in the core, or in the extra
    whose guard (kdlib.records.extras) names it; every core dependency is imported somewhere."""
    core, extra_deps = declared()
    guarded = set().union(*extras.EXTRAS.values())
    used = set()
    for name, tree in sources().items():
        for module in third_party(tree, name)[0]:
            used.add(distribution(module))
            assert module in guarded or distribution(module) in core | KERNEL_OWN, \
                f"{name} imports {module} ({distribution(module)}): neither a core dependency nor in an extra"
    assert core <= used, f"core dependencies nothing imports: {sorted(core - used)}"
    for extra, modules in extras.EXTRAS.items():
        assert {distribution(m) for m in modules} <= extra_deps[extra], f"kdlib.records.extras' {extra} is not pyproject's"


def test_notebook_modules_import_only_the_core_at_load():
    """What the notebooks import from kdlib, and what those modules import when loaded, needs
    only the core (an extra's package is imported inside the function that uses it)."""
    core, _ = declared()
    trees = sources()
    todo = {m for name in NOTEBOOKS for m in third_party(trees[name], name)[2]} | {"kdlib"}
    seen = set()
    while todo:
        module = todo.pop()
        seen.add(module)
        _, top, internal = third_party(trees[module], module)
        for imported in top:
            assert distribution(imported) in core, f"{module} imports {imported} when loaded"
        todo |= internal - seen
    assert {"kdlib.book.steps", "kdlib.analysis.plots", "kdlib.analysis.stats", "kdlib.fanout.sweep",
            "kdlib.analysis.sweep_results", "kdlib.book.runner", "kdlib.train.loop"} <= seen


def absent(*modules):
    """find_spec as it answers where ``modules`` are not installed."""
    real = extras.find_spec
    return lambda name: None if name in modules else real(name)


@pytest.mark.parametrize("argv, modules, line", [
    (["sweep", "params/sweeps/smoke-beta.yaml"], ["distributed"],
     "error: kdlib sweep needs Dask: pip install 'kdbook[sweep]'"),
    (["run", "params/smoke.yaml"], ["papermill", "nbconvert"],
     "error: kdlib run needs papermill, nbconvert: pip install 'kdbook[batch]'"),
    (["tune", "params/tune/any.yaml"], ["optuna"],
     "error: kdlib tune needs Optuna: pip install 'kdbook[tune]'"),
])
def test_missing_extra_is_one_line_before_anything_runs(argv, modules, line, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(extras, "find_spec", absent(*modules))
    monkeypatch.chdir(ROOT)
    assert main(argv + ["--outputs", str(tmp_path)]) == 1
    assert capsys.readouterr().err == line + "\n"
    assert list(tmp_path.iterdir()) == []


def test_runner_checks_its_extra(monkeypatch, tmp_path):
    from kdlib.book import runner
    monkeypatch.setattr(extras, "find_spec", absent("papermill"))
    with pytest.raises(extras.MissingExtra, match=r"^kdlib run needs papermill: pip install 'kdbook\[batch\]'$"):
        runner.run(str(ROOT / "params/smoke.yaml"), outputs=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_site_and_a_sweep_or_tuning_from_a_notebook_check_their_extras(monkeypatch, tmp_path):
    """make site without MkDocs, and a sweep or tuning started from notebook 04 or 05 (not through
    the command line) without Dask or Optuna: one line naming the extra, nothing created."""
    from kdlib.publish import site
    from kdlib.fanout import sweep, tune
    monkeypatch.setattr(extras, "find_spec", absent("mkdocs", "distributed", "optuna"))
    with pytest.raises(SystemExit, match=r"^error: make site needs MkDocs: pip install 'kdbook\[docs\]'$"):
        site.main(["--out", str(tmp_path / "site")])
    with pytest.raises(extras.MissingExtra, match=r"^a sweep needs Dask: pip install 'kdbook\[sweep\]'$"):
        sweep.run_sweep(ROOT / "params/sweeps/smoke-beta.yaml", outputs=tmp_path)
    with pytest.raises(extras.MissingExtra, match=r"^tuning needs Optuna, Dask: pip install 'kdbook\[tune\]'$"):
        tune.run_tune(ROOT / "params/tune/smoke-tune.yaml", outputs=tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the Colab-like runtime (slow)
# What a Colab runtime holds before the set-up cell runs, at the versions pip resolves here;
# the core install may add only these: kdbook and the two core packages that none of them pulls in.
PREINSTALLED = ["torch", "torchvision", "numpy", "pandas", "matplotlib", "seaborn", "scikit-learn", "ipykernel",
                "ipywidgets"]
ADDED = {"kdbook", "pyyaml", "tqdm"}
TINY = {"train_subset": 300, "test_subset": 200, "teacher_epochs": 1, "student_epochs": 1}
COLAB = "import sys, types; sys.modules['google.colab'] = types.ModuleType('google.colab')\n"


def installed(python: Path) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(out.stdout)}


def pip(python: Path, *args, cwd=None) -> None:
    subprocess.run([python, "-m", "pip", "install", "-q", *args], cwd=cwd, check=True)


def copy_tree(dest: Path) -> None:
    """The working tree as a clone of it would hold it (without the records in outputs/)."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in files:
        if f and not f.startswith("outputs/") and (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def colab_kernel(python: Path, home: Path) -> dict:
    """A kernel spec for the venv's Python that starts as Colab's does (google.colab imported)."""
    startup = home / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text(COLAB)
    spec = home / "jupyter" / "kernels" / "colab-like"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Colab-like", "language": "python",
        "env": {"IPYTHONDIR": str(home / "ipython"), "KDBOOK_REPO": str(ROOT), "KDBOOK_PROGRESS": "auto"}}))
    return {"JUPYTER_PATH": str(home / "jupyter")}


@pytest.mark.skipif(not os.environ.get("KDBOOK_COLAB_TEST"), reason="minutes and 6 GB: make test-colab")
def test_colab_like_runtime(tmp_path, monkeypatch):
    """A fresh venv holding what Colab preinstalls takes ``pip install .`` with none of their
    versions changed and only ADDED new; kdlib and every module the notebooks import load
    there; run and sweep stop with their one line; then 01, 02 and 03 run in that venv's
    kernel (papermill from outside it), set-up cell included, on a tiny subset."""
    import papermill
    venv, work = tmp_path / "venv", tmp_path / "content"
    try:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        python = venv / "bin" / "python"
        pip(python, "--upgrade", "pip")
        pip(python, *PREINSTALLED)
        before = installed(python)
        copy_tree(work / "kdbook")
        pip(python, ".", cwd=work / "kdbook")
        after = installed(python)
        assert {p: after.get(p) for p in before} == before, "the core install changed a preinstalled package"
        assert set(after) - set(before) == ADDED, f"the core install added {sorted(set(after) - set(before))}"

        trees = sources()
        modules = sorted({m for name in NOTEBOOKS for m in third_party(trees[name])[2]})
        subprocess.run([python, "-c", "import " + ", ".join(["kdlib", *modules])],
                       cwd=tmp_path, check=True)
        for argv, line in [(["run", "params/smoke.yaml"], "kdlib run needs papermill, nbconvert, nbformat"),
                           (["sweep", "params/sweeps/smoke-beta.yaml"], "kdlib sweep needs Dask, Bokeh, papermill")]:
            out = subprocess.run([python, "-m", "kdlib", *argv], cwd=work / "kdbook", capture_output=True, text=True)
            assert out.returncode == 1 and out.stdout == "" and out.stderr.startswith(f"error: {line}")
            assert out.stderr.count("\n") == 1, out.stderr

        monkeypatch.delenv("KDBOOK_ROOT", raising=False)  # as on Colab: paths under the clone
        for key, value in colab_kernel(python, tmp_path).items():
            monkeypatch.setenv(key, value)
        for nb in BOOK:
            papermill.execute_notebook(str(ROOT / "notebooks" / nb), str(tmp_path / nb), parameters=TINY,
                                       kernel_name="colab-like", cwd=str(work), progress_bar=False)
        assert installed(python) == after, "the set-up cell changed the runtime's packages"
        assert (work / "kdbook" / "outputs" / "interactive" / "results.csv").is_file()
    finally:
        shutil.rmtree(venv, ignore_errors=True)
