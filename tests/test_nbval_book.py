"""Notebooks 01, 02 and 03 as a reader opens them: under nbval, with the defaults of their
parameters cell, in that order (03 reads what 01 and 02 wrote), in a project root of their
own (``KDBOOK_ROOT``), so that nothing is written into the repository. A test here, not a
separate phase of ``make test``, so that it runs beside the other tests."""
from __future__ import annotations

from conftest import run_nbval


def test_notebooks_01_02_03_run_in_order_with_their_defaults(tmp_path):
    notebooks = ["notebooks/01_train_teachers.ipynb", "notebooks/02_distill_students.ipynb",
                 "notebooks/03_fidelity_analysis.ipynb"]
    report = run_nbval(notebooks, tmp_path)
    assert " passed" in report and "failed" not in report
    assert (tmp_path / "outputs" / "interactive" / "metrics_camkd.json").is_file()  # 02 wrote its record, for 03
