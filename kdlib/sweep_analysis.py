"""What a sweep found, read from its folder (``sweep.yaml`` and each finished run's record).

A *setting* is one combination of the keys that vary across the sweep's runs (``seeds``
and ``methods`` excepted: runs that differ only in seeds pool into one setting, and
methods are the columns). Per setting and method: final accuracy and centroid fidelity
KL(C||S) as mean and 95% t interval over seeds (``stats.mean_ci``); per setting the
paired differences camkd - vanilla, camkd - scratch, vanilla - scratch over seeds, with
McNemar on per-image correctness (``stats.comparison_frame``) and a plain verdict.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .stats import NAMES, comparison_frame, mean_ci, verdict
from .sweep import format_value

METHOD_ORDER = ["camkd", "vanilla", "scratch"]  # pairs come out as camkd - vanilla, camkd - scratch, vanilla - scratch
NOT_SETTING = {"run_dir", "threads", "seeds", "methods"}
METRICS = {"accuracy": "accuracy %", "centroid_fidelity": "KL(C‖S)"}


@dataclass
class SweepResults:
    keys: list[str]                  # the keys that vary, in the sweep file's order
    frame: pd.DataFrame              # one row per (run, method, seed)
    settings: dict = field(default_factory=dict)  # setting tuple -> {"metrics": {...}, "predictions": {...}}
    skipped: list[str] = field(default_factory=list)  # runs without a finished record
    eval_split: str = "test"


def _value(v):
    return format_value(v) if isinstance(v, list) else v


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
    named = list(dict.fromkeys(k for run in order for k in run["overrides"]))
    keys = [k for k in named + [k for k in next(iter(params.values())) if k not in named]
            if k not in NOT_SETTING and len({json.dumps(p.get(k)) for p in params.values()}) > 1]
    rows, settings, splits = [], {}, set()
    for name, P in params.items():
        setting = tuple(_value(P.get(k)) for k in keys)
        merged = settings.setdefault(setting, {"metrics": {}, "predictions": {}})
        with np.load(sweep_dir / name / "predictions.npz") as npz:
            merged["predictions"].update(dict(npz))
        for method in P["methods"]:
            metrics = json.loads((sweep_dir / name / f"metrics_{method}.json").read_text())
            splits.add(metrics.get("eval_split", "test"))
            merged["metrics"].setdefault(method, {"runs": []})["runs"].extend(metrics["runs"])
            for r in metrics["runs"]:
                rows.append({"run": name, **dict(zip(keys, setting)), "method": method, "seed": r["seed"],
                             "accuracy": r["test_acc"],
                             "centroid_fidelity": (r.get("fidelity") or {}).get("centroid_fidelity")})
    for merged in settings.values():  # methods in the canonical order, whatever order the runs listed them
        merged["metrics"] = {m: merged["metrics"][m] for m in sorted(merged["metrics"], key=_method_rank)}
    return SweepResults(keys, pd.DataFrame(rows), settings, skipped, "/".join(sorted(splits)))


def _method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def setting_table(res: SweepResults) -> pd.DataFrame:
    """One row per (setting, method, metric): n seeds, mean, 95% CI."""
    rows = []
    for group, sub in res.frame.groupby(res.keys + ["method"], sort=False, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        for metric in METRICS:
            values = sub[metric].dropna()
            if len(values):
                rows.append({**dict(zip(res.keys + ["method"], group)), "metric": metric, **mean_ci(values)})
    return pd.DataFrame(rows)


def differences(res: SweepResults) -> pd.DataFrame:
    """One row per (setting, pair of methods): paired t over seeds, McNemar, and the verdict."""
    frames = []
    for setting, merged in res.settings.items():
        comp = comparison_frame(merged["metrics"], merged["predictions"])
        if comp.empty:
            continue
        comp.insert(0, "pair", [f"{a} - {b}" for a, b in zip(comp["method_a"], comp["method_b"])])
        comp["verdict"] = [verdict(row) for _, row in comp.iterrows()]
        for key, value in reversed(list(zip(res.keys, setting))):
            comp.insert(0, key, value)
        frames.append(comp)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def verdict_lines(res: SweepResults, diffs: pd.DataFrame) -> list[str]:
    """'- beta=10: CAMKD vs vanilla: ...' per row of ``differences``."""
    return [f"- {''.join(f'{k}={format_value(row[k])}, ' for k in res.keys)[:-2] or 'all runs'}: {row['verdict']}"
            for _, row in diffs.iterrows()]


def _cell(row, digits: int) -> str:
    if np.isnan(row["ci_low"]):
        return f"{row['mean']:.{digits}f}"
    return f"{row['mean']:.{digits}f} ({row['ci_low']:.{digits}f} to {row['ci_high']:.{digits}f})"


def wide_table(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per setting; a column per method and metric: 'mean (95% CI)'."""
    table = table.assign(cell=[_cell(r, 2 if r["metric"] == "accuracy" else 3) for _, r in table.iterrows()],
                         column=[f"{NAMES.get(m, m)} {METRICS[k]}" for m, k in zip(table["method"], table["metric"])])
    seeds = table.groupby(keys, sort=False)["n"].max().rename("seeds") if keys else None
    index = keys or ["all"]
    if not keys:
        table = table.assign(all="all runs")
    wide = table.pivot_table(index=index, columns="column", values="cell", aggfunc="first", sort=False)
    order = [c for m in sorted(dict.fromkeys(table["method"]), key=_method_rank) for c in wide.columns
             if c.startswith(NAMES.get(m, m) + " ")]
    wide = wide[list(dict.fromkeys(order))]
    wide.columns.name = None
    if seeds is not None:
        wide.insert(0, "seeds", seeds.reindex(wide.index).to_numpy())
    return wide


def markdown(sweep_dir: str | Path) -> str:
    """The sweep's table and verdicts as markdown, for a README block (``kdlib.report``)."""
    sweep_dir = Path(sweep_dir)
    res = load(sweep_dir)
    wide = wide_table(setting_table(res), res.keys).reset_index()
    lines = [f"Sweep `{sweep_dir.name}`: {len(res.frame['run'].unique())} runs, {res.eval_split} split; "
             "mean (95% CI over seeds), final epoch.", "",
             "| " + " | ".join(map(str, wide.columns)) + " |", "|" + "---|" * len(wide.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
    diffs = differences(res)
    if not diffs.empty:
        lines.append("")
        lines += verdict_lines(res, diffs)
    if res.skipped:
        lines += ["", f"Not finished (left out): {', '.join(res.skipped)}."]
    return "\n".join(lines)
