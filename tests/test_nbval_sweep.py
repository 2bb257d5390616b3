"""Notebook 04 as a reader opens it: under nbval, with the defaults of its parameters cell,
which run the smoke sweep (params/sweeps/smoke-beta.yaml) on a local cluster when its folder
holds no sweep yet, in a project root of its own (``KDBOOK_ROOT``). A file of its own, so
that pytest-xdist runs it beside notebooks 01-03 (tests/test_nbval_book.py)."""
from __future__ import annotations

import json

from conftest import run_nbval


def test_notebook_04_runs_its_smoke_sweep_and_reads_it_with_its_defaults(tmp_path):
    report = run_nbval(["notebooks/04_sweep_analysis.ipynb"], tmp_path)
    assert " passed" in report and "failed" not in report
    record = json.loads((tmp_path / "outputs" / "smoke-beta" / "sweep.json").read_text())
    assert record["status"] == "finished" and len(record["runs"]) == 2
    assert (tmp_path / "outputs" / "smoke-beta" / "sweep_forest.png").is_file()
