"""Notebook hygiene: committed without outputs, kernelspec python3, one parameters cell."""
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_train_teachers.ipynb", "02_distill_students.ipynb",
                                           "03_fidelity_analysis.ipynb", "04_sweep_analysis.ipynb", "05_tune.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert nb.cells[0].cell_type == "markdown" and tagged[0] == 1, "explanation first, then parameters"
    assert "google.colab" in nb.cells[2].source, "the Colab set-up cell follows the parameters"
    assert nb.cells[2].metadata.get("tags") == ["colab-setup"], "tagged, so the HTML folds it"


def test_colab_cell_without_kdbook_repo_stops_with_one_line(tmp_path, monkeypatch):
    """In Colab (google.colab imported) and no KDBOOK_REPO: a one-line stop naming what to
    set, nothing cloned or installed; the cell is the same in every notebook."""
    import subprocess
    import sys
    import types
    cells = {nbformat.read(p, as_version=4).cells[2].source for p in NOTEBOOKS}
    assert len(cells) == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDBOOK_REPO", raising=False)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit) as stop:
        exec(cells.pop(), {})
    message = str(stop.value)
    assert "KDBOOK_REPO" in message and "\n" not in message
    assert ran == [] and list(tmp_path.iterdir()) == []


def test_the_runner_reads_and_validates_notebooks_without_jsonschemas_iri_grammar():
    """A run's process (the runner, a sweep's worker) imports papermill and nbformat without
    building jsonschema's RFC 3987 grammar (over a second at every start), and still reads
    and validates the notebooks and their parameters."""
    import subprocess
    import sys
    script = ("import sys\n"
              "from kdlib.book import runner\n"
              "nb_dir = runner.notebooks_dir()\n"
              "keys = runner.declared_parameters(nb_dir / '01_train_teachers.ipynb')\n"
              "import nbformat\n"
              "nbformat.validate(nbformat.read(nb_dir / '03_fidelity_analysis.ipynb', as_version=4))\n"
              "print(sorted(keys)[:3], sys.modules.get('rfc3987_syntax', 'absent'), 'jsonschema' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['augment', 'batch_size', 'code_dir'] None True", out
