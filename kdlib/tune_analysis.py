"""What a tuning found, read from its folder (``kdlib tune``): the trials, the chosen values,
which knobs mattered, and the test of each method at its best against scratch and label
smoothing, paired by seed.

The trials (``trials.csv``) hold validation accuracy only; the test comparison is read from
the test sweep (``NAME/test``) with ``kdlib.sweep_analysis`` like any sweep, each tuned
method's run being a variant of its method (``vanilla[alpha=…,temperature=…]``) that is
named here by its method alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from .stats import NAMES, method_rank
from .sweep_analysis import (SweepResults, differences, knob_words, load as load_sweep, runs_frame, setting_table,
                             value_words)

EDGE = 0.1  # a chosen value in the outer tenth of its searched range sits at its edge

AGAINST = ("scratch", "label_smoothing")  # every method is compared with the students that never see a teacher


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
        from .sweep import run_name
        from .sweep_analysis import short_name
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
    import json
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
    from .extras import require
    require("tune", "reading a tuning's importances")
    import optuna
    from .tune import open_storage, study_name
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
    study = optuna.load_study(study_name=study_name(setting, method), storage=open_storage(url))
    return dict(optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)))


def _colors(methods) -> dict:
    from .plots import method_colors
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
        for anchor in AGAINST:
            hit = _pair(own, r["method"], anchor)
            for field in ("mean_diff", "ci_low", "ci_high", "p_value", "seeds"):
                row[f"{field} vs {anchor}"] = hit.get(field, math.nan) if hit else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _pair(diffs: pd.DataFrame, label: str, anchor: str) -> dict | None:
    """``label`` − the run of method ``anchor`` (whatever its variant label), or None."""
    if diffs.empty or base_method(label) == anchor:
        return None
    for _, d in diffs.iterrows():
        a, b = d["method_a"], d["method_b"]
        if a == label and base_method(b) == anchor:
            return dict(d)
        if b == label and base_method(a) == anchor:
            return {**dict(d), "mean_diff": -d["mean_diff"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"]}
    return None


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


def _interval(mean, low, high, signed=False, p=None) -> str:
    f = "+.2f" if signed else ".2f"
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{mean:{f}}" if math.isnan(low) else f"{mean:{f}} ({low:{f}} to {high:{f}})"
    return text + (" \\*" if p is not None and not math.isnan(p) and p < 0.05 else "")


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
    """The test frame as a markdown table: per setting and method its chosen values (with
    ``res``), test accuracy and the paired differences against scratch and label smoothing."""
    cols = ["setting", "method"] + (["chosen values"] if res is not None else []) + \
        ["test accuracy %", "− scratch", "− label smoothing"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in test.iterrows():
        cells = [r["setting"], NAMES.get(r["method"], r["method"])]
        if res is not None:
            cells.append(values_text(res, _setting_name(res, r["setting"]), r["method"]))
        cells.append(_interval(r["accuracy"], r["ci_low"], r["ci_high"]))
        for anchor in AGAINST:
            cells.append(_interval(r[f"mean_diff vs {anchor}"], r[f"ci_low vs {anchor}"], r[f"ci_high vs {anchor}"],
                                   signed=True, p=r[f"p_value vs {anchor}"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _significant(test: pd.DataFrame, anchor: str, sign: int) -> pd.DataFrame:
    d, p = test[f"mean_diff vs {anchor}"], test[f"p_value vs {anchor}"]
    return test[(p < 0.05) & (np.sign(d) == sign)]


def reading(res: TuneResults, test: pd.DataFrame) -> list[str]:
    """The plain reading of the test, generated from its numbers: whether any method with
    teachers, at its best, beats scratch or label smoothing, each knob's chosen values beside
    its untuned one, and which chosen values sit at the edge of their range (``edges``)."""
    return _verdicts(test) + _chosen_lines(res, test) + _edge_reading([(res, test)])


def _verdicts(test: pd.DataFrame) -> list[str]:
    kd = test[~test["method"].isin(AGAINST)]
    lines = []
    for anchor in AGAINST:
        if test[f"mean_diff vs {anchor}"].isna().all():
            continue
        name = NAMES.get(anchor, anchor)
        wins, losses = _significant(kd, anchor, 1), _significant(kd, anchor, -1)
        said = "; ".join(f"{NAMES.get(r['method'], r['method'])} in {r['setting']} "
                         f"({r[f'mean_diff vs {anchor}']:+.2f}, {r[f'ci_low vs {anchor}']:+.2f} to "
                         f"{r[f'ci_high vs {anchor}']:+.2f})" for _, r in wins.iterrows())
        lines.append(f"- **A method with teachers, tuned, beats {name}** significantly: "
                     f"{said or 'none, in any setting'}; {len(losses)} of {len(kd)} method-and-setting pairs "
                     f"fall significantly below it.")
    if "label_smoothing" in set(test["method"]) and not test["mean_diff vs scratch"].isna().all():
        ls = test[test["method"] == "label_smoothing"]
        lines.append("- **Label smoothing, tuned, against scratch**: " + "; ".join(
            f"{r['setting']} {_interval(r['mean_diff vs scratch'], r['ci_low vs scratch'], r['ci_high vs scratch'], True, r['p_value vs scratch'])}"
            for _, r in ls.iterrows()) + ".")
    return lines


def _chosen_lines(res: TuneResults, test: pd.DataFrame) -> list[str]:
    base = _base_params(res)
    return [line for setting in dict.fromkeys(test["setting"]) if (line := _chosen_line(res, setting, base))]


KNOB_READING = {"label_smoothing": "label smoothing's eps"}


def _chosen_line(res: TuneResults, setting: str, base: dict) -> str | None:
    """'- **small student**, the chosen values (untuned, as in the base params, in brackets):
    temperature vanilla 1.05, CAMKD 1.12 (4); alpha vanilla 0.111, CAMKD 1.56 (0.7); beta CAMKD 0 (100).'"""
    methods = res.best.get(_setting_name(res, setting), {}).get("methods", {})
    order = sorted(methods, key=method_rank)
    knobs = dict.fromkeys(k for m in order for k in methods[m].get("values", {}))
    if not knobs:
        return None
    parts = []
    for k in knobs:
        said = ", ".join(value_words(v) if m == k else f"{NAMES.get(m, m)} {value_words(v)}"  # eps: its own method
                         for m in order if (v := methods[m].get("values", {}).get(k)) is not None)
        parts.append(f"{KNOB_READING.get(k, k)} {said}" + (f" ({value_words(base[k])})" if k in base else ""))
    return (f"- **{setting}**, the chosen values (untuned, as in the base params, in brackets): "
            + "; ".join(parts) + ".")


def _base_params(res: TuneResults) -> dict:
    """The tuning's base params file with its defaults ({} when it cannot be read)."""
    from .params import ParamsError, load_params
    path = Path(__file__).resolve().parent.parent / res.spec.get("base", "")
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


# the book's answer, in the columns' order of the fixed-recipe table beneath it (the seed's student
# with the shipped teachers, then the small student, then the small student with a swapped teacher),
# then the small student searched again over wider ranges
STUDIES = ("outputs/seed-student", "outputs/small-student", "outputs/small-student-swapped",
           "outputs/small-student-wide")


def _named(folder: Path, link) -> str:
    return f"[`{folder.name}`]({link(folder)})" if link else f"`{folder.name}`"


def block(folders, link=None, own_page: bool = False, figure=None) -> str:
    """The README's and the site's block 'each method at its best', from the tuning folders:
    per setting, each method's chosen values, test accuracy and paired differences against
    scratch and label smoothing, then the reading; a study whose test has not finished is
    named with how far it got (its search, or its test runs), from its records. ``link`` turns a
    folder into its link target (None: names only). ``own_page``: the verdict on one study's
    own page, where no fixed-recipe tables follow to stand in for an unfinished answer.
    ``figure`` turns a folder into the path of its forest plot (``tune_forest.png``), shown under
    the table for each finished study that has one (None: no figures, as in the README)."""
    done, waiting = [], []
    for folder in map(Path, folders):
        if not (folder / "tune.yaml").is_file():
            waiting.append(f"`{folder.name}` (not started)")
            continue
        if not (folder / "trials.csv").is_file():  # started: no trial has finished yet
            waiting.append(f"{_named(folder, link)} (searching)")
            continue
        res = load(folder)
        test = test_frame(res)
        finished = res.test is not None and not res.test.skipped and not test.empty
        if finished:
            done.append((folder, res, test))
        else:
            rescoring = not res.trials.empty and (res.trials["kind"] == "rescore").any()
            stage = ("testing the chosen values" + _test_progress(folder) if res.best else
                     "re-scoring its best trials over seeds" if rescoring else "searching" + _progress(res))
            waiting.append(f"{_named(folder, link)} ({stage})")
    done, searched = _told_apart(done)
    lines = []
    if done:
        frames = []
        for folder, res, test in done:
            frames.append(test.assign(values=[values_text(res, _setting_name(res, s), m)
                                              for s, m in zip(test["setting"], test["method"])]))
        test = pd.concat(frames, ignore_index=True)
        lines += [test_markdown_wide(test), ""]
        for folder, res, _ in done:
            spec = res.spec
            lines.append(f"- {_named(folder, link)}, {_columns(res)}: {spec['trials']} trials per tuned method"
                         f"{_distinct(res)}{searched.get(folder, '')} on "
                         f"{_val_size(res)} held-out training images; test over seeds "
                         f"{', '.join(map(str, spec.get('test_seeds', spec['seeds'])))}.")
        lines.append("")
        lines += reading_all(done)
    if waiting:
        lines += ["", ("Still running: " + ", ".join(waiting) + "." if done else
                       "No answer yet: " + ", ".join(waiting) + "; the test on the held-out test set follows "
                       "the search." if own_page else
                       "The tuned comparison is running; no study has finished its test yet: " + ", ".join(waiting)
                       + ". Until then the tables below, at the seed's recipe, are the book's answer.")]
    if done:
        lines += ["", "Test accuracy at the final epoch, mean (95% CI over seeds); differences paired by seed, \\* "
                      "where paired t p < 0.05. Values chosen by validation accuracy on images held out of the "
                      "training set (never the test set), with the same number of trials for every method. "
                      "Generated by `python -m kdlib.blocks` from the tuning folders."]
    for folder, res, _ in done:
        if figure and (folder / "tune_forest.png").is_file():
            lines += ["", f"![{', '.join(e['in words'] for e in res.best.values())}: each method at its chosen "
                          f"values against scratch and against label smoothing, paired differences in test accuracy "
                          f"with 95% CIs]({figure(folder)})"]
    return "\n".join(lines).strip()


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
    from .quality import describe
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


def _test_progress(folder: Path) -> str:
    """', 2 of 5 runs finished': the test sweep's runs (each a method over every seed) so far."""
    runs = runs_frame(folder / "test")
    return f", {int((runs['status'] == 'finished').sum())} of {len(runs)} runs finished" if len(runs) else ""


def _val_size(res: TuneResults) -> str:
    size = _base_params(res).get("val_subset")
    return f"{size:,}" if isinstance(size, int) else "?"


def test_markdown_wide(test: pd.DataFrame) -> str:
    """One column per setting, one row per method: chosen values, test accuracy, and the
    differences against scratch and against label smoothing on lines of their own."""
    settings = list(dict.fromkeys(test["setting"]))
    methods = sorted(dict.fromkeys(test["method"]), key=method_rank)
    lines = ["| each method at its best | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for m in methods:
        cells = []
        for s in settings:
            hit = test[(test["setting"] == s) & (test["method"] == m)]
            if hit.empty:
                cells.append("—")
                continue
            r = hit.iloc[0]
            parts = [_interval(r["accuracy"], r["ci_low"], r["ci_high"])]
            for anchor in AGAINST:
                if anchor != m and not math.isnan(r[f"mean_diff vs {anchor}"]):
                    parts.append(f"{_interval(r[f'mean_diff vs {anchor}'], r[f'ci_low vs {anchor}'], r[f'ci_high vs {anchor}'], True, r[f'p_value vs {anchor}'])} vs {NAMES[anchor]}")
            if r.get("values", "—") != "—":
                parts.append(f"at {r['values']}")
            cells.append("<br>".join(p.replace(" ", "\u00a0") if i == 0 else p for i, p in enumerate(parts)))
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading_all(done) -> list[str]:
    """``reading`` over every finished study together."""
    test = pd.concat([t for _, _, t in done], ignore_index=True)
    return (_verdicts(test) + [line for _, res, t in done for line in _chosen_lines(res, t)]
            + _edge_reading([(res, t) for _, res, t in done]))


# ---- how far the pruner can trust an early epoch ---------------------------------------------------

FIDELITY = 0.8  # a pruner may cut from the first epoch whose ranking of trials agrees this well with the last's


def epoch_curves(journal: str | Path) -> pd.DataFrame:
    """One row per complete search trial of a tuning's storage and epoch: ``setting``, ``method``,
    ``trial``, ``epoch``, ``val_acc`` (the validation accuracy it reported after that epoch), read
    through Optuna's public API from ``journal`` (a journal file, or an RDB URL)."""
    from .extras import require
    require("tune", "reading a tuning's journal")
    import optuna
    from optuna.trial import TrialState
    from .tune import open_storage
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
