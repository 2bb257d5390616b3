"""``python -m kdlib report --vs``: two runs' students compared seed by seed."""
import json

import numpy as np
import pytest
import yaml
from scipy import stats as st

from kdlib.records.files import update_readme, write_atomic
from kdlib.publish.pages import main, runs_markdown, runs_table


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


def test_write_atomic_replaces_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "deep" / "trials.csv"
    write_atomic(path, "a,b\n1,2\n")
    write_atomic(path, "a,b\n3,4\n")
    assert path.read_text() == "a,b\n3,4\n"
    # a write that fails half-way (text that cannot be encoded) leaves the old file whole and no temporary
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, "a,b\n5," + "\ud800" * 100_000)
    assert path.read_text() == "a,b\n3,4\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["trials.csv"]


def test_a_reader_polling_a_file_written_atomically_sees_only_whole_files(tmp_path):
    """What a watcher of ``trials.csv`` (a test, a notebook, a commit loop) sees while the
    tuning rewrites it: the old text or the new one, never an empty or half-written file
    (plain ``write_text`` here shows half-written files within a few hundred reads)."""
    import threading
    path = tmp_path / "trials.csv"
    texts = ["a,b\n" + "1,2\n" * 200_000, "a,b\n" + "3,4\n" * 250_000]
    write_atomic(path, texts[0])
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            write_atomic(path, texts[i % 2])

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = [path.read_text() for _ in range(300)]
    finally:
        stop.set()
        thread.join()
    assert all(text in texts for text in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials.csv"]


def test_runs_table_one_row_per_run(tmp_path):
    a = fake_run(tmp_path / "beta100", "cosine", [91.0], 0.0)
    b = fake_run(tmp_path / "beta10", "cosine", [91.4], 0.0)
    p = yaml.safe_load((b / "params.yaml").read_text())
    (b / "params.yaml").write_text(yaml.safe_dump(dict(p, beta=10.0)))
    table = runs_table([a, b]).splitlines()
    assert table[2] == "| `beta100` | — | Student (vanilla) | 0 | test | 91.00 |"
    assert table[3] == "| `beta10` | beta: 100.0 → 10.0 | Student (vanilla) | 0 | test | 91.40 |"


def with_teachers(folder, accs, commit, history_shift=0.0):
    """Give a fake run a teachers.json (one history per teacher) and a manifest commit."""
    teachers = [{"name": f"teacher_{i}", "test_acc": acc,
                 "history": [{"epoch": 1, "test_acc": acc - 1 + history_shift}, {"epoch": 2, "test_acc": acc}]}
                for i, acc in enumerate(accs)]
    (folder / "teachers.json").write_text(json.dumps({"dataset": "FashionMNIST", "teachers": teachers}))
    (folder / "manifest.json").write_text(json.dumps({"git": {"commit": commit}}))
    return folder


def test_comparison_says_when_the_teachers_or_code_differ(tmp_path):
    a = with_teachers(fake_run(tmp_path / "ref", "cosine", [91.2, 91.1], 0.0), [93.11, 92.10], "a80bfa1237")
    same = with_teachers(fake_run(tmp_path / "same", "cosine", [91.0, 91.0], 0.0), [93.11, 92.10], "a80bfa1237")
    header = runs_markdown(a, same).splitlines()[0]
    assert header.startswith("`ref` → `same` (no parameter); test accuracy")
    assert "different teachers" not in runs_markdown(a, same)

    # the shipped teachers of the same settings: other checkpoints, other accuracies, newer code
    other = with_teachers(fake_run(tmp_path / "other", "cosine", [90.9, 90.8], 0.0), [93.06, 91.95], "0cd3d7a300")
    table = runs_markdown(a, other)
    assert ("(no parameter; other teachers: teacher_0 93.11 → 93.06, teacher_1 92.10 → 91.95 % test accuracy "
            "(other checkpoints); code `a80bfa1` → `0cd3d7a`)") in table
    assert "**The two runs learned from different teachers**" in table and "what the code changed" in table

    # equal final accuracies but another training history: still other teachers, and no code change
    retrained = with_teachers(fake_run(tmp_path / "retrained", "cosine", [91.0, 91.0], 0.0), [93.11, 92.10],
                              "a80bfa1237", history_shift=0.3)
    table = runs_markdown(a, retrained)
    assert "other teachers: teacher_0 93.11 → 93.11" in table and "code `" not in table
    assert "is the teachers' (and run-to-run noise)" in table
    assert "other teachers" in runs_table([a, same, retrained]).splitlines()[-1]
    assert "other teachers" not in runs_table([a, same]).splitlines()[-1]
