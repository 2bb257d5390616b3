"""Paired comparisons of student methods over seeds, and the run's result tables.

* mean and 95% CI over seeds: mean(x) +/- t_{0.975,n-1} sd(x)/sqrt(n).
* paired t: d_s = acc_A(s) - acc_B(s) over seeds s; mean(d) +/- t_{0.975,n-1} sd(d)/sqrt(n);
  p from the two-sided t test, p = 2 F_{n-1}(-|mean(d)| / (sd(d)/sqrt(n))) (what
  ``scipy.stats.ttest_rel`` returns).
* exact McNemar: on per-example correctness pooled over seeds, b = #(A right, B
  wrong), c = #(A wrong, B right); p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from ..records.names import METHOD_ORDER, NAMES, method_rank  # noqa: F401 (the stats' names)
from scipy import special  # t and binomial distributions; scipy.stats would add a second to every kernel's start
from .cells import markdown_table, word

ANCHORS = ("camkd", "scratch")  # the headline compares every method with these two


def paired_t(a, b, confidence: float = 0.95) -> dict:
    """Mean of a - b over pairs, its confidence interval (t distribution) and p-value."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    mean = float(d.mean())
    if n < 2:
        return {"n": n, "mean_diff": mean, "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan}
    sem = d.std(ddof=1) / math.sqrt(n)
    half = special.stdtrit(n - 1, 0.5 + confidence / 2) * sem
    p = float(2 * special.stdtr(n - 1, -abs(mean) / sem)) if sem > 0 else (1.0 if mean == 0 else 0.0)
    return {"n": n, "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half, "p_value": p}


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean of ``values`` and its confidence interval (t distribution; NaN with one value)."""
    x = np.asarray(values, float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"n": len(x), "mean": mean, "ci_low": math.nan, "ci_high": math.nan}
    half = special.stdtrit(len(x) - 1, 0.5 + confidence / 2) * x.std(ddof=1) / math.sqrt(len(x))
    return {"n": len(x), "mean": mean, "ci_low": mean - half, "ci_high": mean + half}


def mcnemar_exact(correct_a, correct_b) -> dict:
    """Exact (binomial) McNemar test on paired boolean correctness vectors."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2 * float(special.bdtr(min(only_a, only_b), n, 0.5)))
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def results_frame(teachers_json: dict, metrics: dict) -> pd.DataFrame:
    """One row per trained model: role, name, seed, test_acc and final fidelity metrics."""
    rows = [{"role": "teacher", "name": t["name"], "seed": None, "test_acc": t["test_acc"],
             "params": t["params"]} for t in teachers_json["teachers"]]
    for method, m in metrics.items():
        for run in m["runs"]:
            fid = run.get("fidelity") or {}
            row = {"role": "student", "name": method, "seed": run["seed"], "test_acc": run["test_acc"],
                   "params": m["student_params"], "centroid_fidelity": fid.get("centroid_fidelity"),
                   "mean_individual_fidelity": fid.get("mean_individual_fidelity"),
                   "centroid_agreement": fid.get("centroid_agreement")}
            for name, kl, agree in zip(m["teachers"], fid.get("individual_fidelity", []),
                                       fid.get("top1_agreement", [])):
                row[f"fidelity[{name}]"] = kl
                row[f"agreement[{name}]"] = agree
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")  # teachers have none
    return frame


def comparison_frame(metrics: dict, predictions: dict) -> pd.DataFrame:
    """One row per pair of methods: paired-t over seeds on test accuracy, and exact
    McNemar on per-example correctness pooled over the seeds both methods ran. Pairs
    follow ``METHOD_ORDER`` (a - b with a listed first: camkd - X, X - scratch),
    whatever order ``metrics`` has."""
    labels = predictions["labels"]
    rows = []
    for a, b in itertools.combinations(sorted(metrics, key=method_rank), 2):
        acc_a = {r["seed"]: r["test_acc"] for r in metrics[a]["runs"]}
        acc_b = {r["seed"]: r["test_acc"] for r in metrics[b]["runs"]}
        seeds = sorted(set(acc_a) & set(acc_b))
        if not seeds:  # nothing to pair: say so rather than compare different seeds
            rows.append({"method_a": a, "method_b": b, "seeds": 0, "n": 0, "mean_diff": math.nan,
                         "ci_low": math.nan, "ci_high": math.nan, "p_value": math.nan, "mcnemar_p": math.nan,
                         "only_a_correct": 0, "only_b_correct": 0})
            continue
        t = paired_t([acc_a[s] for s in seeds], [acc_b[s] for s in seeds])
        right_a = np.concatenate([predictions[f"{a}/seed{s}"] == labels for s in seeds])
        right_b = np.concatenate([predictions[f"{b}/seed{s}"] == labels for s in seeds])
        m = mcnemar_exact(right_a, right_b)
        rows.append({"method_a": a, "method_b": b, "seeds": len(seeds), **t,
                     "mcnemar_p": m["p_value"], "only_a_correct": m["only_a_correct"],
                     "only_b_correct": m["only_b_correct"]})
    return pd.DataFrame(rows)


def anchored_pairs(comparison: pd.DataFrame, anchors=ANCHORS) -> pd.DataFrame:
    """The rows of ``comparison_frame`` that compare a method with one of ``anchors``
    present (every method against camkd and against scratch: 11 of the 21 pairs of
    seven methods), those against scratch first, then camkd's; all rows when no anchor ran."""
    if comparison.empty:
        return comparison
    ran = set(comparison["method_a"]) | set(comparison["method_b"])
    present = [a for a in anchors if a in ran]
    if not present:
        return comparison
    shown = comparison[comparison["method_a"].isin(present) | comparison["method_b"].isin(present)]
    # those against the last anchor first (X - scratch), then those against the first (camkd - X)
    rank = [max(len(present) - 1 - present.index(m) for m in (a, b) if m in present)
            for a, b in zip(shown["method_a"], shown["method_b"])]
    return shown.iloc[np.argsort(rank, kind="stable")]


def verdict(row, alpha: float = 0.05) -> str:
    """One plain sentence for a row of ``comparison_frame``."""
    a, b = NAMES.get(row["method_a"], row["method_a"]), NAMES.get(row["method_b"], row["method_b"])
    if row["seeds"] == 0:
        return f"{a} vs {b}: no seed in common, nothing to compare"
    head = f"{a} vs {b}: {row['mean_diff']:+.2f} points"
    if row["seeds"] < 2:
        return f"{head} (one seed: no confidence interval; McNemar p = {row['mcnemar_p']:.3g})"
    holm = row.get("p_holm") if hasattr(row, "get") else None
    holm = f", Holm p = {holm:.3g}" if holm is not None and not pd.isna(holm) else ""
    return (f"{head} (95% CI {row['ci_low']:+.2f} to {row['ci_high']:+.2f}, paired t p = {row['p_value']:.3g}{holm}, "
            f"McNemar p = {row['mcnemar_p']:.3g}): {word(row['ci_low'], row['ci_high'], row['seeds'])} over "
            f"{row['seeds']} seeds")


def write_tables(run_dir: str | Path, teachers_json: dict, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``results.csv``, ``comparison.csv`` and ``summary.csv`` (too wide for a
    page) into ``run_dir``; return the first two."""
    run_dir = Path(run_dir)
    with np.load(run_dir / "predictions.npz") as npz:
        predictions = dict(npz)
    results = results_frame(teachers_json, metrics)
    comparison = comparison_frame(metrics, predictions)
    results.to_csv(run_dir / "results.csv", index=False)
    comparison.to_csv(run_dir / "comparison.csv", index=False)
    summary = summary_frame(results)
    summary.columns = [f"{column}_{stat}" for column, stat in summary.columns]
    summary.to_csv(run_dir / "summary.csv")
    return results, comparison


def summary_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count of each numeric column per (role, name)."""
    numeric = results.drop(columns=["seed", "params"]).groupby(["role", "name"], sort=False)
    return numeric.agg(["mean", "std", "count"])


def mean_sd(values, digits: int = 2) -> str:
    """``mean ± sd`` (sample sd) of the values that are not NaN; the mean alone for one; 'n/a' for none."""
    s = pd.Series(values, dtype=float).dropna()
    if s.empty:
        return "n/a"
    return f"{s.mean():.{digits}f}" if len(s) == 1 else f"{s.mean():.{digits}f} ± {s.std(ddof=1):.{digits}f}"


ANSWER_COLUMNS = {"test_acc": ("test accuracy %", 2), "centroid_fidelity": ("centroid fidelity KL(C‖S)", 3),
                  "centroid_agreement": ("agreement with the centroid %", 2)}


def method_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per student method: n (seeds) and each of ``ANSWER_COLUMNS`` as mean ± sd."""
    rows = []
    for name, group in results[results["role"] == "student"].groupby("name", sort=False):
        row = {"student": NAMES.get(name, name), "n": len(group)}
        for column, (label, digits) in ANSWER_COLUMNS.items():
            row[label] = mean_sd(group[column] if column in group else [], digits)
        rows.append(row)
    return pd.DataFrame(rows)


def headline(results: pd.DataFrame, comparison: pd.DataFrame) -> str:
    """The answer first, as markdown: the student with the highest mean accuracy, the
    paired verdicts of every method against camkd and scratch (``anchored_pairs``), the
    teachers' accuracy and ``method_table``."""
    students = results[results["role"] == "student"]
    if students.empty:
        return "No student results yet."
    means = students.groupby("name", sort=False)["test_acc"].mean()
    best = means.idxmax()
    lines = [f"**Highest mean test accuracy: {NAMES.get(best, best)}** ({means[best]:.2f} %, "
             f"n = {int((students['name'] == best).sum())}).", ""]
    shown = anchored_pairs(comparison)
    lines += [f"- {verdict(row)}" for _, row in shown.iterrows()]
    if len(shown) < len(comparison):
        lines += [f"- (each method against {' and '.join(NAMES.get(a, a) for a in ANCHORS)}: {len(shown)} of "
                  f"the {len(comparison)} pairs; every pair in `comparison.csv`)"]
    teachers = results[results["role"] == "teacher"]
    if not teachers.empty:
        lines += ["", "Teachers: " + ", ".join(f"{n} {a:.2f} %" for n, a in zip(teachers["name"], teachers["test_acc"]))
                  + "."]
    table = method_table(students)
    lines += ["", markdown_table(table.columns, table.itertuples(index=False))]
    return "\n".join(lines)


def pair(frame: pd.DataFrame, a: str, b: str, cols=("method_a", "method_b")) -> dict | None:
    """a − b from a frame of paired differences (``comparison_frame``, ``sweep_results.differences``):
    its row as it is, or the row of b − a with the difference negated and the interval flipped; None."""
    if frame.empty:
        return None
    hit = frame[(frame[cols[0]] == a) & (frame[cols[1]] == b)]
    if len(hit):
        return dict(hit.iloc[0])
    hit = frame[(frame[cols[0]] == b) & (frame[cols[1]] == a)]
    if not len(hit):
        return None
    r = dict(hit.iloc[0])
    return {**r, cols[0]: a, cols[1]: b, "mean_diff": -r["mean_diff"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"]}
