"""The README's results table, generated from a finished run folder (never typed in).

``python -m kdlib report outputs/fashionmnist [--readme README.md]`` prints the
markdown, and with ``--readme`` replaces the block between the ``results:start``
and ``results:end`` markers. ``--vs outputs/OTHER --block NAME`` instead compares
the students of two runs that differ in some parameters, seed by seed (block
``NAME:start`` ... ``NAME:end``). Given a sweep folder (``python -m kdlib sweep``), it
prints the sweep's table, one row per setting, and its verdicts (block ``sweep``); with
``--quality``, a sweep over teacher quality as ``kdlib.analysis.teacher_quality`` reads it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import yaml

from ..records.files import update_readme
from ..analysis.stats import anchored_pairs, mean_sd as _mean_sd, paired_t, verdict
from ..book.params import SCHEMA
from ..analysis.sweep_results import markdown, run_markdown
from ..analysis.teacher_quality import markdown as quality_markdown

SEED_EXPECTED = {  # the seed kit's README, "Expected results on Fashion-MNIST"
    "teacher_cnn1": "~92.5", "teacher_cnn2": "~93.3", "teacher_resnet": "~92.0",
    "camkd": "~91.5-91.8", "vanilla": "~91.2-91.5", "scratch": "(not given)",
}
LABELS = {"teacher_cnn1": "Teacher CNN1", "teacher_cnn2": "Teacher CNN2", "teacher_resnet": "Teacher ResNet",
          "teacher_vgg": "Teacher VGG", "teacher_densenet": "Teacher DenseNet",
          "camkd": "Student (CAMKD)", "vanilla": "Student (vanilla)", "aver": "Student (AVER)",
          "ebkd": "Student (EBKD)", "aekd": "Student (AEKD)",
          "label_smoothing": "Student (label smoothing, no teachers)", "scratch": "Student (scratch, no teachers)"}


def _acc(values: pd.Series) -> str:
    return _mean_sd(values.tolist()) + (f" (n={len(values)})" if len(values) > 1 else "")


def training_minutes(run_dir: str | Path) -> tuple[float, float]:
    """Minutes of training (epochs, with their evaluation) recorded in a run: (teachers, students).
    Counts every epoch once, even when it ran in an earlier, interrupted attempt."""
    run_dir = Path(run_dir)
    teachers = json.loads((run_dir / "teachers.json").read_text())["teachers"]
    t = sum(h["epoch_seconds"] for r in teachers for h in r["history"])
    s = sum(h["epoch_seconds"] for p in run_dir.glob("metrics_*.json")
            for r in json.loads(p.read_text())["runs"] for h in r["history"])
    return t / 60, s / 60


def results_markdown(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    results = pd.read_csv(run_dir / "results.csv")
    try:
        comparison = pd.read_csv(run_dir / "comparison.csv")
    except pd.errors.EmptyDataError:  # a run with one method has no pairs to compare
        comparison = pd.DataFrame()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    lines = ["| Model | Params | Seed kit's expected test acc % | Measured test acc % | centroid fidelity "
             "KL(C‖S) | top-1 agreement with C % |", "|---|---|---|---|---|---|"]
    for (_role, name), group in results.groupby(["role", "name"], sort=False):
        params = f"{group['params'].iloc[0] / 1e6:.2f}M" if group["params"].iloc[0] > 1e6 \
            else f"{group['params'].iloc[0] / 1e3:.0f}K"
        fid = ("— | —" if _role == "teacher" or "centroid_fidelity" not in group else
               f"{_mean_sd(group['centroid_fidelity'].tolist(), 3)} | {_mean_sd(group['centroid_agreement'].tolist())}")
        lines.append(f"| {LABELS.get(name, name)} | {params} | {SEED_EXPECTED.get(name, '')} | "
                     f"{_acc(group['test_acc'])} | {fid} |")
    lines.append("")
    lines += [f"- {verdict(row)}" for _, row in anchored_pairs(comparison).iterrows()]
    git = manifest.get("git", {})
    dev = manifest.get("device", {})
    teach, stud = training_minutes(run_dir)
    wall = manifest.get("seconds", float("nan")) / 60
    wall = (f"wall time of its last (resumed) attempt {wall:.1f} min" if manifest.get("resumed")
            else f"book wall time {wall:.1f} min")
    lines += ["", f"Run `{run_dir.name}`: status {manifest['status']}, commit `{str(git.get('commit'))[:10]}`"
              f"{' (uncommitted changes)' if git.get('dirty') else ''}, {dev.get('device')} "
              f"({dev.get('processor')}, {dev.get('threads')} threads), {wall}; training time recorded "
              f"epoch by epoch: teachers {teach:.0f} min, students {stud:.0f} min. Teachers' means have no "
              f"spread: one teacher set (teacher_seed), students one run per seed against it."]
    return "\n".join(lines)


def _students(run_dir: Path) -> dict:
    """{method: {seed: (final test_acc, mean |epoch-to-epoch change| of test_acc over the last 3 epochs)}}."""
    out = {}
    for path in sorted(run_dir.glob("metrics_*.json")):
        m = json.loads(path.read_text())
        out[m["method"]] = {}
        for r in m["runs"]:
            acc = [h["test_acc"] for h in r["history"]]
            moves = [abs(acc[i] - acc[i - 1]) for i in range(max(1, len(acc) - 3), len(acc))]
            out[m["method"]][r["seed"]] = (acc[-1], sum(moves) / len(moves) if moves else 0.0)
        out[m["method"]]["eval_split"] = m.get("eval_split", "test")
    return out


def _differing_params(a: Path, b: Path) -> str:
    defaults = {k: spec.default for k, spec in SCHEMA.items()}
    pa, pb = ({**defaults, **(yaml.safe_load((d / "params.yaml").read_text()) or {})} for d in (a, b))
    ignore = {"run_dir", "threads", "methods", "seeds"}
    diff = [f"{k}: {pa.get(k)} → {pb.get(k)}" for k in sorted(set(pa) | set(pb))
            if k not in ignore and pa.get(k) != pb.get(k)]
    return ", ".join(diff)


def _teachers(run_dir: Path) -> list[dict] | None:
    """The run's teachers as recorded in ``teachers.json`` (None when it has none)."""
    path = run_dir / "teachers.json"
    return json.loads(path.read_text())["teachers"] if path.is_file() else None


def _differing_teachers(a: Path, b: Path) -> str:
    """What tells the teachers two runs learned from apart, or "" when they are the
    same trained teachers (same names and the same training history, epoch by epoch;
    a shipped copy of a checkpoint keeps its history, so it counts as the same)."""
    ta, tb = _teachers(a), _teachers(b)
    if ta is None or tb is None:
        return ""
    same = [x["name"] for x in ta] == [x["name"] for x in tb]
    if same and all(x["history"] == y["history"] for x, y in zip(ta, tb)):
        return ""
    accs = ", ".join(f"{x['name']} {x['test_acc']:.2f} → {y['test_acc']:.2f}" for x, y in zip(ta, tb)) if same \
        else f"{', '.join(x['name'] for x in ta)} → {', '.join(x['name'] for x in tb)}"
    return f"other teachers: {accs} % test accuracy (other checkpoints)"


def _commits(a: Path, b: Path) -> str:
    """"code `x` → `y`" when the two runs were made at different commits, else ""."""
    commits = []
    for d in (a, b):
        path = d / "manifest.json"
        commits.append(str(json.loads(path.read_text()).get("git", {}).get("commit") or "?")[:7]
                       if path.is_file() else "?")
    return "" if commits[0] == commits[1] else f"code `{commits[0]}` → `{commits[1]}`"


def runs_markdown(run_a: str | Path, run_b: str | Path) -> str:
    """Students of two runs side by side, paired by seed: final accuracy (mean ± std),
    the paired difference b - a with its 95% t interval, and how much accuracy still
    moved over the last three epochs (mean |change| per epoch). The header names what
    differs between the runs: parameters, teachers (a warning line when they are other
    checkpoints) and the commit each was made at."""
    a, b = Path(run_a), Path(run_b)
    sa, sb = _students(a), _students(b)
    split = sa.get(next(iter(sa), ""), {}).get("eval_split", "test")
    params, teachers, code = _differing_params(a, b), _differing_teachers(a, b), _commits(a, b)
    context = "; ".join(x for x in (params or "no parameter", teachers, code) if x)
    others = " and ".join(x for x, differs in (("the parameters", params), ("the code", code)) if differs)
    caution = (["**The two runs learned from different teachers**: a difference below "
                + (f"mixes what the teachers changed with what {others} changed." if others
                   else "is the teachers' (and run-to-run noise)."), ""] if teachers else [])
    lines = [f"`{a.name}` → `{b.name}` ({context}); {split} accuracy %, final epoch.", "", *caution,
             f"| Student | seeds | `{a.name}` | `{b.name}` | difference (95% CI) | mean \\|Δ acc\\| per epoch, "
             f"last 3 epochs |", "|---|---|---|---|---|---|"]
    for method in [m for m in sa if m in sb]:
        seeds = sorted(k for k in sa[method] if k in sb[method] and k != "eval_split")
        if not seeds:
            continue
        acc_a = [sa[method][k][0] for k in seeds]
        acc_b = [sb[method][k][0] for k in seeds]
        t = paired_t(acc_b, acc_a)
        ci = "" if len(seeds) < 2 else f" ({t['ci_low']:+.2f} to {t['ci_high']:+.2f}, p = {t['p_value']:.2g})"
        move = [sum(s[method][k][1] for k in seeds) / len(seeds) for s in (sa, sb)]
        lines.append(f"| {LABELS.get(method, method)} | {', '.join(map(str, seeds))} | {_mean_sd(acc_a)} | "
                     f"{_mean_sd(acc_b)} | {t['mean_diff']:+.2f}{ci} | {move[0]:.2f} / {move[1]:.2f} |")
    return "\n".join(lines)


def runs_table(runs: list[str | Path]) -> str:
    """One row per run and student method: what differs from the first run, and the
    final accuracy (mean ± std over seeds) on the split the run scored on."""
    runs = [Path(r) for r in runs]
    lines = ["| Run | differs from the first run in | Student | seeds | split | accuracy % |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        diff = "—" if run == runs[0] else ("; ".join(x for x in (_differing_params(runs[0], run),
                                                                  _differing_teachers(runs[0], run)) if x)
                                            or "nothing")
        for method, per_seed in _students(run).items():
            seeds = sorted(k for k in per_seed if k != "eval_split")
            lines.append(f"| `{run.name}` | {diff} | {LABELS.get(method, method)} | {', '.join(map(str, seeds))} | "
                         f"{per_seed['eval_split']} | {_mean_sd([per_seed[k][0] for k in seeds])} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdlib report", description=__doc__)
    parser.add_argument("run_dir", help="a run folder, or a sweep folder (holding sweep.json)")
    parser.add_argument("--readme", help="README file whose results block to replace")
    parser.add_argument("--vs", metavar="OTHER_RUN", help="compare the students of run_dir with this run's")
    parser.add_argument("--runs", nargs="+", metavar="RUN", help="more runs: one table row per run and method")
    parser.add_argument("--by-run", action="store_true",
                        help="a sweep of explicit runs: one table row per setting, named after its runs, "
                             "with the paired differences")
    parser.add_argument("--quality", action="store_true",
                        help="a sweep over teacher quality: one column per setting, the paired differences CAMKD − "
                             "vanilla, vanilla − scratch and best − label smoothing, and where the teacher weights go")
    parser.add_argument("--block", default=None, help="README block name (default: results, or compare with --vs)")
    args = parser.parse_args(argv)
    sweep = (Path(args.run_dir) / "sweep.json").is_file()
    if sweep:
        if args.quality:
            block = quality_markdown(args.run_dir)
        else:
            block = run_markdown(args.run_dir) if args.by_run else markdown(args.run_dir)
    elif args.runs:
        block = runs_table([args.run_dir, *args.runs])
    elif args.vs:
        block = runs_markdown(args.run_dir, args.vs)
    else:
        block = results_markdown(args.run_dir)
    print(block)
    if args.readme:
        update_readme(args.readme, block, args.block or ("sweep" if sweep else "compare" if args.vs or args.runs
                                                         else "results"))


if __name__ == "__main__":
    main()
