"""What a sweep over teacher quality found: one column per setting, read from its records.

The settings of such a sweep differ in how good the teachers are (``teacher_label_noise``,
``teacher_class_swap``) and in the student (``student_width``). The block it writes
(``python -m kdlib report outputs/teacher-quality --quality``, and ``python -m kdlib blocks``) holds:

* test accuracy per method and setting, mean (95% CI over seeds);
* the paired differences the question turns on: CAMKD − vanilla (and CAMKD's variants −
  vanilla), vanilla − scratch, and the best method that uses teachers − label smoothing
  (the control for softer targets without teachers);
* where each weighting method puts its weight: on a degraded teacher, its mean weight on
  the training images it gets wrong against those it gets right (``teacher_weights`` in
  the metrics files); with no degraded teacher, each teacher's mean weight;
* a plain reading generated from those numbers.

Runs that have not finished are left out and counted; a cell over fewer seeds than the
sweep runs says how many.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from . import cells as reading_
from .cells import BR, NBSP, markdown_table
from .stats import pair
from ..records.names import TEACHERLESS, describe, method_rank, method_words
from .sweep_results import (KEYS, SweepResults, column_order, degraded, differences,  # noqa: F401
                             load, setting_table, short_name)  # (KEYS, column_order: quality's names too)



def _cell(mean: float, low: float, high: float, n: int, full: int) -> str:
    """'91.11<br>(90.72 to 91.51)': the mean, and its interval on a line of its own, so that five
    settings side by side fit a page; '[2 seeds]' where fewer seeds than the sweep runs."""
    text = reading_.cell(mean, low, high, nbsp=True, sep=BR)
    if n < full:
        text += BR + f"[{n} seed{'s' if n != 1 else ''}]".replace(" ", NBSP)
    return text


class Settings:
    """The finished runs of a sweep, setting by setting, with what the block needs of each."""

    def __init__(self, sweep_dir: str | Path):
        self.dir = Path(sweep_dir)
        self.res: SweepResults = load(self.dir)
        order = yaml.safe_load((self.dir / "sweep.yaml").read_text())["runs"]
        self.total_runs = len(order)
        self.finished_runs = self.res.frame["run"].nunique()
        self.full = len({seed for r in order for seed in r["overrides"].get("seeds", [])}) or 1  # seeds per setting
        self.table = setting_table(self.res)
        self.diffs = differences(self.res)
        self.columns: list[tuple] = []  # setting tuples (values of res.keys), sorted below
        self.params: dict[tuple, dict] = {}
        self.folder: dict[tuple, Path] = {}
        for run in dict.fromkeys(self.res.frame["run"]):
            first = self.res.frame[self.res.frame["run"] == run].iloc[0]
            key = tuple(first[k] for k in self.res.keys)
            if key not in self.params:
                self.columns.append(key)
                self.params[key] = yaml.safe_load((self.dir / run / "params.yaml").read_text())
                self.folder[key] = self.dir / run
        self.columns.sort(key=lambda c: column_order(self.params[c]))

    def own(self, frame: pd.DataFrame, setting: tuple) -> pd.DataFrame:
        """The rows of ``frame`` (with a column per key of ``res.keys``) that belong to ``setting``."""
        if frame.empty:
            return frame
        mask = np.ones(len(frame), bool)
        for k, v in zip(self.res.keys, setting):
            mask &= (frame[k] == v).to_numpy()
        return frame[mask]

    def methods(self) -> list[str]:
        return sorted(dict.fromkeys(self.res.frame["method"]), key=method_rank)

    def accuracy(self, setting: tuple) -> dict[str, dict]:
        own = self.own(self.table, setting)
        own = own[own["metric"] == "accuracy"]
        return {r["method"]: r for _, r in own.iterrows()}

    def pair(self, setting: tuple, a: str, b: str) -> dict | None:
        """a − b over the seeds both ran (mean_diff, ci_low, ci_high, p_value, seeds), or None."""
        return pair(self.own(self.diffs, setting), a, b)

    def family(self) -> dict:
        """Every paired difference the block reads, {(setting, a, b): pair with its ``word`` and
        ``p_holm``}, Holm's adjustment over all of them (``kdlib.analysis.cells``): in every setting each method
        with teachers against scratch and against label smoothing, CAMKD's forms against vanilla, and
        label smoothing against scratch."""
        if getattr(self, "_family", None) is None:
            keys = []
            for c in self.columns:
                ran = self.methods()
                kd = [m for m in ran if m.split("[")[0] not in TEACHERLESS]
                keys += [(c, m, ref) for ref in TEACHERLESS if ref in ran for m in kd]
                keys += [(c, m, "vanilla") for m in ran if m.startswith("camkd") and "vanilla" in ran]
                keys += [(c, "label_smoothing", "scratch")] if {"label_smoothing", "scratch"} <= set(ran) else []
            found = [(k, p) for k in keys if (p := self.pair(*k)) is not None and p.get("seeds")]
            frame = reading_.read(pd.DataFrame([p for _, p in found], columns=["mean_diff", "ci_low", "ci_high",
                                                                                "p_value", "seeds"]))
            self._family = {k: {**p, "word": w, "p_holm": h}
                            for (k, p), w, h in zip(found, frame["word"], frame["p_holm"])}
        return self._family

    def read_pair(self, setting: tuple, a: str, b: str) -> dict | None:
        """a − b with its word and Holm's p from ``family``; None where the block does not read it."""
        return self.family().get((setting, a, b))

    def best_kd(self, setting: tuple) -> str | None:
        """The method that uses teachers with the highest mean test accuracy in ``setting``."""
        acc = {m: r["mean"] for m, r in self.accuracy(setting).items() if m.split("[")[0] not in TEACHERLESS}
        return max(acc, key=acc.get) if acc else None

    def teachers(self, setting: tuple) -> list[dict]:
        path = self.folder[setting] / "teachers.json"
        return json.loads(path.read_text())["teachers"] if path.is_file() else []

    def student_params(self, setting: tuple) -> int | None:
        for path in sorted(self.folder[setting].glob("metrics_*.json")):
            return json.loads(path.read_text()).get("student_params")
        return None

    def weights(self, setting: tuple, method: str) -> dict | None:
        """Per teacher, over the seeds that recorded them: mean weight, and mean weight where
        the teacher is wrong and where it is right, and its share wrong (%)."""
        runs = [r["teacher_weights"] for r in self.res.settings[setting]["metrics"].get(method, {}).get("runs", [])
                if r.get("teacher_weights")]
        if not runs:
            return None
        names = self.params[setting]["teachers"]

        def avg(key, i):
            values = [r[key][i] for r in runs if r[key][i] is not None]
            return float(np.mean(values)) if values else math.nan

        return {t: {k: avg(k, i) for k in ("mean", "wrong", "right", "wrong_share")} | {"seeds": len(runs)}
                for i, t in enumerate(names)}


def _diff(p: dict | None, full: int) -> str:
    """A read paired difference (``Settings.read_pair``): its cell, the interval on a line of its own, \\*
    by Holm's p; its word; '[n seeds]' where fewer seeds than the sweep runs."""
    if p is None or not p.get("seeds"):
        return "—"
    text = reading_.cell(p["mean_diff"], p["ci_low"], p["ci_high"], p["p_holm"], int(p["seeds"]), signed=True,
                         nbsp=True, sep=BR)
    if isinstance(p.get("word"), str):
        text += BR + f"*{p['word']}*"
    n = int(p["seeds"])
    return text + (BR + f"[{n} seed{'s' if n != 1 else ''}]".replace(" ", NBSP) if n < full else "")


def tables(s: Settings) -> list[str]:
    """The block's three tables as markdown lines."""
    heads = [short_name(s.params[c]) for c in s.columns]
    accuracy = []
    for method in s.methods():
        cells = []
        for c in s.columns:
            r = s.accuracy(c).get(method)
            cells.append("—" if r is None else _cell(r["mean"], r["ci_low"], r["ci_high"], int(r["n"]), s.full))
        accuracy.append([method_words(method), *cells])
    differences_ = []
    variants = [m for m in s.methods() if m.startswith("camkd")]
    for a, b in [(m, "vanilla") for m in variants] + [("vanilla", "scratch"), ("label_smoothing", "scratch")]:
        if a not in s.methods() or b not in s.methods():
            continue
        differences_.append([f"{method_words(a)} − {method_words(b)}",
                             *(_diff(s.read_pair(c, a, b), s.full) for c in s.columns)])
    best = [s.best_kd(c) for c in s.columns]
    differences_.append(["best with teachers − label smoothing",
                         *(f"{method_words(m)}:{BR}{_diff(s.read_pair(c, m, 'label_smoothing'), s.full)}"
                           if m and s.read_pair(c, m, "label_smoothing") else "—" for c, m in zip(s.columns, best))])
    lines = [markdown_table(["test accuracy %", *heads], accuracy), "",
             markdown_table(["paired difference, points", *heads], differences_)]
    weighted = [m for m in s.methods() if any(s.weights(c, m) for c in s.columns)]
    if weighted:
        rows = []
        for method in weighted:
            cells = []
            for c in s.columns:
                w = s.weights(c, method)
                bad = degraded(s.params[c])
                if w is None:
                    cells.append("—")
                elif bad:
                    cells.append(BR.join((f"{t.removeprefix('teacher_')}: " if len(bad) > 1 else "")
                                         + f"{w[t]['wrong']:.3f} wrong{BR}{w[t]['right']:.3f} right" for t in bad))
                else:
                    cells.append(" / ".join(f"{w[t]['mean']:.2f}" for t in w))
            rows.append([method_words(method), *cells])
        lines += ["", markdown_table(["teacher weights", *heads], rows)]
    return lines


def reading(s: Settings) -> list[str]:
    """Plain sentences generated from the numbers: where CAMKD (and its variants) beat
    vanilla, whether the weight on a degraded teacher falls where it is wrong, whether any
    method with teachers beats label smoothing."""
    def where(a, b) -> str:
        return reading_.by_setting((short_name(s.params[c]), p["word"]) for c in s.columns
                                   if (p := s.read_pair(c, a, b)) is not None)

    lines = []
    for m in [m for m in s.methods() if m.startswith("camkd")]:
        if "vanilla" in s.methods():
            lines.append(f"- **{method_words(m)} against vanilla**: {where(m, 'vanilla')}.")
    if "vanilla" in s.methods() and "scratch" in s.methods():
        lines.append(f"- **Vanilla KD against the student alone**: {where('vanilla', 'scratch')}.")
    for ref, name in (("scratch", "the student alone"), ("label_smoothing", "label smoothing")):
        if ref not in s.methods():
            continue
        words = [p["word"] for (c, m, r), p in s.family().items() if r == ref and m.split("[")[0] not in TEACHERLESS]
        lines.append(f"- **A method with teachers against {name}**: of {len(words)} method-and-setting pairs, "
                     f"{reading_.count_words(words)}.")
    for c in s.columns:
        bad = degraded(s.params[c])
        if not bad:
            continue
        t = bad[0]
        # CAMKD's logit weights do not depend on the student: any of its variants that ran tells them
        w = next((s.weights(c, m) for m in s.methods() if m.startswith("camkd") and s.weights(c, m)), None)
        if w:
            others = ", ".join(f"{w[o]['mean']:.2f}" for o in w if o != t)
            seeds = f"{w[t]['seeds']} seed{'s' if w[t]['seeds'] != 1 else ''}"
            lines.append(f"- **{short_name(s.params[c])}**: CAMKD's weight on {t} is {w[t]['wrong']:.3f} on the "
                         f"{w[t]['wrong_share']:.1f} % of training images it gets wrong and {w[t]['right']:.3f} on "
                         f"those it gets right (the other teachers: {others} on average; {seeds}).")
        # the other weighting methods, each with its own weights: where do they put the degraded teacher?
        for m in s.methods():
            v = None if m.startswith("camkd") else s.weights(c, m)
            if v is None or math.isnan(v[t]["wrong"]) or math.isnan(v[t]["right"]):
                continue
            wrong, right = v[t]["wrong"], v[t]["right"]
            how = (f"the same where it is wrong and where it is right ({wrong:.3f})" if abs(wrong - right) < 0.0005
                   else f"{'higher' if wrong > right else 'lower'} where it is wrong ({wrong:.3f}) than where it is "
                        f"right ({right:.3f})")
            lines.append(f"- **{short_name(s.params[c])}**: {method_words(m)}'s weight on {t} is {how}.")
    return lines


def repeats(s: Settings) -> str:
    """How far a student that never sees a teacher moves between settings that share its
    width, seed by seed: none at all when runs are deterministic (the settings differ only
    in teachers it ignores). '' when no such pair exists."""
    by = {}
    for c in s.columns:
        own = s.own(s.res.frame, c)
        for m in TEACHERLESS:
            rows = own[own["method"] == m]
            width = float(s.params[c].get("student_width", 1.0))
            by.setdefault((m, width), []).append(dict(zip(rows["seed"], rows["accuracy"])))
    gaps = [abs(a[seed] - b[seed]) for runs in by.values() for i, a in enumerate(runs) for b in runs[i + 1:]
            for seed in set(a) & set(b)]
    if not gaps:
        return ""
    if max(gaps) == 0:
        return (f"Scratch and label smoothing never see a teacher: with the same seed and student width they score "
                f"the same to the last digit in every setting ({len(gaps)} pairs of runs), as deterministic runs should. ")
    return (f"Scratch and label smoothing never see a teacher, yet with the same seed and student width they differ "
            f"by up to {max(gaps):.2f} points between settings ({len(gaps)} pairs of runs): the runs are not "
            "deterministic. ")


def parts(sweep_dir: str | Path) -> dict[str, list[str]]:
    """The teacher-quality block in its parts, as markdown lines: ``status`` (what ran, how
    to read the cells), ``legend`` (each setting in words), ``tables``, ``reading`` and
    ``notes``; ``markdown`` joins them in that order, the site's sweep page puts the reading first."""
    s = Settings(sweep_dir)
    legend = []
    for c in s.columns:
        teachers = ", ".join(f"{t['name'].removeprefix('teacher_')} {t['test_acc']:.1f}" for t in s.teachers(c))
        n = s.student_params(c)
        student = f"; student {n:,} parameters" if n else ""
        legend.append(f"- **{short_name(s.params[c])}**: {describe(s.params[c])}; teachers' test accuracy % "
                      f"{teachers}{student}.")
    status = (f"all {s.total_runs} runs finished" if s.finished_runs == s.total_runs else
              f"**{s.finished_runs} of {s.total_runs} runs finished**; the others are left out, and a cell "
              f"over fewer than {s.full} seeds says how many")
    return {"status": [f"Sweep `{s.dir.name}` ({status}); test set, final epoch; mean (95% CI over seeds); "
                       f"differences paired by seed, \\* where Holm's adjusted p < 0.05 over the block's "
                       f"{len(s.family())} differences (paired t); each difference read as ahead, behind, level "
                       f"(its interval inside ±{reading_.MARGIN:g} points) or undecided; — where that method or pair "
                       "has not run."],
            "legend": legend, "tables": tables(s), "reading": reading(s),
            "notes": [
             "Teacher weights are per-image weights over the training images at the end of training, means over "
             "seeds: for a degraded teacher, its mean weight on the images it gets wrong and on those it gets "
             "right; otherwise each teacher's mean weight, in the order of the legend. Each method keeps its own "
             "scale: CAMKD's and AEKD's weights sum to 1 over the teachers, EBKD's to M − 1 (as in the official "
             "code), so equal weights are 1/M and (M − 1)/M. "
             + ("CAMKD's logit weights come from each teacher's cross-entropy on the label alone, so every CAMKD "
                "variant in a setting has the same. " if any(m.startswith("camkd") for m in s.methods()) else "")
             + ("EBKD's weights come from the teachers' entropies alone, so they are the same on every seed. "
                if "ebkd" in s.methods() else "")
             + repeats(s) + "\"Best with teachers\" is picked on the test set, so that difference leans in its favour. "
             f"Generated by `python -m kdlib report outputs/{s.dir.name} --quality`."]}


def markdown(sweep_dir: str | Path) -> str:
    """The teacher-quality block: status, legend, tables, reading, notes."""
    p = parts(sweep_dir)
    return "\n".join([*p["status"], "", *p["legend"], "", *p["tables"], "", *p["reading"], "", *p["notes"]])


def summary(sweep_dir: str | Path, link: str = "") -> str:
    """The block's reading of the differences alone (no tables, no weights), for the README: each
    CAMKD form against vanilla, vanilla against the student alone, and every method with teachers
    against the student alone and against label smoothing; ``link`` points to the whole block."""
    s = Settings(sweep_dir)
    lines = [line for line in reading(s) if line.startswith("- **") and " against " in line.split("**")[1]]
    return "\n".join(lines + ["", f"Differences paired by seed over {s.full} seeds, each read as in the tuned answer "
                                   f"(Holm over the sweep's {len(s.family())} differences)"
                               + (f"; the tables and where each method puts its weight: [{link}]({link})." if link
                                  else ".")])
