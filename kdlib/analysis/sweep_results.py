"""What a sweep found, read from its folder (``sweep.yaml`` and each finished run's record).

A *setting* is one combination of the keys that vary across the sweep's runs (``seeds``
and ``methods`` excepted: runs that differ only in seeds pool into one setting, and
methods are the columns). Per setting and method: final accuracy and centroid fidelity
KL(C||S) as mean and 95% t interval over seeds (``stats.mean_ci``); per setting the
paired differences of every pair of methods over seeds, with McNemar on per-image
correctness (``stats.comparison_frame``) and a plain verdict; tables and verdicts show
those of every method against scratch and against camkd (``stats.anchored_pairs``).

A run that sets a key only its own methods read (``read_by`` in ``kdlib.book.params.SCHEMA``)
away from the value the other runs share trains a *variant* of its method, not another
setting: ``{methods: [camkd], beta: 0}`` beside the seed recipe's runs is
``camkd[beta=0]``, a method of that setting, paired with the others by seed.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..book.params import SCHEMA
from ..records.names import (KNOB_WORDS, degraded, format_value, knob_words, method_words,  # noqa: F401
                             short_name, value_words)
from .cells import BR, NBSP, cell, holm, markdown_table, read  # noqa: F401 (NBSP: for readers)
from .stats import anchored_pairs, comparison_frame, mean_ci, method_rank, verdict

NOT_SETTING = {"run_dir", "threads", "seeds", "methods"}
METRICS = {"accuracy": "accuracy %", "centroid_fidelity": "KL(C‖S)"}
KEYS = ("teacher_label_noise", "teacher_class_swap", "student_width")  # what a teacher-quality sweep varies


@dataclass
class SweepResults:
    keys: list[str]                  # the keys that vary, in the sweep file's order
    frame: pd.DataFrame              # one row per (run, method, seed)
    settings: dict = field(default_factory=dict)  # setting tuple -> {"metrics": {...}, "predictions": {...}}
    skipped: list[str] = field(default_factory=list)  # runs without a finished record
    eval_split: str = "test"
    variant_keys: dict = field(default_factory=dict)  # key -> the value that is no variant (``variant_keys``)
    names: dict = field(default_factory=dict)     # setting tuple -> its name in words (``setting_words``)
    params: dict = field(default_factory=dict)    # setting tuple -> the params of its first run


def _value(v):
    return format_value(v) if isinstance(v, (list, dict)) else v


def variant_keys(params: dict[str, dict]) -> dict:
    """``{key: reference value}`` for each key (with ``read_by``) that some runs set away
    from the value shared by every run training a method that does not read it, all
    those runs training only methods that do: in them it names a method variant."""
    out = {}
    for key, spec in SCHEMA.items():
        if spec.read_by is None:
            continue
        readers = set(spec.read_by)
        shared = {json.dumps(P.get(key)) for P in params.values() if not set(P["methods"]) <= readers}
        if len(shared) == 1 and any(json.dumps(P.get(key)) not in shared for P in params.values()):
            out[key] = json.loads(shared.pop())
    return out


def method_label(method: str, P: dict, variants: dict) -> str:
    """``method``, or its variant in run ``P``: ``camkd[beta=0]``."""
    own = [f"{k}={format_value(P.get(k))}" for k, ref in variants.items() if P.get(k) != ref]
    return f"{method}[{','.join(own)}]" if own else method


def load(sweep_dir: str | Path) -> SweepResults:
    """Every finished run of the sweep in ``sweep_dir``, grouped by setting."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.yaml").is_file():
        raise FileNotFoundError(f"{sweep_dir}: no sweep.yaml; is it a sweep folder (python -m kdlib sweep ...)?")
    order = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["runs"]
    params, skipped = {}, []
    for run in order:
        manifest = sweep_dir / run["name"] / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("status") == "finished":
            params[run["name"]] = yaml.safe_load((sweep_dir / run["name"] / "params.yaml").read_text())
        else:
            skipped.append(run["name"])
    if not params:
        raise FileNotFoundError(f"{sweep_dir}: no finished run yet (sweep.json says how far it got)")
    keys, variants = varying(order, params)
    rows, settings, splits, names, first = [], {}, set(), {}, {}
    for name, P in params.items():
        setting = tuple(_value(P.get(k)) for k in keys)
        merged = settings.setdefault(setting, {"metrics": {}, "predictions": {}})
        names.setdefault(setting, setting_words(name, P, keys, variants))
        first.setdefault(setting, P)
        label = {m: method_label(m, P, variants) for m in P["methods"]}
        with np.load(sweep_dir / name / "predictions.npz") as npz:  # keys "<method>/seed<k>", "teacher/<name>"
            merged["predictions"].update({label.get(k.split("/")[0], k.split("/")[0]) + k[len(k.split("/")[0]):]: v
                                          for k, v in npz.items()})
        for method in P["methods"]:
            metrics = json.loads((sweep_dir / name / f"metrics_{method}.json").read_text())
            splits.add(metrics.get("eval_split", "test"))
            merged["metrics"].setdefault(label[method], {"runs": []})["runs"].extend(metrics["runs"])
            for r in metrics["runs"]:
                rows.append({"run": name, **dict(zip(keys, setting)), "method": label[method], "seed": r["seed"],
                             "accuracy": r["test_acc"],
                             "centroid_fidelity": (r.get("fidelity") or {}).get("centroid_fidelity")})
    for merged in settings.values():  # methods in the canonical order, whatever order the runs listed them
        merged["metrics"] = {m: merged["metrics"][m] for m in sorted(merged["metrics"], key=method_rank)}
    return SweepResults(keys, pd.DataFrame(rows), settings, skipped, "/".join(sorted(splits)), variants, names, first)


def varying(order: list[dict], params: dict[str, dict]) -> tuple[list[str], dict]:
    """(the keys that vary across the runs ``params`` — run name -> params — in the sweep
    file's order, ``variant_keys``): what makes a setting, and what makes a method's variant."""
    named = list(dict.fromkeys(k for run in order for k in run["overrides"]))
    variants = variant_keys(params)
    keys = [k for k in named + [k for k in next(iter(params.values())) if k not in named]
            if k not in NOT_SETTING and k not in variants and len({json.dumps(p.get(k)) for p in params.values()}) > 1]
    return keys, variants


def column_order(P: dict) -> tuple:
    """Where a setting goes: the shipped teachers first, then one degraded teacher, then the
    small student (not the sweep file's order, which puts the cheapest informative runs first)."""
    return float(P.get("student_width", 1.0)) != 1.0, len(degraded(P)), short_name(P)


def setting_words(run: str, P: dict, keys=(), variants=()) -> str:
    """A run's setting in words: in a sweep that varies the teachers' quality or the
    student's width (``KEYS`` among ``keys``), as ``short_name`` puts it
    ('swapped resnet', 'small student + swapped resnet'); every other key its run name
    sets (``setting_label``) as 'key value' ('labelled subset 1000'); for a run that sets
    nothing else, its teachers' quality and student width when every run of the sweep shares
    them ('small student', a tuning's test), else 'base'."""
    label = setting_label(run, variants)
    parts = [p.partition("=") for p in label.split(",")] if label != "base" else []
    words = [short_name(P)] if set(KEYS) & set(keys) else []
    words += [f"{k.replace('_', ' ')} {v}" for k, _, v in parts if k not in KEYS]
    if not words and short_name(P) != "shipped":  # every run shares it (a tuning's test): say which it is
        words = [short_name(P)]
    return ", ".join(words) or "base"




def run_titles(sweep_dir: str | Path) -> dict[str, tuple[str, str]]:
    """``{run folder: (its setting in words, its methods and seeds in words)}`` for every
    run of the sweep that has its params, from ``sweep.yaml`` and each ``params.yaml``
    alone (no results read): ('swapped resnet', 'vanilla, scratch · seed 0')."""
    sweep_dir = Path(sweep_dir)
    order = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["runs"]
    params = {r["name"]: yaml.safe_load((sweep_dir / r["name"] / "params.yaml").read_text())
              for r in order if (sweep_dir / r["name"] / "params.yaml").is_file()}
    if not params:
        return {}
    keys, variants = varying(order, params)
    titles = {}
    for name, P in params.items():
        methods = ", ".join(method_words(method_label(m, P, variants)) for m in P["methods"])
        seeds = P.get("seeds") or []
        seeds = f"seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))}"
        titles[name] = (setting_words(name, P, keys, variants), f"{methods} · {seeds}")
    return titles


RUN_COLUMNS = ["setting", "run", "status", "minutes", "worker", "error", "folder"]


def runs_frame(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per run of a sweep, in its sweep file's order, as ``sweep.json`` recorded it and
    named in words (``run_titles``): setting, methods and seeds, status, minutes, worker, error
    and the run's folder; empty before the sweep has started."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").is_file():
        return pd.DataFrame(columns=RUN_COLUMNS)
    record = json.loads((sweep_dir / "sweep.json").read_text())
    titles = run_titles(sweep_dir) if (sweep_dir / "sweep.yaml").is_file() else {}
    rows = []
    for name, info in record.get("runs", {}).items():
        setting, words = titles.get(name, ("", name))
        seconds = info.get("seconds")
        rows.append({"setting": setting, "run": words, "status": info.get("status"),
                     "minutes": round(seconds / 60, 1) if seconds is not None else None,
                     "worker": info.get("worker"), "error": info.get("error"), "folder": name})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def forest_frame(res: SweepResults, against=("scratch", "label_smoothing")) -> pd.DataFrame:
    """Each method's paired difference against each method of ``against`` that ran, setting
    by setting, as ``stats.comparison_frame`` (so ``stats.paired_t``) computes it: one row
    per (setting, reference, method), with the setting's name in words, the seeds both
    ran, mean_diff, ci_low, ci_high (95% CI over seeds; NaN for one seed) and p_value.
    A reference that ran as a variant (``label_smoothing[label_smoothing=0.2]``, a tuned
    run) stands for its method; a pair listed the other way round is turned round."""
    rows = []
    for setting, merged in res.settings.items():
        comp = comparison_frame(merged["metrics"], merged["predictions"])
        for ref in against:
            label = next((m for m in merged["metrics"] if m.split("[")[0] == ref), None)
            if label is None:
                continue
            for method in merged["metrics"]:
                hit = comp[(comp["method_a"] == method) & (comp["method_b"] == label)]
                flip = comp[(comp["method_a"] == label) & (comp["method_b"] == method)]
                if method == label or not (len(hit) or len(flip)):
                    continue
                r = hit.iloc[0] if len(hit) else flip.iloc[0]
                sign = 1 if len(hit) else -1
                low, high = (r["ci_low"], r["ci_high"]) if sign == 1 else (-r["ci_high"], -r["ci_low"])
                rows.append({"setting": setting, "name": res.names.get(setting, "all runs"), "reference": ref,
                             "method": method, "seeds": int(r["seeds"]), "mean_diff": sign * r["mean_diff"],
                             "ci_low": low, "ci_high": high, "p_value": r["p_value"]})
    return pd.DataFrame(rows, columns=["setting", "name", "reference", "method", "seeds", "mean_diff", "ci_low",
                                       "ci_high", "p_value"])


def setting_table(res: SweepResults) -> pd.DataFrame:
    """One row per (setting, method, metric): n seeds, mean, 95% CI."""
    rows = []
    for group, sub in res.frame.groupby(res.keys + ["method"], sort=False, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        for metric in METRICS:
            values = sub[metric].dropna()
            if len(values):
                rows.append({"setting": setting_label(sub["run"].iloc[0], res.variant_keys),
                             **dict(zip(res.keys + ["method"], group)),
                             "metric": metric, **mean_ci(values)})
    return pd.DataFrame(rows)


def differences(res: SweepResults) -> pd.DataFrame:
    """One row per (setting, pair of methods): paired t over seeds, McNemar, and the verdict."""
    frames = []
    for setting, merged in res.settings.items():
        comp = comparison_frame(merged["metrics"], merged["predictions"])
        if comp.empty:
            continue
        comp.insert(0, "pair", [f"{a} - {b}" for a, b in zip(comp["method_a"], comp["method_b"])])
        for key, value in reversed(list(zip(res.keys, setting))):
            comp.insert(0, key, value)
        frames.append(comp)
    if not frames:
        return pd.DataFrame()
    diffs = pd.concat(frames, ignore_index=True)
    # the word of every pair; Holm's p over the pairs the tables and verdicts read (``anchored``), the family
    diffs = read(diffs)
    shown = anchored(res, diffs).index
    diffs["p_holm"] = math.nan
    diffs.loc[shown, "p_holm"] = holm(diffs.loc[shown, "p_value"])
    diffs["verdict"] = [verdict(row) for _, row in diffs.iterrows()]
    return diffs


def anchored(res: SweepResults, diffs: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``differences`` that ``stats.anchored_pairs`` keeps, setting by setting."""
    if diffs.empty or not res.keys:
        return anchored_pairs(diffs)
    return pd.concat([anchored_pairs(group) for _, group in diffs.groupby(res.keys, sort=False, dropna=False)])


def verdict_lines(res: SweepResults, diffs: pd.DataFrame) -> list[str]:
    """'- beta=10: CAMKD vs vanilla: ...' per row of ``differences`` that compares a
    method with scratch or camkd (``anchored``)."""
    return [f"- {''.join(f'{k}={format_value(row[k])}, ' for k in res.keys)[:-2] or 'all runs'}: {row['verdict']}"
            for _, row in anchored(res, diffs).iterrows()]


def _cell(row, digits: int) -> str:
    """'91.04<br>(90.68 to 91.41)': the mean, its interval on a line of its own (a wide table fits its page)."""
    return cell(row["mean"], row["ci_low"], row["ci_high"], nbsp=True, sep=BR, digits=digits)


def wide_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per setting; a column per method and metric: 'mean (95% CI)'. With several
    keys, a setting is named in one column, as its run folders are (``setting_label``)."""
    table = table.assign(cell=[_cell(r, 2 if r["metric"] == "accuracy" else 3) for _, r in table.iterrows()],
                         column=[f"{method_words(m)} {METRICS[k]}" for m, k in zip(table["method"], table["metric"])])
    index = (["setting"] if len(keys) > 1 and "setting" in table else keys) or ["all"]
    seeds = table.groupby(index, sort=False)["n"].max().rename("seeds") if keys else None
    if not keys:
        table = table.assign(all="all runs")
    wide = table.pivot_table(index=index, columns="column", values="cell", aggfunc="first", sort=False)
    order = [c for m in sorted(dict.fromkeys(table["method"]), key=method_rank) for c in wide.columns
             if c.startswith(method_words(m) + " ")]
    wide = wide[list(dict.fromkeys(order))]
    wide.columns.name = None
    if seeds is not None:
        wide.insert(0, "seeds", seeds.reindex(wide.index).to_numpy())
    return wide.rename(index=lambda name: name.replace(",", ", ")) if index == ["setting"] else wide


def _diff_cell(row) -> str:
    """A read pair (``differences``): its cell, \\* by Holm's p, and its word."""
    text = cell(row["mean_diff"], row["ci_low"], row["ci_high"], row.get("p_holm"), row["seeds"], signed=True,
                escape=False, nbsp=True, sep=BR)
    return text + (f"{BR}{row['word']}" if isinstance(row.get("word"), str) else "")


def setting_label(run: str, variants=()) -> str:
    """A run's name without its ``seeds=...`` and ``methods=...`` parts (and those of the
    ``variants``' keys, which name a method's variant): the name of the setting it pools
    into (runs may split one setting's seeds, or its methods, between them)."""
    parts = "|".join(["seeds", "methods", *map(re.escape, variants)])
    return re.sub(rf"(^|,)({parts})=[^,]*", "", run).lstrip(",") or "base"


def run_table(res: SweepResults) -> pd.DataFrame:
    """One row per setting of a sweep of explicit runs, named after its runs (``seeds=`` and
    ``methods=`` dropped, so runs that split one setting's seeds or methods share a row), in the sweep file's
    order: mean accuracy (95% CI over seeds) per method, then the paired differences over
    seeds of every method against scratch, then of CAMKD against every method
    (``stats.anchored_pairs``: vanilla − scratch, CAMKD − vanilla, CAMKD − scratch for
    the book's three; mean, 95% CI; * where Holm's adjusted p < 0.05; the word of ``kdlib.analysis.cells``)."""
    table, diffs = setting_table(res), differences(res)
    rows = {}
    for run in dict.fromkeys(res.frame["run"]):
        label = setting_label(run, res.variant_keys)
        if label in rows:
            continue
        first = res.frame[res.frame["run"] == run].iloc[0]
        setting = {k: first[k] for k in res.keys}

        def pick(frame):
            mask = np.ones(len(frame), bool)
            for k, v in setting.items():
                mask &= (frame[k] == v).to_numpy()
            return frame[mask]

        own, pairs = pick(table), pick(diffs) if not diffs.empty else diffs
        row = {"setting": label, "seeds": int(own["n"].max())}
        for method in sorted(dict.fromkeys(own["method"]), key=method_rank):
            acc = own[(own["method"] == method) & (own["metric"] == "accuracy")]
            row[f"{method_words(method)} accuracy %"] = _cell(acc.iloc[0], 2)
        for _, pair in anchored_pairs(pairs).iterrows():
            row[f"{method_words(pair['method_a'])} − {method_words(pair['method_b'])}"] = _diff_cell(pair)
        rows[label] = row
    return pd.DataFrame(rows.values())


def run_markdown(sweep_dir: str | Path) -> str:
    """``run_table`` and the verdicts as markdown, for a README block (``python -m kdlib report --by-run``)."""
    sweep_dir = Path(sweep_dir)
    res = load(sweep_dir)
    table = run_table(res)
    labels = {tuple(row[k] for k in res.keys): setting_label(row["run"], res.variant_keys)
              for _, row in res.frame.iterrows()}
    lines = [f"Sweep `{sweep_dir.name}`: {len(table)} settings ({res.frame['run'].nunique()} runs), {res.eval_split} "
             "split, final epoch; accuracy as mean (95% CI over seeds); differences paired by seed, mean "
             "(95% CI), * where Holm's adjusted p < 0.05 over the differences shown (paired t), and read as ahead, "
             "behind, level (inside ±0.2 points) or undecided.", "",
             markdown_table(["", *(f"`{s}`" for s in table["setting"])],  # one column per setting: it fits the page
                            [[c, *table[c]] for c in table.columns if c != "setting"])]
    diffs = differences(res)
    if not diffs.empty:
        lines.append("")
        for _, row in anchored(res, diffs).iterrows():
            lines.append(f"- `{labels.get(tuple(row[k] for k in res.keys), 'all runs')}`: {row['verdict']}")
    if res.skipped:
        lines += ["", f"Not finished (left out): {', '.join(res.skipped)}."]
    return "\n".join(lines)


def markdown(sweep_dir: str | Path) -> str:
    """The sweep's table and verdicts as markdown, for a README block (``kdlib.publish.pages``)."""
    sweep_dir = Path(sweep_dir)
    res = load(sweep_dir)
    wide = wide_table(setting_table(res), res.keys).reset_index()
    lines = [f"Sweep `{sweep_dir.name}`: {len(res.frame['run'].unique())} runs, {res.eval_split} split; "
             "mean (95% CI over seeds), final epoch.", "",
             markdown_table(wide.columns, wide.itertuples(index=False))]
    diffs = differences(res)
    if not diffs.empty:
        lines.append("")
        lines += verdict_lines(res, diffs)
    if res.skipped:
        lines += ["", f"Not finished (left out): {', '.join(res.skipped)}."]
    return "\n".join(lines)


def differences_in_words(res: SweepResults, diffs: pd.DataFrame) -> pd.DataFrame:
    """The pairs ``anchored`` reads, one a row, for a reader: the setting and the pair in words, the
    difference with its interval, seeds, paired t and Holm's p, the reading, McNemar's p."""
    shown = anchored(res, diffs)
    return pd.DataFrame({
        "setting": [res.names.get(tuple(r[k] for k in res.keys), "all runs") for _, r in shown.iterrows()],
        "pair": [f"{method_words(a)} − {method_words(b)}" for a, b in zip(shown["method_a"], shown["method_b"])],
        "difference, points": [cell(r["mean_diff"], r["ci_low"], r["ci_high"], r["p_holm"], r["seeds"], signed=True,
                                    escape=False, sep=BR) for _, r in shown.iterrows()],
        "seeds": shown["seeds"].to_numpy(), "paired t p": shown["p_value"].to_numpy(),
        "Holm p": shown["p_holm"].to_numpy(), "reading": shown["word"].to_numpy(),
        "McNemar p": shown["mcnemar_p"].to_numpy()})


def label_words(res: SweepResults) -> dict[str, str]:
    """Each setting's label as its run folders name it (``setting_label``, with and without a space
    after each comma) -> the setting in words (``res.names``): a column header that wraps."""
    out = {}
    for _, r in res.frame.drop_duplicates("run").iterrows():
        label = setting_label(r["run"], res.variant_keys)
        words = res.names.get(tuple(r[k] for k in res.keys), label)
        out[label] = out[label.replace(",", ", ")] = words
    return out
