"""What a tuning found, read from its folder (``kdlib tune``): the trials, the chosen values,
which knobs mattered, and the test of each method at its best against scratch and label
smoothing, paired by seed.

The trials (``trials.csv``) hold validation accuracy only; the test comparison is read from
the test sweep (``NAME/test``) with ``kdlib.analysis.sweep_results`` like any sweep, each tuned
method's run being a variant of its method (``vanilla[alpha=…,temperature=…]``) that is
named here by its method alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from . import cells as reading_
from .cells import markdown_table
from .stats import pair
from ..records.names import NAMES, describe, method_rank, run_name, short_name
from ..records.paths import PACKAGE_ROOT
from ..records.storage import open_storage, study_name
from .sweep_results import (SweepResults, differences, knob_words, load as load_sweep, runs_frame, setting_table,
                             value_words)
from .plots import method_colors
from ..book.params import ParamsError, load_params
from ..records.extras import require

EDGE = 0.1  # a chosen value in the outer tenth of its searched range sits at its edge

AGAINST = ("scratch", "label_smoothing")  # every method is compared with the students that never see a teacher
# each anchor and the methods compared with it (None: every other method): CAMKD against vanilla is the
# gap the seed's document claims
ANCHORS = {"scratch": None, "label_smoothing": None, "vanilla": ("camkd",)}


@dataclass
class TuneResults:
    dir: Path
    spec: dict                 # tune.yaml
    trials: pd.DataFrame       # trials.csv
    best: dict                 # best.yaml (empty until the search has finished)
    test: SweepResults | None  # the test sweep's finished runs (None before any)

    def settings(self) -> list[str]:
        return list(dict.fromkeys(self.trials["setting"]))

    def words(self, setting: str) -> str:
        """A setting in words ('small student', 'shipped'): best.yaml's, or before it is written the
        same words from the tune file's overrides on its base params; the raw name as a last resort."""
        if setting in self.best:
            return self.best[setting].get("in words", setting)
        base = _base_params(self)
        own = next((o for o in self.spec.get("settings") or [{}] if run_name(o) == setting), None)
        return short_name({**base, **own}) if base and own is not None else setting

    def methods(self) -> list[str]:
        return sorted(self.spec["methods"], key=method_rank)


def load(tune_dir: str | Path) -> TuneResults:
    tune_dir = Path(tune_dir)
    if not (tune_dir / "tune.yaml").is_file() or not (tune_dir / "trials.csv").is_file():
        raise FileNotFoundError(f"{tune_dir}: no tune.yaml and trials.csv; is it a tuning folder "
                                "(python -m kdlib tune ...)?")
    spec = yaml.safe_load((tune_dir / "tune.yaml").read_text())
    trials = pd.read_csv(tune_dir / "trials.csv")
    best = yaml.safe_load((tune_dir / "best.yaml").read_text()) if (tune_dir / "best.yaml").is_file() else {}
    try:
        test = load_sweep(tune_dir / "test")
    except FileNotFoundError:
        test = None
    res = TuneResults(tune_dir, spec, trials, best or {}, test)
    if test is not None and res.best:  # the test's settings named as the tuning names them ('shipped', not
        # 'base'): in its forest plot and in test_frame
        overrides = {r["name"]: r["overrides"]
                     for r in yaml.safe_load((tune_dir / "test" / "sweep.yaml").read_text())["runs"]}
        for _, r in test.frame.drop_duplicates("run").iterrows():
            test.names[tuple(r[k] for k in test.keys)] = res.words(_setting_of(res, overrides[r["run"]]))
    return res


def base_method(label: str) -> str:
    """'vanilla[alpha=0.5,temperature=2]' -> 'vanilla'."""
    return label.split("[")[0]


def counts(res: TuneResults) -> pd.DataFrame:
    """Per setting and tuned method: search trials complete, pruned and failed, the distinct
    points among the complete and pruned ones (fewer when a trial asked values an earlier one
    had), evaluations at fixed values (references and re-scoring), training hours (summed over
    its trials) and wall hours (while one of its trials was running, ``_union_hours``)."""
    rows = []
    for (setting, method), g in res.trials.groupby(["setting", "method"], sort=False):
        search = g[g["kind"] == "search"]
        ended = search[search["state"].isin(["complete", "pruned"])]
        knobs = [k for k in res.spec.get("space", {}).get(method, {}) if k in ended]
        spans = _spans(g)
        rows.append({"setting": res.words(setting), "method": NAMES.get(method, method),
                     "complete": int((search["state"] == "complete").sum()),
                     "pruned": int((search["state"] == "pruned").sum()),
                     "failed": int((search["state"] == "fail").sum()),
                     "distinct points": len(ended.drop_duplicates(knobs)) if knobs else "—",
                     "fixed-value runs": int((g["kind"] != "search").sum()),
                     "epochs trained": int(g["epochs"].fillna(0).sum()),
                     "training hours": round(g["seconds"].fillna(0).sum() / 3600, 2),
                     "wall hours": round(_union_hours(spans), 2) if spans else None})
    return pd.DataFrame(rows)


def _stamp(text) -> pd.Timestamp:
    """A record's time stamp as UTC (trials.csv writes them without a zone, in UTC)."""
    t = pd.Timestamp(text)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _spans(trials: pd.DataFrame) -> list:
    """[(start, end)] of the trials that ran to an end the worker measured: from ``ended`` back by
    the ``seconds`` it ran (``started`` is when Optuna asked for it, which can be long before when
    a worker was restarted; a failed trial's ``ended`` is when a resume marked it failed)."""
    if "ended" not in trials or "seconds" not in trials:
        return []
    ran = trials[trials["seconds"].notna() & trials["ended"].notna()]
    return [(_stamp(end) - pd.Timedelta(seconds=float(sec)), end) for end, sec in zip(ran["ended"], ran["seconds"])]


def _union_hours(spans) -> float:
    """Hours covered by at least one of ``spans`` = [(start, end)] (missing ends skipped): the
    time something ran, without the pauses between a study's starts."""
    spans = sorted((_stamp(a), _stamp(b)) for a, b in spans if pd.notna(a) and pd.notna(b))
    total, reach = 0.0, None
    for a, b in spans:
        if reach is None or a > reach:
            total += (b - a).total_seconds()
            reach = b
        elif b > reach:
            total += (b - reach).total_seconds()
            reach = b
    return total / 3600


def timing(res: TuneResults) -> dict:
    """How long the study took: ``wall hours``, the time during which at least one of its trials,
    evaluations or test runs was running (the pauses between its starts left out), ``training
    hours`` summed over them (two workers side by side count twice), and ``starts``, how many
    times it was started or resumed (``tune.json``)."""
    spans = _spans(res.trials)
    seconds = float(res.trials["seconds"].fillna(0).sum()) if "seconds" in res.trials else 0.0
    for manifest in sorted((res.dir / "test").glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("status") == "finished" and m.get("ended") and m.get("seconds"):  # its last attempt's span
            spans.append((_stamp(m["ended"]) - pd.Timedelta(seconds=float(m["seconds"])), m["ended"]))
            seconds += float(m["seconds"])
    record = json.loads((res.dir / "tune.json").read_text()) if (res.dir / "tune.json").is_file() else {}
    return {"wall hours": _union_hours(spans), "training hours": seconds / 3600,
            "starts": 1 + len(record.get("earlier", [])) if record else None}


def timing_line(res: TuneResults) -> str:
    """'Its time: 2.3 h of wall time while a trial or test run was running, 4.4 h of training summed
    over them, over 5 starts.'"""
    t = timing(res)
    starts = f", over {t['starts']} start{'s' if t['starts'] != 1 else ''}" if t["starts"] else ""
    return (f"Its time: {t['wall hours']:.1f} h of wall time while a trial or test run was running, "
            f"{t['training hours']:.1f} h of training summed over them{starts}.")


def chosen(res: TuneResults) -> pd.DataFrame:
    """One row per setting and method: the chosen values, their validation accuracy (over how
    many seeds), those at the edge of their searched range (``edges``) and how they were chosen
    (``best.yaml``)."""
    rows = []
    for setting, entry in res.best.items():
        for method, c in entry["methods"].items():
            rows.append({"setting": entry["in words"], "method": NAMES.get(method, method),
                         "values": values_text(res, setting, method),
                         "validation accuracy %": round(c["val_acc"], 2), "seeds": c.get("val_seeds"),
                         "at the edge of its range": "; ".join(map(_edge_words, edges(res, setting, method)))
                         or ("—" if c["values"] else ""),
                         "chosen": c["chosen"]})
    return pd.DataFrame(rows)


def importances(res: TuneResults, setting: str, method: str, storage: str | None = None) -> dict[str, float]:
    """How much each knob mattered to the validation accuracy of a search study, by Optuna's
    fANOVA evaluator (seeded) over its complete trials; {} with fewer than two, or when they all
    scored the same; the one knob gets 1 where there is one."""
    require("tune", "reading a tuning's importances")
    import optuna
    complete = res.trials[(res.trials["setting"] == setting) & (res.trials["method"] == method)
                          & (res.trials["kind"] == "search") & (res.trials["state"] == "complete")]
    knobs = list(res.spec["space"].get(method, {}))
    if len(complete) < 2 or not knobs:
        return {}
    if len(knobs) == 1:
        return {knobs[0]: 1.0}
    if complete["val_acc"].nunique() < 2:
        return {}  # every trial scored the same: nothing to attribute (fANOVA finds no variance)
    url = storage or str(res.dir / "study.journal")
    if "://" not in url and not Path(url).is_file():  # its storage is a database this reader is not given
        return {}
    study = optuna.load_study(study_name=study_name(setting, method), storage=open_storage(url))
    return dict(optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))


def _colors(methods) -> dict:
    return method_colors(methods)


def plot_history(res: TuneResults, setting: str) -> Figure:
    """Each tuned method's search: validation accuracy by trial (a dot when complete, a cross
    at the epoch it was stopped when pruned) and the best so far; a dashed line at the
    reference (scratch's mean over seeds)."""
    g = res.trials[(res.trials["setting"] == setting) & (res.trials["kind"] == "search")]
    methods = [m for m in res.methods() if m in set(g["method"])]
    colors = _colors(methods)
    ref = res.trials[(res.trials["setting"] == setting) & (res.trials["kind"] == "reference")]
    fig = Figure(figsize=(7.6, 1.9 * math.ceil(len(methods) / 2) + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(methods) / 2), 2 if len(methods) > 1 else 1,
                                      sharex=True, sharey=True)).ravel()
    for ax, m in zip(axes, methods):
        t = g[g["method"] == m].sort_values("trial")
        done = t[t["state"] == "complete"]
        pruned = t[t["state"] == "pruned"]
        ax.scatter(done["trial"], done["val_acc"], color=colors[m], s=18, label="complete", zorder=3)
        ax.scatter(pruned["trial"], pruned["val_acc"], color=colors[m], marker="x", s=18, alpha=0.6,
                   label="pruned (value when stopped)", zorder=3)
        best = done.set_index("trial")["val_acc"].reindex(t["trial"]).cummax().ffill()
        ax.step(t["trial"], best, where="post", color="0.3", lw=1, label="best so far")
        for r, mean in ref.groupby("method")["val_acc"].mean().items():
            ax.axhline(mean, color=_colors([r])[r], ls="--", lw=0.8, label=f"{NAMES.get(r, r)} (seeds' mean)")
        ax.set_title(NAMES.get(m, m), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    fig.supxlabel("trial", fontsize=9)
    fig.supylabel("validation accuracy %", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=4, fontsize=7, frameon=False)
    return fig


def plot_knob(res: TuneResults, setting: str, knob: str) -> Figure | None:
    """Validation accuracy of every complete search trial against ``knob``, one colour per method
    that searched it (log axis where the knob was searched on one), the searched range's ends
    dotted; None if none did."""
    g = res.trials[(res.trials["setting"] == setting) & (res.trials["kind"] == "search")
                   & (res.trials["state"] == "complete")]
    methods = [m for m in res.methods() if knob in res.spec["space"].get(m, {})]
    if not methods or knob not in g:
        return None
    colors = _colors(methods)
    fig = Figure(figsize=(5.6, 3.0), layout="constrained")
    ax = fig.subplots()
    for m in methods:
        t = g[g["method"] == m]
        ax.scatter(t[knob].astype(float), t["val_acc"], color=colors[m], s=20, label=NAMES.get(m, m))
        pick = res.best.get(setting, {}).get("methods", {}).get(m, {}).get("values", {}).get(knob)
        if pick is not None:
            ax.scatter([float(pick)], [res.best[setting]["methods"][m]["val_acc_trial"]
                                       if "val_acc_trial" in res.best[setting]["methods"][m]
                                       else res.best[setting]["methods"][m]["val_acc"]],
                       s=90, facecolors="none", edgecolors=colors[m], lw=1.5)
    ranges = [s for m in methods if isinstance(s := res.spec["space"][m][knob], dict)]
    if any(s.get("log") for s in ranges):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    for i, bound in enumerate(sorted({float(s[k]) for s in ranges for k in ("low", "high")})):
        ax.axvline(bound, color="0.5", ls=":", lw=1, label="searched range" if i == 0 else None, gid="range")
    ax.set_xlabel(knob)
    ax.set_ylabel("validation accuracy %")
    # the setting on a line of its own: a long one ("small student + swapped resnet") on one line
    # with the rest ran past the figure's left edge, which constrained layout does not widen
    ax.set_title(f"{res.words(setting)}\nvalidation accuracy against {knob} (ringed: chosen)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def test_frame(res: TuneResults) -> pd.DataFrame:
    """The test: per setting and method, test accuracy (mean, 95% CI over seeds) and its paired
    difference against scratch and against label smoothing (mean, 95% CI, p, seeds)."""
    if res.test is None:
        return pd.DataFrame()
    test = res.test
    acc = setting_table(test)
    acc = acc[acc["metric"] == "accuracy"]
    diffs = differences(test)
    rows = []
    for _, r in acc.iterrows():
        key = tuple(r[k] for k in test.keys)
        row = {"setting": test.names[key], "method": base_method(r["method"]), "seeds": int(r["n"]),
               "accuracy": r["mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
        own = diffs
        for k, v in zip(test.keys, key):
            own = own[own[k] == v] if len(own) else own
        for anchor in ANCHORS:
            hit = _pair(own, r["method"], anchor) if _compared(base_method(r["method"]), anchor) else None
            for field in ("mean_diff", "ci_low", "ci_high", "p_value", "seeds"):
                row[f"{field} vs {anchor}"] = hit.get(field, math.nan) if hit else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _compared(method: str, anchor: str) -> bool:
    """Whether the answer reads ``method`` − ``anchor`` (``ANCHORS``)."""
    if method in AGAINST and anchor in AGAINST:  # label smoothing − scratch, not its mirror too
        return AGAINST.index(method) > AGAINST.index(anchor)
    return method != anchor and (ANCHORS[anchor] is None or method in ANCHORS[anchor])


def _seeds_over(counts) -> str:
    """How many seeds a set of rows rests on: '10' for one count, '3 to 10' for several, '' for none."""
    seeds = sorted({int(n) for n in counts if not pd.isna(n)})
    return "" if not seeds else str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]} to {seeds[-1]}"


def test_differences(test: pd.DataFrame) -> pd.DataFrame:
    """The test's paired differences, one a row (setting, method, anchor, mean_diff, ci_low,
    ci_high, p_value, seeds), each with its word and Holm's p over the frame's rows, its family
    (``kdlib.analysis.cells.read``)."""
    rows = []
    for _, r in test.iterrows():
        for anchor in ANCHORS:
            if f"mean_diff vs {anchor}" in r and not pd.isna(r[f"mean_diff vs {anchor}"]):
                rows.append({"setting": r["setting"], "method": r["method"], "anchor": anchor,
                             **{f: r[f"{f} vs {anchor}"] for f in ("mean_diff", "ci_low", "ci_high", "p_value",
                                                                    "seeds")}})
    frame = pd.DataFrame(rows, columns=["setting", "method", "anchor", "mean_diff", "ci_low", "ci_high", "p_value",
                                        "seeds"])
    return reading_.read(frame)


def _pair(diffs: pd.DataFrame, label: str, anchor: str) -> dict | None:
    """``label`` − the run of method ``anchor`` (whatever its variant label), or None."""
    if diffs.empty or base_method(label) == anchor:
        return None
    labels = set(diffs["method_a"]) | set(diffs["method_b"])
    other = next((m for m in labels if base_method(m) == anchor), None)
    return pair(diffs, label, other) if other else None


def _setting_of(res: TuneResults, overrides: dict) -> str:
    """The tuning setting (its name in trials.csv) of a test run with these overrides."""
    for setting, entry in res.best.items():
        if all(overrides.get(k) == v for k, v in entry["setting"].items()) and \
                not any(k in overrides for k in _setting_keys(res) - set(entry["setting"])):
            return setting
    return next(iter(res.best))


def _setting_keys(res: TuneResults) -> set:
    return {k for entry in res.best.values() for k in entry["setting"]}


def importance_table(res: TuneResults, setting: str) -> pd.DataFrame:
    """One row per tuned method, one column per knob: its fANOVA importance (``importances``)."""
    rows = {}
    for m in res.methods():
        if res.spec["space"].get(m):
            rows[NAMES.get(m, m)] = {k: round(v, 3) for k, v in importances(res, setting, m).items()}
    return pd.DataFrame(rows).T.rename_axis("importance")


def values_text(res: TuneResults, setting: str, method: str) -> str:
    """'T 1.62, alpha 0.35' for a method's chosen values ('—' without a search)."""
    values = res.best.get(setting, {}).get("methods", {}).get(method, {}).get("values", {})
    return ", ".join(knob_words(k, v) for k, v in values.items()) or "—"


def edges(res: TuneResults, setting: str, method: str) -> list[dict]:
    """The chosen values that sit at the edge of their searched range: in its lowest or highest
    tenth (``EDGE``), measured on the log scale where the range was searched on one. Such a
    value says the best may lie beyond the range, where no trial went. One dict per knob:
    knob, value, low, high, side ('low' or 'high'); lists of choices are not ranges and are left out."""
    values = res.best.get(setting, {}).get("methods", {}).get(method, {}).get("values", {})
    out = []
    for knob, value in values.items():
        space = res.spec.get("space", {}).get(method, {}).get(knob)
        if not isinstance(space, dict) or not isinstance(value, (int, float)):
            continue
        low, high, log = float(space["low"]), float(space["high"]), bool(space.get("log"))
        if high <= low:
            continue
        scale = (lambda x: math.log(x)) if log else (lambda x: x)
        where = (scale(float(value)) - scale(low)) / (scale(high) - scale(low))
        side = "low" if where <= EDGE else "high" if where >= 1 - EDGE else None
        if side:
            out.append({"knob": knob, "value": float(value), "low": low, "high": high, "side": side})
    return out


def _edge_words(e: dict) -> str:
    """'T 1.05 (lowest tenth of 1 to 8)'."""
    return f"{knob_words(e['knob'], e['value'])} ({e['side']}est tenth of {e['low']:g} to {e['high']:g})"


def _setting_name(res: TuneResults, words: str) -> str:
    return next((s for s, e in res.best.items() if e["in words"] == words), words)


def test_markdown(test: pd.DataFrame, res: TuneResults | None = None) -> str:
    """The test frame as markdown: per setting and method its chosen values (with ``res``) and test
    accuracy; then each paired difference with its word and Holm's p over the table's family."""
    cols = ["setting", "method"] + (["chosen values"] if res is not None else []) + ["test accuracy %", "seeds"]
    rows = []
    for _, r in test.iterrows():
        cells = [r["setting"], NAMES.get(r["method"], r["method"])]
        if res is not None:
            cells.append(values_text(res, _setting_name(res, r["setting"]), r["method"]))
        rows.append(cells + [reading_.cell(r["accuracy"], r["ci_low"], r["ci_high"]), r["seeds"]])
    return markdown_table(cols, rows) + "\n\n" + differences_markdown(test_differences(test), by_setting=False)


def differences_markdown(diffs: pd.DataFrame, by_setting: bool = True) -> str:
    """Each paired difference's cell (mean, 95% CI, \\* where Holm's p < 0.05) and its word: one
    column per setting (``by_setting``), or one row per difference with its p-values."""
    label = lambda r: f"{NAMES.get(r['method'], r['method'])} − {NAMES.get(r['anchor'], r['anchor'])}"  # noqa: E731
    if not by_setting:
        return markdown_table(["setting", "difference, points (95% CI)", "seeds", "p", "Holm p", "reading"], [
            [r["setting"], label(r) + " " + reading_.cell(r["mean_diff"], r["ci_low"], r["ci_high"], r["p_holm"],
                                                          r["seeds"], signed=True),
             r["seeds"], f"{r['p_value']:.3g}", f"{r['p_holm']:.3g}", r["word"] if isinstance(r["word"], str) else "—"]
            for _, r in diffs.iterrows()])
    settings = list(dict.fromkeys(diffs["setting"]))
    rows = []
    order = sorted(dict.fromkeys(zip(diffs["anchor"], diffs["method"])),
                   key=lambda am: (list(ANCHORS).index(am[0]), method_rank(am[1])))
    for anchor, method in order:
        cells = []
        for setting in settings:
            hit = diffs[(diffs["setting"] == setting) & (diffs["anchor"] == anchor) & (diffs["method"] == method)]
            if hit.empty:
                cells.append("—")
                continue
            r = hit.iloc[0]
            text = reading_.cell(r["mean_diff"], r["ci_low"], r["ci_high"], r["p_holm"], r["seeds"], signed=True)
            cells.append(f"{text}<br>*{r['word']}*" if isinstance(r["word"], str) else text)
        rows.append([label({"method": method, "anchor": anchor}), *cells])
    return markdown_table(["paired difference, points", *settings], rows)


def reading(res: TuneResults, test: pd.DataFrame) -> list[str]:
    """The plain reading of the test, generated from its numbers: the sentence of words (``sentence``),
    each setting's chosen values in words, and which chosen values sit at the edge of their range."""
    return ([sentence(test_differences(test)), ""] + [f"- {line}" for line in _chosen_lines(res, test)]
            + _edge_reading([(res, test)]))


def sentence(diffs: pd.DataFrame, margin: float = reading_.MARGIN) -> str:
    """The answer in one sentence, from the words of the paired differences: against scratch and
    against label smoothing, how many method-and-setting pairs with teachers are ahead, level
    within ±margin, behind or undecided; CAMKD against vanilla and label smoothing against scratch,
    setting by setting."""
    if diffs.empty:
        return "No paired difference yet."
    kd = diffs[~diffs["method"].isin(AGAINST)]
    over = _seeds_over(diffs["seeds"])
    parts = []
    for anchor, name in (("scratch", "scratch, the student trained alone"), ("label_smoothing", "label smoothing")):
        own = kd[kd["anchor"] == anchor]
        if own.empty:
            continue
        ahead = int((own["word"] == "ahead").sum())
        lead = (f"{ahead} of the {len(own)} method-and-setting pairs with teachers are ahead of {name}" if ahead else
                f"no method with teachers is ahead of {name}" if not parts else f"none is ahead of {name}")
        parts.append(f"{lead} ({reading_.count_words(own['word'])} of {len(own)})")
    for method, anchor, name in (("camkd", "vanilla", "CAMKD against vanilla"),
                                 ("label_smoothing", "scratch", "label smoothing against scratch")):
        rows = diffs[(diffs["anchor"] == anchor) & (diffs["method"] == method)]
        if len(rows):
            parts.append(f"{name}: " + _by_setting(rows))
    return (f"**The answer**, each method at its best (tuned on held-out training images) and tested over {over} seeds: "
            + "; ".join(parts) + f". Ahead or behind: the whole 95% interval of the paired difference above or "
            f"below 0; level: inside ±{margin:g} points; undecided: neither.")


def _by_setting(rows: pd.DataFrame) -> str:
    """'level in shipped, undecided in small student and small student + swapped resnet'."""
    return reading_.by_setting(zip(rows["setting"], rows["word"]))


def _chosen_lines(res: TuneResults, test: pd.DataFrame) -> list[str]:
    base = _base_params(res)
    return [line for setting in dict.fromkeys(test["setting"]) if (line := _chosen_line(res, setting, base))]


KNOB_READING = {"label_smoothing": "label smoothing's eps"}


def chosen_words(method: str, values: dict) -> str:
    """A method's chosen values in words: 'CAMKD T 2.1, alpha 0.62, its feature term off (beta 0)',
    'label smoothing eps 0.0888'."""
    parts = []
    for k, v in values.items():
        if k == "beta" and method == "camkd":
            parts.append("its feature term off (beta 0)" if float(v) == 0 else f"its feature term at beta {value_words(v)}")
        else:
            parts.append(knob_words(k, v))
    return f"{NAMES.get(method, method)} " + ", ".join(parts)


def _chosen_line(res: TuneResults, setting: str, base: dict) -> str | None:
    """'**small student**: CAMKD T 1.12, alpha 1.56, its feature term off (beta 0); vanilla T 1.05,
    alpha 0.111; label smoothing eps 0.296 (the base params' untuned defaults, for comparison: T 4, alpha 0.7,
    beta 100, eps 0.1).'"""
    methods = res.best.get(_setting_name(res, setting), {}).get("methods", {})
    order = sorted(methods, key=method_rank)
    said = [chosen_words(m, methods[m]["values"]) for m in order if methods[m].get("values")]
    if not said:
        return None
    knobs = dict.fromkeys(k for m in order for k in methods[m].get("values", {}))
    untuned = ", ".join(knob_words(k, base[k]) for k in knobs if k in base)
    return f"**{setting}**: " + "; ".join(said) + (f" (the base params' untuned defaults, for comparison: {untuned})" if untuned else "") + "."


def _base_params(res: TuneResults) -> dict:
    """The tuning's base params file with its defaults ({} when it cannot be read)."""
    path = PACKAGE_ROOT / res.spec.get("base", "")
    try:
        return load_params(path) if path.is_file() else {}
    except ParamsError:
        return {}


def _edge_reading(studies) -> list[str]:
    """The reading's line on chosen values at the edge of their searched range, over
    ``studies`` = [(TuneResults, its test frame)], each read against its own search space."""
    at_edge, searched = [], 0
    for res, test in studies:
        for setting in dict.fromkeys(test["setting"]):
            s = _setting_name(res, setting)
            for m in sorted(res.best.get(s, {}).get("methods", {}), key=method_rank):
                found = edges(res, s, m)
                searched += bool(res.best[s]["methods"][m].get("values"))
                if found:
                    at_edge.append(f"{NAMES.get(m, m)} in {setting}: " + ", ".join(map(_edge_words, found)))
    if not searched:
        return []
    return ["- **Chosen values at the edge of their searched range**: " + (
        "; ".join(at_edge) + ". The best may lie beyond the range, where no trial went."
        if at_edge else "none; every chosen value lies inside its range.")]


# the book's answer, in the columns' order of the fixed-recipe table beneath it: the seed's student with
# the shipped teachers, the small student (searched over the wider ranges), the small student with a
# swapped teacher; each with the study whose answer stands in until its test has finished (its first
# search, or for the small student the search over the narrower ranges)
STUDIES = ("outputs/seed-student", "outputs/small-student-wide", "outputs/small-student-swapped")
EARLIER = {"outputs/seed-student": "outputs/superseded/seed-student-cut-at-epoch-2",
           "outputs/small-student-wide": "outputs/small-student",
           "outputs/small-student-swapped": "outputs/superseded/small-student-swapped-cut-at-epoch-2"}


def _named(folder: Path, link) -> str:
    """The study's folder name, linked (``link``) where it has a record to link to."""
    return f"[`{folder.name}`]({link(folder)})" if link and (folder / "tune.yaml").is_file() else f"`{folder.name}`"


def study_stage(folder: Path, link) -> tuple[tuple | None, str | None]:
    """((folder, results, test frame), None) for a study whose test has finished, else (None,
    '`folder` (how far it got)'), from its records."""
    if not (folder / "tune.yaml").is_file():
        return None, f"`{folder.name}` (not started)"
    if not (folder / "trials.csv").is_file():  # started: no trial has finished yet
        return None, f"{_named(folder, link)} (searching)"
    res = load(folder)
    test = test_frame(res)
    if res.test is not None and not res.test.skipped and not test.empty and _test_complete(folder):
        return (folder, res, test), None
    rescoring = not res.trials.empty and (res.trials["kind"] == "rescore").any()
    tested = _test_progress(folder)  # '' before the test's first run
    stage = ("testing the chosen values" + tested if res.best else
             "re-scoring its best trials over seeds" + _rescore_progress(res) if rescoring else "searching" + _progress(res))
    record = folder / "tune.json"
    status = json.loads(record.read_text()).get("status") if record.is_file() else None
    if status in ("stopped", "interrupted"):
        before_test = res.best and not tested  # its values chosen, no test run yet
        stage = (f"{status} with its values chosen, before its test" if before_test else f"{status} while {stage}") \
            + "; `make studies` resumes it"
    return None, f"{_named(folder, link)} ({stage})"


def _test_complete(folder: Path) -> bool:
    """Every run of the test sweep finished (a tuning whose test_seeds were raised has more to run)."""
    runs = runs_frame(folder / "test")
    return len(runs) > 0 and bool((runs["status"] == "finished").all())


def block(folders, link=None, own_page: bool = False, figure=None, answer_figure: str | None = None,
          earlier: dict | None = None) -> str:
    """The README's and the site's block 'each method at its best', from the tuning folders: the
    answer in one sentence (``sentence``), the answer's picture (``answer_figure``, the path of
    ``plot_answer``'s file, where given), test accuracy one fact a cell, the paired differences
    with their words, each setting's chosen values in words, and the studies behind it.

    A study whose test has not finished is named with how far it got; where ``earlier`` names a
    finished study for it ({folder: earlier folder}), that one's answer stands in, marked as such.
    ``link`` turns a folder into its link target (None: names only). ``own_page``: the verdict on
    one study's own page, where no fixed-recipe tables follow to stand in for an unfinished answer.
    ``figure`` turns a folder into the path of its forest plot (``tune_forest.png``), shown under the
    table for each finished study that has one."""
    done, waiting, standing_in = [], [], []
    folders = list(map(Path, folders))
    for folder in folders:
        found, stage = study_stage(folder, link)
        if found:
            done.append(found)
            continue
        waiting.append(stage)
        other = next((v for k, v in (earlier or {}).items() if Path(k) == folder), None)
        if other is not None:
            found, _ = study_stage(Path(other), link)
            if found:
                done.append(found)
                standing_in.append((folder, found[0]))
    done, searched = _told_apart(done)
    lines = []
    if done:
        test = pd.concat([t for _, _, t in done], ignore_index=True)
        diffs = test_differences(test)
        said = sentence(diffs)
        if standing_in:
            said = said.replace("**The answer**", f"**The answer so far** ({len(standing_in)} of {len(folders)} "
                                "settings read from an earlier study until their test has finished; see the "
                                "studies below)", 1)
        lines += [said, ""]
        if answer_figure:
            lines += [f"![each method's paired difference in test accuracy from scratch, 95% intervals, the "
                      f"±{reading_.MARGIN:g} band of 'level' shaded]({answer_figure})", ""]
        lines += [accuracy_markdown(test), "", differences_markdown(diffs), "",
                  "Chosen values, by validation accuracy on images held out of the training set (never the test "
                  "set), with the same number of trials for every method:", ""]
        lines += [f"- {line}" for _, res, t in done for line in _chosen_lines(res, t)]
        lines += _edge_reading([(res, t) for _, res, t in done])
        lines.append("")
        for folder, res, t in done:
            spec = res.spec
            stand = next((f for f, e in standing_in if e == folder), None)
            lines.append(f"- {_named(folder, link)}, {_columns(res)}: {spec['trials']} trials per tuned method"
                         f"{_distinct(res)}{searched.get(folder, '')} on {_val_size(res)} held-out training images; "
                         f"test over {_seeds_over(t['seeds'])} seeds"
                         + (f"; standing in for {_named(stand, link)} until its test has finished" if stand else "")
                         + ".")
    if waiting:
        lines += ["", (("Their replacements, searched again and tested over more seeds: " if standing_in else
                        "Not finished yet: ") + ", ".join(waiting) + "." if done else
                       "No answer yet: " + ", ".join(waiting) + "; the test on the held-out test set follows "
                       "the search." if own_page else
                       "The tuned comparison is running; no study has finished its test yet: " + ", ".join(waiting)
                       + ". Until then the tables below, at the seed's recipe, are the book's answer.")]
    if done:
        n = len(diffs)
        lines += ["", f"Test accuracy at the final epoch, mean (95% CI over seeds); differences paired by seed, \\* "
                      f"where Holm's adjusted p < {reading_.ALPHA:g} over the table's {n} differences (paired t). "
                      "Generated by `python -m kdlib blocks` from the tuning folders."]
    for folder, res, _ in done:
        if figure and (folder / "tune_forest.png").is_file():
            lines += ["", f"![{', '.join(e['in words'] for e in res.best.values())}: each method at its chosen "
                          f"values against scratch and against label smoothing, paired differences in test accuracy "
                          f"with 95% CIs]({figure(folder)})"]
    return "\n".join(lines).strip()


def accuracy_markdown(test: pd.DataFrame) -> str:
    """Test accuracy, one column per setting and one row per method, one fact a cell: mean (95% CI)."""
    settings = list(dict.fromkeys(test["setting"]))
    methods = sorted(dict.fromkeys(test["method"]), key=method_rank)
    rows = []
    for m in methods:
        cells = []
        for s in settings:
            hit = test[(test["setting"] == s) & (test["method"] == m)]
            cells.append("—" if hit.empty else reading_.cell(hit.iloc[0]["accuracy"], hit.iloc[0]["ci_low"],
                                                               hit.iloc[0]["ci_high"]))
        rows.append([NAMES.get(m, m), *cells])
    return markdown_table(["test accuracy %", *settings], rows)


def plot_answer(diffs: pd.DataFrame, margin: float = reading_.MARGIN) -> Figure:
    """The answer's picture: every method's paired difference in test accuracy from scratch, one
    panel per setting titled with its number of seeds, 95% intervals, the ±margin band of 'level'
    shaded, each labelled with its word."""
    own = diffs[diffs["anchor"] == "scratch"]
    settings = list(dict.fromkeys(own["setting"]))
    methods = sorted(dict.fromkeys(own["method"]), key=method_rank)
    colors = _colors(methods)
    fig = Figure(figsize=(7.6, 0.45 * len(methods) * len(settings) + 1.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(settings), 1, sharex=True))
    for ax, setting in zip(axes, settings):
        rows = own[own["setting"] == setting]
        ax.axvspan(-margin, margin, color="0.88", zorder=0, label=f"level: inside ±{margin:g}")
        ax.axvline(0, color="0.4", lw=0.8)
        for y, m in enumerate(reversed(methods)):
            hit = rows[rows["method"] == m]
            if hit.empty:
                continue
            r = hit.iloc[0]
            ax.errorbar([r["mean_diff"]], [y], xerr=[[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]]
                        if not pd.isna(r["ci_low"]) else None, fmt="o", color=colors[m], capsize=3)
            ax.annotate(r["word"] if isinstance(r["word"], str) else "one seed", (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(range(len(methods)), [NAMES.get(m, m) for m in reversed(methods)], fontsize=8)
        over = _seeds_over(rows["seeds"])
        ax.set_title(setting + (f" · {over} seed{'s' * (over != '1')}" if over else ""), fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("test accuracy − scratch's, points (paired by seed, 95% interval)", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower left", frameon=False)
    return fig


def _told_apart(done: list) -> tuple[list, dict]:
    """The finished studies, with a setting that an earlier one already names ('small student'
    twice: the same student searched over other ranges) renamed by how its search differs:
    'small student, searched wider' when each of its ranges holds the earlier study's and one
    goes further, else 'small student, `its folder`'; with {folder: ', ranges widened to T 0.5
    to 8, ...,'}, the ranges of a wider search that differ, for its line under the table. The answer's
    columns, verdicts and chosen-value lines stay one per study."""
    named: dict[str, TuneResults] = {}
    out, searched = [], {}
    for folder, res, test in done:
        for setting, entry in res.best.items():
            words = entry["in words"]
            if words in named:
                earlier = named[words]
                wider = _wider(res.spec.get("space", {}), earlier.spec.get("space", {}))
                new = f"{words}, searched wider" if wider else f"{words}, `{folder.name}`"
                entry["in words"] = new
                test = test.assign(setting=test["setting"].replace(words, new))
                if wider:
                    mine, theirs = _ranges(res), _ranges(earlier)
                    searched[folder] = ", ranges widened to " + ", ".join(
                        _range_words(k, mine[k]) for k in sorted(mine, key=_knob_rank)
                        if theirs.get(k) != mine[k]) + ","
                words = new
            named[words] = res
        out.append((folder, res, test))
    return out, searched


_KNOB_ORDER = ("temperature", "alpha", "beta", "label_smoothing")  # then any other knob, by name


def _knob_rank(knob: str) -> tuple:
    return (_KNOB_ORDER.index(knob) if knob in _KNOB_ORDER else len(_KNOB_ORDER), knob)


def _ranges(res: TuneResults) -> dict:
    """Each knob's searched range over the tuned methods: {knob: (low, high)}, the widest one a
    knob has when methods differ."""
    out: dict = {}
    for knobs in (res.spec.get("space") or {}).values():
        for k, r in knobs.items():
            if isinstance(r, dict):
                low, high = float(r["low"]), float(r["high"])
                out[k] = (min(low, out[k][0]), max(high, out[k][1])) if k in out else (low, high)
    return out


def _range_words(knob: str, span: tuple) -> str:
    """'T 0.5 to 8'."""
    return f"{knob_words(knob, span[0])} to {value_words(span[1])}"


def _wider(space: dict, earlier: dict) -> bool:
    """Every range of ``earlier`` is held by the same method's and knob's range in ``space``
    (choices: the same list or more), and at least one range of ``space`` goes beyond it."""
    further = False
    for method, knobs in earlier.items():
        for k, r in knobs.items():
            mine = space.get(method, {}).get(k)
            if isinstance(r, dict) and isinstance(mine, dict):
                low, high = float(mine["low"]), float(mine["high"])
                if low > float(r["low"]) or high < float(r["high"]):
                    return False
                further |= low < float(r["low"]) or high > float(r["high"])
            elif isinstance(r, list) and isinstance(mine, list):
                if not set(map(str, r)) <= set(map(str, mine)):
                    return False
                further |= len(set(map(str, mine))) > len(set(map(str, r)))
            else:
                return False
    return further


def _columns(res: TuneResults) -> str:
    """Its settings as the answer's columns name them, each with what sets it apart:
    '**small student** (student width 0.25)', '**shipped** (the shipped teachers, the seed's student)'."""
    base = _base_params(res)
    return ", ".join(f"**{e['in words']}** ({describe({**base, **e['setting']})})" for e in res.best.values())


def _distinct(res: TuneResults) -> str:
    """' (15 to 16 distinct points: ...)' when some search trials asked the values of an earlier
    one (a resumed search did, before its sampler was seeded from its trials); '' otherwise."""
    frame = counts(res)
    points = [int(n) for n in frame["distinct points"] if n != "—"]
    if not points or min(points) >= res.spec["trials"]:
        return ""
    span = f"{min(points)}" if min(points) == max(points) else f"{min(points)} to {max(points)}"
    return (f" ({span} distinct points: after a resume the search asked some earlier trials' values "
            "again)")


def _progress(res: TuneResults) -> str:
    """', 14 of 80 trials': the search trials finished (complete or pruned) of its budget."""
    tuned = [m for m in res.spec.get("methods", []) if res.spec.get("space", {}).get(m)]
    budget = res.spec.get("trials", 0) * len(tuned) * max(1, len(res.spec.get("settings") or [{}]))
    if not budget or res.trials.empty:
        return ""
    done = int(((res.trials["kind"] == "search") & res.trials["state"].isin(["complete", "pruned"])).sum())
    return f", {done} of {budget} trials"


def _rescore_progress(res: TuneResults) -> str:
    """', 22 runs done': the re-scoring runs finished so far (how many it needs follows from which
    trials lie within noise of the best, which the search decides)."""
    done = int(((res.trials["kind"] == "rescore") & res.trials["state"].isin(["complete", "pruned"])).sum())
    return f", {done} run{'s' * (done != 1)} done" if done else ""


def _test_progress(folder: Path) -> str:
    """', 2 of 5 runs finished': the test sweep's runs (each a method over every seed) so far."""
    runs = runs_frame(folder / "test")
    return f", {int((runs['status'] == 'finished').sum())} of {len(runs)} runs finished" if len(runs) else ""


def _val_size(res: TuneResults) -> str:
    size = _base_params(res).get("val_subset")
    return f"{size:,}" if isinstance(size, int) else "?"


# ---- how far the pruner can trust an early epoch ---------------------------------------------------

FIDELITY = 0.8  # a pruner may cut from the first epoch whose ranking of trials agrees this well with the last's


def epoch_curves(journal: str | Path) -> pd.DataFrame:
    """One row per complete search trial of a tuning's storage and epoch: ``setting``, ``method``,
    ``trial``, ``epoch``, ``val_acc`` (the validation accuracy it reported after that epoch), read
    through Optuna's public API from ``journal`` (a journal file, or an RDB URL)."""
    require("tune", "reading a tuning's journal")
    import optuna
    from optuna.trial import TrialState
    storage = open_storage(str(journal))
    rows = []
    for name in optuna.get_all_study_names(storage):
        parts = name.split("/")
        if len(parts) != 2:  # SETTING/METHOD is a search; SETTING/METHOD/seeds holds fixed-value runs
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            rows += [{"setting": parts[0], "method": parts[1], "trial": t.number, "epoch": int(e), "val_acc": v}
                     for e, v in sorted(t.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["setting", "method", "trial", "epoch", "val_acc"])


def pruner_fidelity(curves: pd.DataFrame) -> pd.DataFrame:
    """Per setting, method and epoch: Spearman's rank correlation between the complete trials'
    validation accuracy at that epoch and at their last (``rho``; NaN where fewer than 3 trials
    or where one of the two has no spread), over ``trials`` complete trials. A median pruner
    that cuts at an epoch whose ``rho`` is low stops trials on noise, not on how they will end."""
    from scipy.stats import spearmanr
    rows = []
    for (setting, method), g in curves.groupby(["setting", "method"], sort=False):
        wide = g.pivot_table(index="trial", columns="epoch", values="val_acc")
        last = wide.columns.max()
        wide = wide.dropna(subset=[last])
        for epoch in wide.columns:
            pair = pd.DataFrame({"at": wide[epoch], "last": wide[last]}).dropna()
            spread = pair.nunique().min() > 1
            rho = float(spearmanr(pair["at"], pair["last"]).statistic) if len(pair) >= 3 and spread else math.nan
            rows.append({"setting": setting, "method": method, "epoch": int(epoch), "trials": len(pair), "rho": rho})
    return pd.DataFrame(rows, columns=["setting", "method", "epoch", "trials", "rho"])


def pooled_fidelity(fidelity: pd.DataFrame) -> pd.DataFrame:
    """Per method and epoch, the correlations of ``pruner_fidelity`` over several studies pooled as
    a meta-analysis pools them: the mean of Fisher's z = artanh(rho) weighted by trials - 3 (the
    inverse of z's variance), turned back into a correlation; ``trials`` summed. A study with 5
    trials measures rho to about ±0.5, so one study's value alone decides nothing."""
    f = fidelity.dropna(subset=["rho"])
    f = f[f["trials"] > 3].assign(z=lambda d: np.arctanh(d["rho"].clip(-0.999, 0.999)), w=lambda d: d["trials"] - 3)
    rows = [{"method": m, "epoch": int(e), "studies": len(g), "trials": int(g["trials"].sum()),
             "rho": float(np.tanh((g["z"] * g["w"]).sum() / g["w"].sum()))}
            for (m, e), g in f.groupby(["method", "epoch"], sort=False)]
    return pd.DataFrame(rows, columns=["method", "epoch", "studies", "trials", "rho"])


def trusted_epoch(fidelity: pd.DataFrame, threshold: float = FIDELITY) -> int | None:
    """The first epoch from which every study's and method's correlation with the last epoch is at
    least ``threshold`` at that epoch and every later one (a study with too few trials to measure,
    NaN, does not hold it back); None if no epoch before the last is."""
    if fidelity.empty:
        return None
    last = int(fidelity["epoch"].max())
    for epoch in range(1, last):
        later = fidelity[fidelity["epoch"] >= epoch]
        if (later["rho"].dropna() >= threshold - 1e-9).all():
            return epoch
    return None


def cut_epochs(trials: pd.DataFrame) -> pd.DataFrame:
    """Per setting and method of a search: how many trials the pruner stopped and at which epochs
    (``trials.csv``'s ``epochs`` of its pruned rows)."""
    search = trials[(trials["kind"] == "search") & (trials["state"] == "pruned")]
    return (search.groupby(["setting", "method"], sort=False)["epochs"]
            .agg(pruned="size", first_cut="min", last_cut="max").reset_index())


# the book's first searches, whose median pruner cut from epoch 2: their journals are what the pruner's
# default (kdlib.tune.PRUNER) was set from
FIDELITY_STUDIES = ("outputs/superseded/small-student-swapped-first-pass", "outputs/small-student",
                    "outputs/superseded/seed-student-cut-at-epoch-2",
                    "outputs/superseded/small-student-swapped-cut-at-epoch-2",
                    "outputs/superseded/small-student-wide-cut-at-epoch-2")
SHOWN_EPOCHS = (1, 2, 3, 5, 8, 10, 11, 12, 14)


def study_fidelity(folders) -> pd.DataFrame:
    """``pruner_fidelity`` of every study in ``folders`` (its ``study.journal``; a tuning whose storage is
    a database is left out), a ``study`` column naming its folder and the setting in words."""
    frames = []
    for folder in map(Path, folders):
        res = load(folder)
        if not (folder / "study.journal").is_file():  # a tuning whose storage is a database: not read here
            continue
        f = pruner_fidelity(epoch_curves(folder / "study.journal"))
        frames.append(f.assign(study=folder.name, setting=[res.words(s) for s in f["setting"]]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pruner_markdown(folders, epochs=SHOWN_EPOCHS, threshold: float = FIDELITY) -> str:
    """The pruner's fidelity in the studies ``folders``: per study and method the rank correlation of
    each shown epoch's validation accuracy with the last epoch's over its complete trials, then per
    method pooled over the studies (``pooled_fidelity``), and the first epoch from which every pooled
    one is at least ``threshold`` (``trusted_epoch``)."""
    fid = study_fidelity(folders)
    if fid.empty:
        return "No study's journal to measure."
    fid = fid.assign(key=fid["study"] + "|" + fid["setting"])
    pooled = pooled_fidelity(fid.assign(setting=fid["key"]))
    fmt = lambda v: "—" if pd.isna(v) else f"{v:.2f}"  # noqa: E731
    rows = [[f"`{study}`", NAMES.get(method, method), int(g["trials"].max()),
             *(fmt(g.set_index("epoch")["rho"].get(e)) for e in epochs)]
            for (study, method), g in fid.groupby(["study", "method"], sort=False)]
    rows += [["**pooled**", f"**{NAMES.get(method, method)}**", int(g["trials"].max()),
              *(fmt(g.set_index("epoch")["rho"].get(e)) for e in epochs)]
             for method, g in pooled.groupby("method", sort=False)]
    lines = [markdown_table(["study", "method", "trials", *(f"epoch {e}" for e in epochs)], rows)]
    trusted = trusted_epoch(pooled, threshold)
    lines += ["", "Spearman's rank correlation between a complete trial's validation accuracy at that epoch and at "
                  "its last (15), over each study's complete trials; pooled: Fisher's z averaged with weights "
                  "trials − 3. " + (f"From epoch {trusted} on every method's pooled correlation is at least "
                                     f"{threshold:g}." if trusted else
                                     f"No epoch before the last has every method's pooled correlation at "
                                     f"{threshold:g} or more.")
              + " Generated by `python -m kdlib blocks` from the studies' journals."]
    return "\n".join(lines)


def superseded_markdown(root: Path, folder: str = "outputs/superseded") -> str:
    """Every superseded study (``superseded.yaml`` in ``folder``): what replaced it and why, how its
    pruner's cut epoch ranked the trials, and what its test said (or how far it got)."""
    notes = yaml.safe_load((root / folder / "superseded.yaml").read_text())
    lines = []
    for name, note in notes.items():
        study = root / folder / name
        res = load(study)
        cut = (res.spec.get("pruner") or {}).get("warmup_epochs", 2)
        fid = study_fidelity([study])
        at_cut = fid[fid["epoch"] == cut]
        ranked = ", ".join(f"{NAMES.get(m, m)} {r:.2f}" for m, r in zip(at_cut["method"], at_cut["rho"])
                           if not pd.isna(r))
        if (study / "tune_test.csv").is_file():
            test = pd.read_csv(study / "tune_test.csv")
            seeds = sorted(set(int(n) for n in test["seeds"]))
            diffs = test_differences(test)
            said = sentence(diffs).replace(
                "**The answer**", f"Its test ({seeds[-1]} seeds) said", 1).split(". Ahead or behind")[0]
            ls = diffs[(diffs["method"] == "label_smoothing") & (diffs["anchor"] == "scratch")]
            said += "".join(f" (label smoothing − scratch {reading_.cell(r['mean_diff'], r['ci_low'], r['ci_high'], signed=True)}"
                            f", p {r['p_value']:.3f})" for _, r in ls.iterrows()) + "."
        else:
            said = f"Its test stopped before it finished{_test_progress(study)}."
        replaced = note["replaced by"]
        lines.append(f"- **`{name}`**, replaced by `{replaced}`: {note['why'].rstrip('.')}. Spearman's rank "
                     f"correlation of its trials at epoch {cut}, where it cut, with their last epoch: {ranked}. {said}")
    return "\n".join(lines)


def fidelity_table(res: TuneResults, epochs=(1, 2, 3, 5, 8, 10, 12, 14)) -> pd.DataFrame:
    """One study's ``pruner_fidelity`` as a table: one row per setting and method (with its complete
    trials), one column per epoch of ``epochs``, the rank correlation with the last epoch (NaN with
    fewer than 3 trials)."""
    fid = study_fidelity([res.dir])
    if fid.empty:
        return pd.DataFrame()
    fid = fid.assign(method=[NAMES.get(m, m) for m in fid["method"]])
    fid = fid[fid["epoch"].isin(epochs)]
    wide = fid.pivot_table(index=["setting", "method"], columns="epoch", values="rho", sort=False).round(2)
    wide.columns = [f"epoch {e}" for e in wide.columns]
    trials = fid.groupby(["setting", "method"], sort=False)["trials"].max()
    wide.insert(0, "complete trials", trials.reindex(wide.index).to_numpy())
    return wide.reset_index()
