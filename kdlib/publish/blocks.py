"""Every generated block of the README and the site's pages, from the committed records.

``python -m kdlib blocks`` (``make blocks``) regenerates them all: the README's answers
table, and the tables of ``docs/results.md``, each between its ``NAME:start`` and
``NAME:end`` marker lines, the teacher-quality sweep's block (``kdlib.analysis.teacher_quality``) in both, and the
tuned comparison's block, each method at its best (``kdlib.analysis.tune_results.block``).
The answers table has one row per question (a run, or a
setting of a sweep): the best student, CAMKD − vanilla and KD (vanilla) − scratch over
paired seeds with 95% intervals, and a link to the record. The Speed table is written by
the benchmark when it measures (``python -m kdlib bench ... --readme docs/speed.md``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd
import yaml

from ..analysis.cells import BR, MARGIN, cell, markdown_table, read
from ..analysis.plots import save
from ..analysis.stats import mean_ci, pair
from ..analysis.sweep_results import run_markdown, setting_label
from ..analysis.teacher_quality import markdown as quality_markdown, summary as quality_summary
from ..analysis.tune_results import (EARLIER, FIDELITY_STUDIES, STUDIES, block as best_block, plot_answer,
                                     pruner_markdown, study_stage, superseded_markdown, test_differences)
from ..book.params import SPLIT_SIZES
from ..records.files import update_readme
from ..records.names import format_value, method_words
from ..records.paths import PACKAGE_ROOT
from .pages import results_markdown, runs_markdown, runs_table

ROOT = PACKAGE_ROOT
REFERENCE = "outputs/fashionmnist-timed"  # the run `make book` reproduces: params/fashionmnist.yaml, shipped teachers
SWEEPS = ["outputs/regimes"]  # the sweeps whose settings are questions
QUALITY = "outputs/teacher-quality"  # the sweep over teacher quality (``kdlib.analysis.teacher_quality``)
ANSWER_FIGURE = "docs/answer.png"  # the answer's picture (``tune_results.plot_answer``), written with the blocks


def _interval(mean: float, low: float, high: float) -> str:
    return cell(mean, low, high, nbsp=True, sep=BR)


def _label(name: str) -> str:
    """A run folder's or setting's name as it wraps in a table cell: 'beta=10, alpha=0.5'."""
    return name.replace(",", ", ")


def _data(P: dict) -> str:
    """What the students learned from, in a few words: images, labels, epochs, and what else
    sets the regime apart (augmentation, CAMKD's published form)."""
    train = P.get("train_subset") or SPLIT_SIZES[P.get("dataset", "FashionMNIST")][0]
    words = [f"{train:,} images"]
    if P.get("labelled_subset"):
        words.append(f"{P['labelled_subset']:,} labelled")
    words.append(f"{P.get('student_epochs', 15)} epochs")
    if P.get("augment", "none") != "none":
        words.append(f"augment {P['augment']}")
    if P.get("camkd_form", "kdbook") != "kdbook":
        words.append(f"CAMKD {P['camkd_form']} (alpha {P.get('alpha')}, beta {P.get('beta')})")
    return ", ".join(words)


def _teachers(run: Path) -> str:
    path = run / "teachers.json"
    if not path.is_file():
        return "—"
    return " / ".join(f"{t['test_acc']:.1f}" for t in json.loads(path.read_text())["teachers"])


def _best(accuracy: dict) -> str:
    """'vanilla 89.57 (89.16 to 89.98)' for {method: (mean, low, high)}."""
    best = max(accuracy, key=lambda m: accuracy[m][0])
    return f"{method_words(best)} " + _interval(*accuracy[best])


def run_answer(run: Path) -> dict:
    """The answer row of one run folder, from its results.csv and comparison.csv."""
    results = pd.read_csv(run / "results.csv")
    try:
        comparison = pd.read_csv(run / "comparison.csv")
    except pd.errors.EmptyDataError:
        comparison = pd.DataFrame()
    students = results[results["role"] == "student"]
    accuracy = {}
    for name, group in students.groupby("name", sort=False):
        ci = mean_ci(group["test_acc"])
        accuracy[name] = (ci["mean"], ci["ci_low"], ci["ci_high"])
    P = yaml.safe_load((run / "params.yaml").read_text())
    question = "the book (`make book`)" if run.name == Path(REFERENCE).name else _label(run.name)
    return {"question": question, "data": _data(P), "teachers %": _teachers(run),
            "seeds": int(students.groupby("name")["seed"].count().max()), "best student %": _best(accuracy),
            "CAMKD − vanilla": pair(comparison, "camkd", "vanilla"),
            "KD − scratch": pair(comparison, "vanilla", "scratch"), "record": run}


def _same(a, b) -> bool:
    if isinstance(a, list):
        a = format_value(a)
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def sweep_answers(sweep: Path) -> list[dict]:
    """One answer row per setting of a sweep (runs that split a setting's seeds or methods
    pool into one row, named as its run folders are), from sweep_summary.csv and
    sweep_differences.csv."""
    summary = pd.read_csv(sweep / "sweep_summary.csv")
    diffs = pd.read_csv(sweep / "sweep_differences.csv")
    keys = [k for k in summary.columns[:list(summary.columns).index("method")] if k != "setting"]
    rows = {}
    for run in yaml.safe_load((sweep / "sweep.yaml").read_text())["runs"]:
        label = setting_label(run["name"])
        folder = sweep / run["name"]
        if label in rows or not (folder / "params.yaml").is_file():
            continue
        P = yaml.safe_load((folder / "params.yaml").read_text())

        def mine(frame):
            mask = pd.Series(True, index=frame.index)
            for k in keys:
                mask &= frame[k].map(lambda v, k=k: _same(P.get(k), v))
            return frame[mask]

        own, pairs = mine(summary), mine(diffs)
        acc = own[own["metric"] == "accuracy"]
        if acc.empty:
            continue
        accuracy = {r["method"]: (r["mean"], r["ci_low"], r["ci_high"]) for _, r in acc.iterrows()}
        rows[label] = {"question": _label(label), "data": _data(P), "teachers %": _teachers(folder),
                       "seeds": int(acc["n"].max()), "best student %": _best(accuracy),
                       "CAMKD − vanilla": pair(pairs, "camkd", "vanilla"),
                       "KD − scratch": pair(pairs, "vanilla", "scratch"), "record": folder,
                       "verdicts": list(pairs["verdict"]) if "verdict" in pairs else []}
    return list(rows.values())


def answers(root: Path = ROOT) -> list[dict]:
    rows = [run_answer(root / REFERENCE)] if (root / REFERENCE / "results.csv").is_file() else []
    for sweep in SWEEPS:
        if (root / sweep / "sweep_summary.csv").is_file():
            rows += sweep_answers(root / sweep)
    return rows


def answers_markdown(rows: list[dict], link: Callable[[Path], str], root: Path = ROOT) -> str:
    """The answers as a markdown table; ``link`` turns a record folder into the link target."""
    columns = ("CAMKD − vanilla", "KD − scratch")
    found = [(i, c, r[c]) for i, r in enumerate(rows) for c in columns if r[c] is not None]
    family = read(pd.DataFrame([p for _, _, p in found], columns=["mean_diff", "ci_low", "ci_high", "p_value",
                                                                   "seeds"]))
    cells = {(i, c): cell(p["mean_diff"], p["ci_low"], p["ci_high"], h, p["seeds"], signed=True, nbsp=True, sep=BR)
             + (f"<br>*{w}*" if isinstance(w, str) else "")
             for (i, c, p), w, h in zip(found, family["word"], family["p_holm"])}
    lines = [markdown_table(["question (its record)", "students learned from", "teachers %", "seeds",
                             "best student, accuracy %", *columns],
                            [[f"[{r['question']}]({link(r['record'])})", r["data"], r["teachers %"], r["seeds"],
                              r["best student %"], *(cells.get((i, c), "—") for c in columns)]
                             for i, r in enumerate(rows)])]
    lines += ["", "Test accuracy at the final epoch; mean (95% CI) over seeds; differences paired by seed, "
                  f"\\* where Holm's adjusted p < 0.05 over the table's {len(found)} differences (paired t), each "
                  f"read as ahead, behind, level (inside ±{MARGIN:g} points) or undecided; KD is vanilla multi-teacher "
                  "KD; teachers' test accuracy as trained for that question; the first row is the run `make book` "
                  "reproduces, with the shipped teachers. Generated by `python -m kdlib blocks` from the records' "
                  "CSV files."]
    return "\n".join(lines)


def record_dir(folder: Path, root: Path = ROOT) -> str:
    """Where a record folder's files are on the site, relative to a top-level page (ends in /)."""
    return "records/" + "/".join(folder.relative_to(root / "outputs").parts) + "/"


def record_page(folder: Path, root: Path = ROOT) -> str:
    """Where a record folder's page is on the site, relative to a top-level page."""
    return record_dir(folder, root) + "index.md"


def blocks(root: Path = ROOT) -> list[tuple[str, str, Callable[[], str]]]:
    """(file, block name, markdown) of every generated block, files relative to ``root``."""

    out = root / "outputs"
    rows = answers(root)
    readme_link = lambda f: f.relative_to(root).as_posix() + "/"  # noqa: E731 (the folder on the repository)
    studies = [root / s for s in STUDIES]
    earlier = {root / k: root / v for k, v in EARLIER.items()}
    best = [("README.md", "best", lambda: best_block(studies, lambda f: f.relative_to(root).as_posix() + "/",
                                                     answer_figure=ANSWER_FIGURE, earlier=earlier)),
            ("docs/index.md", "best", lambda: best_block(studies, lambda f: record_page(f, root),
                                                         answer_figure=Path(ANSWER_FIGURE).name, earlier=earlier)),
            ("docs/results.md", "best", lambda: best_block(
                studies, lambda f: record_page(f, root), answer_figure=Path(ANSWER_FIGURE).name, earlier=earlier,
                figure=lambda f: record_dir(f, root) + "tune_forest.png"))]
    quality = [(file, "teachers", lambda: quality_markdown(root / QUALITY)) for file in ("docs/index.md", "docs/results.md")
               if (root / QUALITY / "sweep.yaml").is_file()]
    quality += [("README.md", "teachers", lambda: quality_summary(root / QUALITY, "docs/results.md"))] \
        if (root / QUALITY / "sweep.yaml").is_file() else []
    return [
        *best,
        *quality,
        ("README.md", "answers", lambda: answers_markdown(rows, readme_link, root)),
        ("docs/index.md", "answers", lambda: answers_markdown(rows, lambda f: record_page(f, root), root)),
        ("docs/results.md", "answers", lambda: answers_markdown(rows, lambda f: record_page(f, root), root)),
        ("docs/results.md", "results", lambda: results_markdown(out / "fashionmnist")),
        ("docs/results.md", "book", lambda: runs_markdown(out / "fashionmnist", out / "fashionmnist-timed")),
        ("docs/results.md", "tuning", lambda: runs_table([out / n for n in ("tune-beta100", "tune-beta33.3",
                                                                              "tune-beta10", "tune-scratch")])),
        ("docs/results.md", "tuned", lambda: runs_markdown(out / "fashionmnist", out / "fashionmnist-camkd-beta10")),
        ("docs/results.md", "schedule", lambda: runs_markdown(out / "fashionmnist", out / "fashionmnist-constant")),
        ("docs/results.md", "regimes", lambda: run_markdown(out / "regimes")),
        ("docs/tuning.md", "pruner", lambda: pruner_markdown([root / s for s in FIDELITY_STUDIES])),
        ("docs/tuning.md", "superseded", lambda: superseded_markdown(root)),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlib blocks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="the project root (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="only say which blocks differ from the records; exit 1 if any")
    args = parser.parse_args(argv)
    root = Path(args.root)
    stale = []
    with tempfile.TemporaryDirectory() as tmp:
        for file, name, make in blocks(root):
            path = root / file
            if args.check:  # on a copy: the page itself is left as it is
                path = Path(shutil.copy(path, Path(tmp) / path.name))
            before = path.read_text()
            update_readme(path, make(), name)
            if args.check and path.read_text() != before:
                stale.append(f"{file}: {name}")
            elif not args.check:
                print(f"{file}: {name}")
    if not args.check:
        figure = answer_figure(root)
        if figure:
            print(f"{ANSWER_FIGURE}: the answer's picture")
    if stale:
        raise SystemExit("out of date: " + "; ".join(stale))


def answer_figure(root: Path = ROOT) -> Path | None:
    """``docs/answer.png``: the answer's picture, from the studies the README's answer reads (each
    headline study, or the one standing in for it until its test has finished); None without any."""
    frames = []
    for study in STUDIES:
        found, _ = study_stage(root / study, None)
        if found is None and study in EARLIER:
            found, _ = study_stage(root / EARLIER[study], None)
        if found is not None:
            frames.append(found[2])
    if not frames:
        return None
    path = root / ANSWER_FIGURE
    save(plot_answer(test_differences(pd.concat(frames, ignore_index=True))), path)
    return path


if __name__ == "__main__":
    main()
