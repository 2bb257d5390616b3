"""``python -m kdlib.report --vs``: two runs' students compared seed by seed."""
import json

import numpy as np
import pytest
import yaml
from scipy import stats as st

from kdlib.report import main, runs_markdown, runs_table, update_readme


def fake_run(folder, schedule, finals, curve_step):
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump({"lr_schedule": schedule, "beta": 100.0, "threads": 1}))
    runs = [{"seed": s, "history": [{"test_acc": acc - curve_step * (4 - e)} for e in range(5)]}
            for s, acc in enumerate(finals)]
    (folder / "metrics_vanilla.json").write_text(json.dumps({"method": "vanilla", "runs": runs}))
    return folder


def test_runs_compared_by_seed(tmp_path):
    a = fake_run(tmp_path / "cos", "cosine", [91.5, 91.7, 91.6], 0.1)
    b = fake_run(tmp_path / "const", "constant", [91.0, 91.6, 91.2], 0.4)
    table = runs_markdown(a, b)
    d = np.array([91.0, 91.6, 91.2]) - np.array([91.5, 91.7, 91.6])
    half = st.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert "lr_schedule: cosine → constant" in table and "threads" not in table
    row = next(line for line in table.splitlines() if line.startswith("| Student (vanilla)"))
    assert f"{d.mean():+.2f} ({d.mean() - half:+.2f} to {d.mean() + half:+.2f}" in row
    assert "91.60 ± 0.10" in row and "| 0.10 / 0.40 |" in row


def test_readme_block_replaced_and_missing_block_named(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- schedule:start -->\nold\n<!-- schedule:end -->\nb\n")
    update_readme(readme, "new", "schedule")
    assert readme.read_text() == "a\n<!-- schedule:start -->\nnew\n<!-- schedule:end -->\nb\n"
    with pytest.raises(SystemExit, match="no <!-- tuning:start -->"):
        update_readme(readme, "x", "tuning")
    # as the error says: the two marker lines added with nothing between them yet
    readme.write_text("a\n<!-- book:start -->\n<!-- book:end -->\nb\n")
    update_readme(readme, "table\nlines", "book")
    update_readme(readme, "again", "book")
    assert readme.read_text() == "a\n<!-- book:start -->\nagain\n<!-- book:end -->\nb\n"


def test_cli_vs(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "cosine", [90.0, 91.0], 0.0)
    b = fake_run(tmp_path / "b", "cosine", [90.5, 91.5], 0.0)
    main([str(a), "--vs", str(b)])
    assert "no parameter" in capsys.readouterr().out


def test_runs_table_one_row_per_run(tmp_path):
    a = fake_run(tmp_path / "beta100", "cosine", [91.0], 0.0)
    b = fake_run(tmp_path / "beta10", "cosine", [91.4], 0.0)
    p = yaml.safe_load((b / "params.yaml").read_text())
    (b / "params.yaml").write_text(yaml.safe_dump(dict(p, beta=10.0)))
    table = runs_table([a, b]).splitlines()
    assert table[2] == "| `beta100` | — | Student (vanilla) | 0 | test | 91.00 |"
    assert table[3] == "| `beta10` | beta: 100.0 → 10.0 | Student (vanilla) | 0 | test | 91.40 |"
