"""Figures of a run: the teachers, one method's training, the comparison of methods.

Inputs are the JSON written by ``kdlib.book.steps`` (``teachers.json``, ``metrics_<method>.json``).
Every plot function returns a ``matplotlib.figure.Figure`` made without pyplot, so
nothing is shown or left open behind your back: show one with ``display(fig)`` (or
by leaving it last in a notebook cell) and write it with ``save``.
Curves over several seeds are the mean, with the min-max range shaded.
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from .stats import mean_ci, mean_sd
from .sweep_results import KEYS, column_order
from .stats import NAMES, method_rank
from .sweep_results import SweepResults, forest_frame, load, method_words

COLUMNS = ["method", "seed", "epoch", "metric", "teacher", "value"]
SCALARS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")  # plus every loss_* term
PER_TEACHER = ("weight", "feat_weight")
SKIP_FIDELITY = ("pairwise_diversity",)
FINAL_SCALARS = ("centroid_fidelity", "mean_individual_fidelity", "centroid_agreement")
FINAL_PER_TEACHER = ("individual_fidelity", "top1_agreement")
METHOD_COLORS = {"camkd": "tab:blue", "vanilla": "tab:orange", "aver": "tab:brown", "ebkd": "tab:green",
                 "aekd": "tab:purple", "label_smoothing": "tab:olive", "scratch": "tab:gray"}
TERM_ORDER = ("loss_ce", "loss_kd", "loss_feat")
TEACHER_STYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1)))
TEACHER_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
ALL = "(all)"


# ---------------------------------------------------------------- tables
def _record_rows(rec: dict, names: list):
    """``(metric, teacher, value)`` triples of one epoch record."""
    for key, value in rec.items():
        if key in SCALARS or key.startswith("loss_"):
            yield key, None, value
        elif key in PER_TEACHER:
            yield from ((key, n, v) for n, v in zip(names, value, strict=True))
    for key, value in (rec.get("fidelity") or {}).items():
        if key in SKIP_FIDELITY:
            continue
        if isinstance(value, list):
            yield from ((key, n, v) for n, v in zip(names, value, strict=True))
        else:
            yield key, None, value


def history_frame(metrics_by_method: dict[str, dict]) -> pd.DataFrame:
    """Long table ``method, seed, epoch, metric, teacher, value`` of every epoch record.

    Metrics: train/test loss and accuracy, lr, every ``loss_*`` term, ``weight`` and
    ``feat_weight`` per teacher, and every fidelity metric but ``pairwise_diversity``
    (list-valued ones one row per teacher; ``teacher`` is None for the others).
    """
    rows = [(method, run["seed"], rec["epoch"], metric, teacher, float(value))
            for method, m in metrics_by_method.items() for run in m["runs"]
            for rec in run["history"] for metric, teacher, value in _record_rows(rec, m["teachers"])]
    return pd.DataFrame(rows, columns=COLUMNS)


def _final_fidelity(run: dict) -> dict:
    """The run's final fidelity, else that of its last epoch that has one."""
    if run.get("fidelity"):
        return run["fidelity"]
    return next((r["fidelity"] for r in reversed(run["history"]) if r.get("fidelity")), {})


def final_frame(metrics_by_method: dict[str, dict]) -> pd.DataFrame:
    """One row per (method, seed): final test_acc, fidelity scalars, and per-teacher
    columns ``individual_fidelity[<teacher>]`` and ``top1_agreement[<teacher>]``."""
    rows = []
    for method, m in metrics_by_method.items():
        for run in m["runs"]:
            fid = _final_fidelity(run)
            row = {"method": method, "seed": run["seed"], "test_acc": run["test_acc"]}
            row.update({k: fid.get(k, math.nan) for k in FINAL_SCALARS})
            for key in FINAL_PER_TEACHER:
                values = fid.get(key) or [math.nan] * len(m["teachers"])
                row.update({f"{key}[{n}]": v for n, v in zip(m["teachers"], values, strict=True)})
            rows.append(row)
    return pd.DataFrame(rows)


def _per_teacher_long(final: pd.DataFrame, key: str) -> pd.DataFrame:
    """``method, seed, teacher, value`` from the ``key[<teacher>]`` columns of ``final``."""
    cols = [c for c in final.columns if c.startswith(f"{key}[")]
    long = final.melt(id_vars=["method", "seed"], value_vars=cols, var_name="teacher")
    long["teacher"] = long["teacher"].str.slice(len(key) + 1, -1)
    return long.dropna(subset=["value"])


# ---------------------------------------------------------------- helpers
def palette(name: str, n: int | None = None) -> list[str]:
    """The first ``n`` colours (all, if None) of matplotlib's qualitative colormap ``name``,
    cycled past its end: seaborn's ``color_palette(name, n)``, without importing seaborn
    (and scipy.stats with it) in every kernel that only draws lines."""
    colors = [to_hex(c) for c in colormaps[name].colors]
    return [colors[i % len(colors)] for i in range(len(colors) if n is None else n)]


def method_colors(methods) -> dict:
    """Fixed colours for the known methods (``METHOD_COLORS``), the rest of tab10 for any other."""
    taken = {to_hex(c) for c in METHOD_COLORS.values()}
    spare = iter(c for c in palette("tab10") if c not in taken)
    return {m: METHOD_COLORS.get(m) or next(spare) for m in methods}


def _sel(hf: pd.DataFrame, metric: str, method=None, teacher=None) -> pd.DataFrame:
    keep = hf["metric"] == metric
    if method is not None:
        keep &= hf["method"] == method
    if teacher is not None:
        keep &= hf["teacher"] == teacher
    return hf[keep]


def _band(ax, df: pd.DataFrame, label, color, ls="-", marker="o", alpha=0.18) -> bool:
    """Mean of ``value`` over seeds per epoch, min-max shaded; False when ``df`` is empty."""
    if df.empty:
        return False
    g = df.groupby("epoch")["value"].agg(["mean", "min", "max"])
    ax.plot(g.index, g["mean"], linestyle=ls, color=color, label=label, marker=marker if len(g) <= 20 else None,
            ms=3.5, lw=1.5)
    if (g["max"] > g["min"]).any():
        ax.fill_between(g.index, g["min"], g["max"], color=color, alpha=alpha, lw=0)
    return True


def _style(ax, title, ylabel, legend=True, xlabel="epoch") -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    if xlabel == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
        lo, hi = ax.get_xlim()
        if hi - lo < 1:  # a single epoch
            ax.set_xlim(round((lo + hi) / 2) - 0.5, round((lo + hi) / 2) + 0.5)


def _lines(ax, hf, specs, title, ylabel, legend=True) -> None:
    """One band per ``(metric, method, teacher, label, color, linestyle[, marker])`` in ``specs``."""
    alpha = 0.18 if len(specs) <= 4 else 0.06  # many bands would stack into mud
    drawn = [_band(ax, _sel(hf, *spec[:3]), *spec[3:], alpha=alpha) for spec in specs]
    if not any(drawn):
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="gray")
    _style(ax, title, ylabel, legend)


def _log_if_wide(ax, ratio=30.0) -> None:
    """Log y-axis when the plotted positive values span more than ``ratio`` (symlog
    when some are zero, e.g. CAMKD's feature term in its first epoch)."""
    ys = np.concatenate([ln.get_ydata() for ln in ax.get_lines()] or [np.array([])]).astype(float)
    ys = ys[np.isfinite(ys)]
    pos = ys[ys > 0]
    if pos.size and pos.max() / pos.min() > ratio:
        if (ys <= 0).any():
            ax.set_yscale("symlog", linthresh=pos.min())
            ax.set_ylim(min(0.0, ys.min()), ys.max() * 1.5)
        else:
            ax.set_yscale("log")


def _zoom_ylim(ax, lo: float, hi: float) -> None:
    """A y-range around [lo, hi] (never below 0), so that bars a point apart look a
    point apart; room above for the bar labels."""
    pad = max(1.0, 0.25 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), hi + 1.5 * pad)


def _slant(ax, degrees=30) -> None:
    """x tick labels at an angle, each ending under its tick (long method names do not
    run into the next)."""
    ax.tick_params(axis="x", labelrotation=degrees)
    for label in ax.get_xticklabels():
        label.set(ha="right", rotation_mode="anchor")


def _text_panel(ax, text: str, title: str, size=8.5) -> None:
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    ax.text(0.0, 1.0, text, family="monospace", fontsize=size, va="top", ha="left", transform=ax.transAxes)


def _uses_teachers(hf: pd.DataFrame, method: str) -> bool:
    return not _sel(hf, "loss_kd", method).empty


# ---------------------------------------------------------------- teachers
TEACHER_TABLE = ["name", "labels", "params", "test_acc", "train_wrong", "confidently_wrong", "train_seconds"]


def teachers_table(teachers_json: dict) -> pd.DataFrame:
    """One row per teacher: its label changes ('true' for none), parameters, test
    accuracy, % of training images it gets wrong and confidently wrong (probability
    > 0.9) against the true labels (NaN in records made before these were kept), and
    training seconds."""
    recs = teachers_json["teachers"]
    table = pd.DataFrame(recs).reindex(columns=TEACHER_TABLE)
    table["labels"] = [label_changes(r.get("label_noise"), r.get("class_swap")) or "true" for r in recs]
    return table


def plot_teachers(teachers_json: dict) -> Figure:
    """Each teacher's test accuracy and loss per epoch, and a bar of its final test accuracy."""
    recs = teachers_json["teachers"]
    colors = dict(zip([t["name"] for t in recs], palette("Dark2", len(recs))))
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_acc, ax_loss, ax_bar = fig.subplots(1, 3)
    for t in recs:
        h = pd.DataFrame(t["history"])
        if h.empty:  # a teacher given as a checkpoint: scored, never trained here (its bar says so)
            continue
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "test_loss")):
            ax.plot(h["epoch"], h[key], marker="o", ms=3, color=colors[t["name"]], label=t["name"])
    _style(ax_acc, "Teachers: test accuracy", "accuracy (%)")
    _style(ax_loss, "Teachers: test loss", "cross-entropy")
    names = [t["name"] for t in recs]
    bars = ax_bar.bar(names, [t["test_acc"] for t in recs], color=[colors[n] for n in names])
    ax_bar.bar_label(bars, labels=[f"{t['test_acc']:.2f}%\n{t['params'] / 1e3:.0f}K params"
                                   + ("\ngiven, not trained" if t.get("given") else "") for t in recs],
                     fontsize=8, padding=2)
    accs = [t["test_acc"] for t in recs]
    _zoom_ylim(ax_bar, min(accs), max(accs))
    _style(ax_bar, "Teachers: final test accuracy (zoomed axis)", "accuracy (%)", legend=False, xlabel="")
    ax_bar.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"Teachers on {teachers_json.get('dataset', '?')} ({teachers_json.get('device', '?')})")
    return fig


# ---------------------------------------------------------------- one method
def _weights_panel(ax, hf, method, names, colors) -> None:
    """CAMKD's mean weight per teacher, the 1/M line of vanilla KD, or a note for scratch."""
    if not _sel(hf, "weight", method).empty:
        specs = [("weight", method, n, f"{n} (logit)", colors[n], "-") for n in names]
        specs += [("feat_weight", method, n, f"{n} (feature)", colors[n], "--") for n in names]
        _lines(ax, hf, specs, "Teacher weights (mean per epoch)", "weight")
        return
    if _uses_teachers(hf, method):
        ax.axhline(1 / len(names), color="k", ls="--", label=f"equal weights 1/M = {1 / len(names):.3f}")
        ax.set_ylim(0, min(1.0, 2.5 / len(names)))
    else:
        ax.text(0.5, 0.5, "no teachers used", ha="center", va="center", transform=ax.transAxes, fontsize=12)
    if not hf.empty:
        ax.set_xlim(hf["epoch"].min() - 0.1, hf["epoch"].max() + 0.1)
    _style(ax, "Teacher weights", "weight")


def _training_summary(metrics: dict, uses_teachers: bool) -> str:
    final = final_frame({metrics["method"]: metrics})
    hp = metrics.get("hparams", {})
    lines = [f"{metrics['method']} on {metrics.get('dataset', '?')}",
             f"seeds {[r['seed'] for r in metrics['runs']]}",
             f"student params {metrics.get('student_params', 0):,}",
             f"test acc       {mean_sd(final['test_acc'])} %",
             f"centroid KL    {mean_sd(final['centroid_fidelity'], 4)}",
             f"mean indiv KL  {mean_sd(final['mean_individual_fidelity'], 4)}",
             f"centroid agr.  {mean_sd(final['centroid_agreement'], 1)} %",
             "", f"{'teacher (mean)':<16}{'KL(T||S)':>9}{'top-1 %':>9}"]
    for n in metrics["teachers"]:
        lines.append(f"{n[:15]:<16}{final[f'individual_fidelity[{n}]'].mean():>9.3f}"
                     f"{final[f'top1_agreement[{n}]'].mean():>9.1f}")
    lines += ["", "epochs={student_epochs} lr={lr} {lr_schedule}".format_map(_Missing(hp))]
    if uses_teachers:
        lines.append("T={temperature} alpha={alpha} beta={beta}".format_map(_Missing(hp)))
    if metrics["method"] == "label_smoothing":
        lines.append("label_smoothing eps={label_smoothing}".format_map(_Missing(hp)))
    lines.append(f"train s/seed {mean_sd([r.get('train_seconds', r.get('seconds', math.nan)) for r in metrics['runs']], 1)}")
    return "\n".join(lines)


class _Missing(dict):
    def __missing__(self, key):
        return "?"


def plot_training(metrics: dict) -> Figure:
    """The seed kit's 9 panels for one method (3x3), mean over seeds with a min-max band."""
    method, names = metrics["method"], metrics["teachers"]
    hf = history_frame({method: metrics})
    tcol = dict(zip(names, palette("Dark2", len(names))))
    fig = Figure(figsize=(16, 12.5), layout="constrained")
    ax = fig.subplots(3, 3).ravel()
    _lines(ax[0], hf, [("train_loss", method, None, "train (total objective)", "tab:blue", "-"),
                       ("test_loss", method, None, "test (cross-entropy)", "tab:red", "-")], "Loss", "loss")
    _log_if_wide(ax[0])
    _lines(ax[1], hf, [("train_acc", method, None, "train", "tab:blue", "-"),
                       ("test_acc", method, None, "test", "tab:red", "-")], "Accuracy", "accuracy (%)")
    terms = sorted(hf.loc[hf["metric"].str.startswith("loss_"), "metric"].unique(),
                   key=lambda k: (TERM_ORDER.index(k) if k in TERM_ORDER else len(TERM_ORDER), k))
    _lines(ax[2], hf, [(k, method, None, k[5:], c, "-") for k, c in zip(terms, palette("Set1", 9))],
           "Loss terms (as weighted in the objective)", "loss")
    _log_if_wide(ax[2])
    _lines(ax[3], hf, [("individual_fidelity", method, n, n, tcol[n], "-") for n in names],
           "Individual fidelity", "KL(T_i || S)")
    _lines(ax[4], hf, [("centroid_fidelity", method, None, "centroid", "k", "-")], "Centroid fidelity",
           "KL(C || S)", legend=False)
    _lines(ax[5], hf, [("mean_individual_fidelity", method, None, "mean", "tab:purple", "-")],
           "Mean individual fidelity", "mean_i KL(T_i || S)", legend=False)
    _lines(ax[6], hf, [("top1_agreement", method, n, n, tcol[n], "-") for n in names]
           + [("centroid_agreement", method, None, "centroid", "k", "--")], "Top-1 agreement", "agreement (%)")
    _weights_panel(ax[7], hf, method, names, tcol)
    _text_panel(ax[8], _training_summary(metrics, _uses_teachers(hf, method)), "Final metrics")
    n = len(metrics["runs"])
    fig.suptitle(f"{method} on {metrics.get('dataset', '?')}: {n} seed{'s' * (n != 1)} "
                 f"(line = mean, band = min-max over seeds)")
    return fig


# ---------------------------------------------------------------- comparison
def _method_lines(ax, hf, methods, colors, metric, title, ylabel, teacher=None) -> None:
    _lines(ax, hf, [(metric, m, teacher, m, colors[m], "-") for m in methods], title, ylabel, legend=False)


def _compare_weights(ax, hf, metrics_by_method, colors) -> None:
    """CAMKD weights per teacher (line style per teacher), 1/M for vanilla, 0 for scratch."""
    for m, met in metrics_by_method.items():
        names = met["teachers"]
        if not _sel(hf, "weight", m).empty:
            for n, ls, mk in zip(names, TEACHER_STYLES * 3, TEACHER_MARKERS * 3):
                _band(ax, _sel(hf, "weight", m, n), f"{m}: {n}", colors[m], ls, mk)
        elif _uses_teachers(hf, m):
            ax.axhline(1 / len(names), color=colors[m], ls="--", label=f"{m}: 1/M = {1 / len(names):.3f}")
        else:
            ax.axhline(0, color=colors[m], ls=":", label=f"{m}: no teachers (0)")
    _style(ax, "Teacher weights (logit term)", "weight", legend=False)
    entries = len(ax.get_legend_handles_labels()[0])
    ax.legend(fontsize=7 if entries <= 6 else 6, ncols=1 if entries <= 6 else 2, loc="best", framealpha=0.8)


def _compare_final_acc(ax, final, methods, colors, teachers_json=None) -> None:
    """Bars of final test accuracy, mean ± std over seeds (teachers in grey when given)."""
    g = final.groupby("method", sort=False)["test_acc"].agg(["mean", "std"]).reindex(methods).fillna(0)
    labels, means, errs, cols = list(methods), list(g["mean"]), list(g["std"]), [colors[m] for m in methods]
    for t in (teachers_json or {}).get("teachers", []):
        labels.append(t["name"].replace("teacher_", "T:"))
        means.append(t["test_acc"])
        errs.append(0.0)
        cols.append("lightgray")
    bars = ax.bar(labels, means, yerr=errs, color=cols, capsize=4)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in means], fontsize=7, padding=2)
    _zoom_ylim(ax, min(np.subtract(means, errs)), max(np.add(means, errs)))
    _style(ax, "Final test accuracy (mean ± std, zoomed axis)", "accuracy (%)", legend=False, xlabel="")
    _slant(ax)


def _compare_fidelity_dist(ax, final, methods, colors) -> None:
    long = _per_teacher_long(final, "individual_fidelity")
    values = [long.loc[long["method"] == m, "value"].to_numpy() for m in methods]
    boxes = ax.boxplot(values, tick_labels=methods, patch_artist=True, showfliers=False, widths=0.6,
                       medianprops={"color": "k"})
    if len(methods) > 3:
        _slant(ax)
    for patch, m in zip(boxes["boxes"], methods):
        patch.set(facecolor=colors[m], alpha=0.5)
    rng = np.random.default_rng(0)
    for i, v in enumerate(values, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=12, color="k", zorder=3)
    _style(ax, "Final individual fidelity (teachers x seeds)", "KL(T_i || S)", legend=False, xlabel="")


def _compare_agreement(ax, final, methods, colors) -> None:
    long = _per_teacher_long(final, "top1_agreement")
    cent = final[["method", "seed", "centroid_agreement"]].rename(columns={"centroid_agreement": "value"})
    long = pd.concat([long, cent.assign(teacher="centroid")], ignore_index=True)
    import seaborn as sns  # here, not at the top: a kernel drawing only lines need not load it
    sns.barplot(data=long, x="teacher", y="value", hue="method", hue_order=methods, palette=colors,
                errorbar="sd", capsize=0.1, ax=ax, legend=False)
    g = long.groupby(["teacher", "method"])["value"].agg(["mean", "std"]).fillna(0.0)
    _zoom_ylim(ax, (g["mean"] - g["std"]).min(), min(100.0, (g["mean"] + g["std"]).max()))
    _style(ax, "Final top-1 agreement (mean ± std over seeds, zoomed axis)",
           "agreement (%)", legend=False, xlabel="")


def _compare_diversity(ax, final_fid: dict, methods, colors, names) -> None:
    """Filler for fewer than 3 teachers: KL(T_i || C) per teacher and method."""
    rows = [(m, n, v) for m in methods for n, v in zip(names, final_fid.get(m, {}).get("teacher_diversity", []))]
    df = pd.DataFrame(rows, columns=["method", "teacher", "value"])
    import seaborn as sns  # here, not at the top: a kernel drawing only lines need not load it
    sns.barplot(data=df, x="teacher", y="value", hue="method", hue_order=methods, palette=colors, ax=ax,
                legend=False)
    _style(ax, "Teacher diversity KL(T_i || C)", "KL", legend=False, xlabel="")


def _comparison_summary(final: pd.DataFrame, methods) -> str:
    w = max(10, max(map(len, methods), default=0) + 1)
    head = f"{'method':<{w}}{'seeds':>6}{'test acc %':>17}{'KL(C||S)':>19}{'mean KL(T||S)':>19}{'centroid agr %':>17}"
    lines = [head, "-" * len(head)]
    for m in methods:
        f = final[final["method"] == m]
        lines.append(f"{m:<{w}}{len(f):>6}{mean_sd(f['test_acc']):>17}{mean_sd(f['centroid_fidelity'], 4):>19}"
                     f"{mean_sd(f['mean_individual_fidelity'], 4):>19}{mean_sd(f['centroid_agreement'], 1):>17}")
    others = [m for m in methods if m != "camkd"]
    if "camkd" in methods and others:
        acc = final.groupby("method")["test_acc"].mean()
        gaps = ", ".join(f"{m} {acc[m] - acc['camkd']:+.2f}" for m in others)
        lines += [""] + textwrap.wrap(f"test acc minus camkd's (points, mean over seeds): {gaps}", len(head))
    return "\n".join(lines)


def plot_comparison(metrics_by_method: dict[str, dict], teachers_json: dict | None = None) -> Figure:
    """The seed kit's 14-panel comparison of methods (every method on every panel)."""
    methods = list(metrics_by_method)
    colors, hf, final = method_colors(methods), history_frame(metrics_by_method), final_frame(metrics_by_method)
    names = next(iter(metrics_by_method.values()))["teachers"] if methods else []
    final_fid = {m: _final_fidelity(met["runs"][-1]) for m, met in metrics_by_method.items() if met["runs"]}
    fig = Figure(figsize=(19, 16), layout="constrained")
    gs = fig.add_gridspec(4, 4)
    ax = [fig.add_subplot(gs[r, c]) for r in range(3) for c in range(4)]
    ax += [fig.add_subplot(gs[3, :2]), fig.add_subplot(gs[3, 2:])]

    def line(a, metric, title, ylabel, teacher=None):
        _method_lines(a, hf, methods, colors, metric, title, ylabel, teacher)

    line(ax[0], "test_acc", "Test accuracy", "accuracy (%)")
    for t, ls in zip((teachers_json or {}).get("teachers", []), TEACHER_STYLES[1:] * 3):
        ax[0].axhline(t["test_acc"], color="gray", ls=ls, lw=1, label=t["name"])
    if teachers_json:
        ax[0].legend(fontsize=7, loc="best")
    line(ax[1], "test_loss", "Test loss", "cross-entropy")
    line(ax[2], "train_acc", "Train accuracy", "accuracy (%)")
    line(ax[3], "centroid_agreement", "Top-1 agreement with the centroid", "agreement (%)")
    for i, a in enumerate(ax[4:7]):
        if i < len(names):
            line(a, "individual_fidelity", f"Individual fidelity: {names[i]}", "KL(T_i || S)", names[i])
        elif i == len(names):
            _compare_diversity(a, final_fid, methods, colors, names)
        else:
            line(a, "train_loss", "Train loss (total objective)", "loss")
    line(ax[7], "centroid_fidelity", "Centroid fidelity", "KL(C || S)")
    line(ax[8], "mean_individual_fidelity", "Average individual fidelity", "mean_i KL(T_i || S)")
    _compare_weights(ax[9], hf, metrics_by_method, colors)
    _compare_final_acc(ax[10], final, methods, colors, teachers_json)
    _compare_fidelity_dist(ax[11], final, methods, colors)
    _compare_agreement(ax[12], final, methods, colors)
    _text_panel(ax[13], _comparison_summary(final, methods),
                "Summary statistics (final epoch, mean ± std over seeds)", size=9.5)
    fig.legend([Line2D([], [], color=colors[m], lw=3) for m in methods], methods, loc="outside lower center",
               ncols=max(1, len(methods)), fontsize=11)
    seeds = sorted({r["seed"] for met in metrics_by_method.values() for r in met["runs"]})
    dataset = next(iter(metrics_by_method.values())).get("dataset", "?") if methods else "?"
    fig.suptitle(f"{' vs '.join(methods)} on {dataset}, seeds {seeds} (line = mean, band = min-max over seeds)",
                 fontsize=13)
    return fig


# ---------------------------------------------------------------- teacher weights
WEIGHT_COLUMNS = ["method", "seed", "teacher", "mean", "wrong", "right", "wrong_share"]


def weighting_methods(metrics_by_method: dict[str, dict]) -> list[str]:
    """The methods whose runs recorded per-image teacher weights (``teacher_weights``:
    their distiller returns some), in the given order."""
    return [m for m, met in metrics_by_method.items() if any(r.get("teacher_weights") for r in met["runs"])]


def label_changes(noise=None, swap=None) -> str:
    """A teacher's label changes in words: ``40% noise; swap 0-6, 2-4`` ('' for none)."""
    notes = [f"{100 * noise:g}% noise"] if noise else []
    if swap:
        notes.append("swap " + ", ".join(f"{a}-{b}" for a, b in swap))
    return "; ".join(notes)


def teacher_label(name: str, hparams: dict) -> str:
    """``name`` with its label changes, when it has any: ``teacher_resnet (40% noise)``."""
    notes = label_changes((hparams.get("teacher_label_noise") or {}).get(name),
                          (hparams.get("teacher_class_swap") or {}).get(name))
    return f"{name} ({notes})" if notes else name


def teacher_weights_frame(metrics_by_method: dict[str, dict]) -> pd.DataFrame:
    """One row per method, seed and teacher of every run with ``teacher_weights``: the
    mean weight over the training images, on those the teacher gets wrong and on those
    it gets right (NaN where there are none), and the % it gets wrong."""
    rows = []
    for method in weighting_methods(metrics_by_method):
        met = metrics_by_method[method]
        for run in met["runs"]:
            tw = run.get("teacher_weights")
            if not tw:
                continue
            for i, name in enumerate(met["teachers"]):
                rows.append((method, run["seed"], teacher_label(name, met.get("hparams", {})),
                             *(math.nan if tw[k][i] is None else tw[k][i] for k in WEIGHT_COLUMNS[3:])))
    return pd.DataFrame(rows, columns=WEIGHT_COLUMNS)


def teacher_weights_table(metrics_by_method: dict[str, dict]) -> pd.DataFrame:
    """``teacher_weights_frame`` averaged over seeds: one row per method and teacher."""
    frame = teacher_weights_frame(metrics_by_method)
    return frame.groupby(["method", "teacher"], sort=False)[WEIGHT_COLUMNS[3:]].mean().reset_index()


def plot_teacher_weights(metrics_by_method: dict[str, dict]) -> Figure:
    """Where a weighting method puts its weight. Left: its mean weight per teacher over
    the epochs (``weight`` in the history, mean over seeds, min-max band). Right: after
    training, one pass over the training images: each teacher's mean weight on the
    images it gets wrong (hatched) and right (solid), mean over seeds; a dashed line per
    method marks equal weights at its scale (the mean of its weights: 1/M for CAMKD).
    Only methods in ``weighting_methods``."""
    methods = weighting_methods(metrics_by_method)
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_epoch, ax_bar = fig.subplots(1, 2)
    if not methods:
        for ax in (ax_epoch, ax_bar):
            ax.text(0.5, 0.5, "no method with per-image teacher weights", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        return fig
    colors = method_colors(metrics_by_method)
    subset = {m: metrics_by_method[m] for m in methods}
    hf = history_frame(subset)
    specs = [("weight", m, n, f"{m}: {teacher_label(n, subset[m].get('hparams', {}))}", colors[m], ls, mk)
             for m in methods for n, ls, mk in zip(subset[m]["teachers"], TEACHER_STYLES * 3, TEACHER_MARKERS * 3)]
    _lines(ax_epoch, hf, specs, "Mean weight per teacher (training batches, per epoch)", "weight")
    frame = teacher_weights_frame(subset)
    g = frame.groupby(["teacher", "method"], sort=False)[["wrong", "right"]].mean()
    teachers = list(dict.fromkeys(frame["teacher"]))
    width = 0.8 / (2 * len(methods))
    for j, m in enumerate(methods):
        for k, (part, hatch) in enumerate((("wrong", "//"), ("right", None))):
            heights = [g[part].get((t, m), math.nan) for t in teachers]
            x = np.arange(len(teachers)) - 0.4 + width * (2 * j + k + 0.5)
            bars = ax_bar.bar(x, np.nan_to_num(heights), width, color=colors[m], alpha=0.55 if hatch else 0.9,
                              hatch=hatch, edgecolor="k", lw=0.5, label=f"{m}: teacher {part}")
            ax_bar.bar_label(bars, labels=["n/a" if math.isnan(h) else f"{h:.2f}" for h in heights], fontsize=7)
    for m in methods:  # equal weights at the method's own scale (CAMKD's sum to 1 per image, EBKD's to M - 1)
        level = frame.loc[frame["method"] == m, "mean"].mean()
        ax_bar.axhline(level, color=colors[m], ls="--", lw=1, label=f"{m}: equal weights ({level:.3f})")
    ax_bar.set_xticks(np.arange(len(teachers)), teachers)
    _style(ax_bar, "Mean weight where the teacher is wrong vs right (training images, after training)",
           "weight", xlabel="")
    ax_bar.tick_params(axis="x", labelrotation=10)
    fig.suptitle(f"Teacher weights of {', '.join(methods)} (mean over seeds)")
    return fig


# ---------------------------------------------------------------- diversity
def plot_diversity(pairwise, names, teacher_diversity=None) -> Figure:
    """Heatmap of pairwise KL(T_i || T_j) and, if given, a bar of KL(T_i || C)."""
    mat = np.asarray(pairwise, dtype=float)
    mat = np.where(np.abs(mat) < 1e-12, 0.0, mat)  # rounding leaves +-1e-19 on the diagonal
    fig = Figure(figsize=(6 + 0.6 * len(names) + (5 if teacher_diversity is not None else 0), 4.5 + 0.4 * len(names)),
                 layout="constrained")
    axes = fig.subplots(1, 2 if teacher_diversity is not None else 1, squeeze=False).ravel()
    import seaborn as sns  # here, not at the top: a kernel drawing only lines need not load it
    sns.heatmap(pd.DataFrame(mat, index=names, columns=names), annot=True, fmt=".3f", cmap="mako_r", square=True,
                ax=axes[0], cbar_kws={"label": "KL"})
    axes[0].set_title("Pairwise diversity KL(T_i || T_j)", fontsize=10)
    axes[0].set_xlabel("T_j")
    axes[0].set_ylabel("T_i")
    axes[0].tick_params(axis="x", labelrotation=20)
    axes[0].tick_params(axis="y", labelrotation=0)
    if teacher_diversity is not None:
        bars = axes[1].bar(names, teacher_diversity, color=palette("Dark2", len(names)))
        axes[1].bar_label(bars, fmt="%.3f", fontsize=8)
        _style(axes[1], "Teacher diversity KL(T_i || C)", "KL", legend=False, xlabel="")
        axes[1].tick_params(axis="x", labelrotation=20)
    return fig


# ---------------------------------------------------------------- explorer
def plot_metric(hf: pd.DataFrame, metric: str, teacher=None, methods=None) -> Figure:
    """One metric of a ``history_frame`` over epochs per method (and per teacher when
    the metric is per-teacher and ``teacher`` is None or ``"(all)"``)."""
    methods = list(methods if methods is not None else hf["method"].unique())
    colors = method_colors(hf["method"].unique())
    sub = _sel(hf, metric)
    teachers = [t for t in sub["teacher"].dropna().unique()] if teacher in (None, ALL) else [teacher]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    if not teachers:
        specs = [(metric, m, None, m, colors[m], "-") for m in methods]
    else:
        specs = [(metric, m, t, f"{m}: {t}", colors[m], ls, mk) for m in methods
                 for t, ls, mk in zip(teachers, TEACHER_STYLES * 3, TEACHER_MARKERS * 3)]
    _lines(ax, hf, specs, metric, metric)
    return fig


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def explorer(metrics_by_method: dict[str, dict]):
    """Interactive view: pick a metric, a teacher and methods; returns an ipywidgets VBox.

    The plot is a PNG in an ``ipywidgets.Image``: a bare Figure displayed inside an
    ``Output`` widget shows as ``<Figure size ...>`` text wherever no matplotlib
    formatter is registered (JupyterLab without pyplot imported)."""
    import ipywidgets as w

    hf = history_frame(metrics_by_method)
    metrics = sorted(hf["metric"].unique())
    metric = w.Dropdown(options=metrics, value="test_acc" if "test_acc" in metrics else metrics[0],
                        description="metric")
    teacher = w.Dropdown(options=[ALL] + list(hf["teacher"].dropna().unique()), description="teacher")
    methods = w.SelectMultiple(options=list(metrics_by_method), value=tuple(metrics_by_method),
                               description="methods", rows=min(7, max(1, len(metrics_by_method))))
    image = w.Image(format="png")

    def redraw(*_):
        teacher.disabled = bool(_sel(hf, metric.value)["teacher"].isna().all())
        image.value = png_bytes(plot_metric(hf, metric.value, teacher.value, methods.value))

    for control in (metric, teacher, methods):
        control.observe(redraw, names="value")
    redraw()
    box = w.VBox([w.HBox([metric, teacher, methods]), image])
    box.redraw = redraw
    return box


# ---------------------------------------------------------------- sweeps
def _t_interval(values):
    ci = mean_ci(values)
    return (ci["ci_low"], ci["ci_high"]) if len(values) > 1 else (ci["mean"], ci["mean"])


def plot_sweep(frame: pd.DataFrame, key: str, metric: str, ylabel: str) -> Figure:
    """``metric`` against the one key a sweep varies, one line per method: mean over seeds
    with a 95% t interval (a sweep that varies several keys: ``plot_forest``)."""
    colors = method_colors(frame["method"].unique())
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    import seaborn as sns  # here, not at the top: a kernel drawing only lines need not load it
    sns.lineplot(data=frame, x=key, y=metric, hue="method", palette=colors, marker="o", ax=ax,
                 errorbar=_t_interval, err_style="bars")
    if (frame[key] > 0).all() and frame[key].max() / frame[key].min() >= 20:
        ax.set_xscale("log")
    ax.set_xticks(sorted(frame[key].unique()))
    ax.set_xticklabels([f"{v:g}" for v in sorted(frame[key].unique())])
    _style(ax, f"{ylabel} against {key}", ylabel, legend=False, xlabel=key)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the data, not on it
    return fig


FOREST_ROW = 0.26  # inches per method row of a forest plot: 8 rows of 5 settings fit a page at 800 px


def _forest_order(res) -> list:
    """The settings of a sweep in reading order: a teacher-quality sweep's as its block puts
    them (``sweep_results.column_order``), any other in the sweep file's order."""
    settings = list(res.settings)
    if set(KEYS) & set(res.keys):
        settings.sort(key=lambda s: column_order(res.params[s]))
    return settings


def plot_forest(sweep, against=("scratch", "label_smoothing"), title: str | None = None) -> Figure:
    """A forest plot of a sweep: one row-block per setting (named in words, ``SweepResults.names``),
    one row per method, one column per method of ``against`` that ran; each dot is the
    method's paired difference in accuracy against that method over seeds, its bar the 95%
    CI (``sweep_results.forest_frame``: ``stats.paired_t``), a filled dot p < 0.05, and a
    line at zero. Every block lists its methods in the same order (``stats.METHOD_ORDER``) and
    colours (``METHOD_COLORS``; a method's variants share its colour, with another marker),
    each named in words (``sweep_results.method_words``: 'vanilla (T 1.05, alpha 0.111)').

    ``sweep``: a sweep folder or ``kdlib.analysis.sweep_results.load``'s results. Each line carries a
    ``gid`` — ``"ci|<setting name>|<method>|<reference>"`` for a bar, ``"mean|..."`` for its
    dot, ``"zero"`` for the zero line — so that a test can read back what was drawn."""

    res = sweep if isinstance(sweep, SweepResults) else load(sweep)
    frame = forest_frame(res, against)
    refs = [r for r in against if r in set(frame["reference"])]
    if not refs:
        raise ValueError(f"none of {', '.join(against)} ran in this sweep: nothing to draw differences against")
    methods = sorted({m for m in frame["method"] if m.split("[")[0] != refs[0]}, key=method_rank)
    colors = method_colors(dict.fromkeys(m.split("[")[0] for m in methods))
    markers = {}
    for m in methods:  # a method's variants: its colour, the next marker
        markers[m] = "oDs^vP"[sum(o.split("[")[0] == m.split("[")[0] for o in markers) % 6]
    span = {r: (min(0.0, frame.loc[frame["reference"] == r, ["mean_diff", "ci_low"]].min().min()),
                max(0.0, frame.loc[frame["reference"] == r, ["mean_diff", "ci_high"]].max().max())) for r in refs}
    blocks = [(s, [m for m in methods if m in res.settings[s]["metrics"]]) for s in _forest_order(res)]
    blocks = [(s, rows) for s, rows in blocks if rows]
    # one grid: a thin row for each setting's name across the columns, then its panels; the
    # panels of a column share their left edge and x range, whatever their methods' names
    heights = [h for _, rows in blocks for h in (0.9, len(rows) + 0.4)]
    fig = Figure(figsize=(8.0, FOREST_ROW * sum(heights) + 1.2), layout="constrained")
    grid = fig.add_gridspec(len(heights), len(refs), height_ratios=heights)
    for b, (setting, rows) in enumerate(blocks):
        name = res.names.get(setting, "all runs")
        head = fig.add_subplot(grid[2 * b, :])
        head.axis("off")
        head.text(0.0, 0.0, name, transform=head.transAxes, ha="left", va="bottom", fontsize=10,
                  fontweight="bold").set_in_layout(False)
        for c, ref in enumerate(refs):
            ax = fig.add_subplot(grid[2 * b + 1, c])
            own = frame[(frame["setting"] == setting) & (frame["reference"] == ref)].set_index("method")
            ax.axvline(0.0, color="black", lw=0.8, gid="zero")
            for y, m in enumerate(rows):
                color = colors[m.split("[")[0]]
                if m.split("[")[0] == ref:
                    ax.text(0.0, y, "the reference ", va="center", ha="right", fontsize=7.5, color="gray")
                    continue
                if m not in own.index:
                    continue
                r = own.loc[m]
                if not np.isnan(r["ci_low"]):
                    ax.plot([r["ci_low"], r["ci_high"]], [y, y], color=color, lw=2.2, solid_capstyle="butt",
                            gid=f"ci|{name}|{m}|{ref}")
                filled = r["seeds"] >= 2 and r["p_value"] < 0.05
                ax.plot([r["mean_diff"]], [y], marker=markers[m], ms=6, color=color, mec=color,
                        mfc=color if filled else "white", mew=1.5, linestyle="none", gid=f"mean|{name}|{m}|{ref}")
            low, high = span[ref]
            pad = 0.08 * (high - low or 1.0)
            ax.set_xlim(low - pad, high + pad)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_yticks(range(len(rows)), [method_words(m) for m in rows] if c == 0 else [])
            ax.tick_params(labelsize=8)
            ax.grid(axis="x", alpha=0.3)
            if b == 0:
                ax.set_title(f"method − {NAMES.get(ref, ref)}", fontsize=9)
            if b == len(blocks) - 1:
                ax.set_xlabel(f"{res.eval_split} accuracy, points", fontsize=9)
    fig.suptitle(title or "Paired difference in accuracy over seeds, 95% CI (filled: paired t p < 0.05)",
                 fontsize=10)
    return fig


# ---------------------------------------------------------------- files
MAX_PNG_BYTES = 400_000


def save(fig: Figure, path, dpi: int = 110) -> Path:
    """Write ``fig`` (format by the suffix) at ``dpi``, then close it. A figure with a layout
    engine (every figure of kdlib: constrained layout) already fits its page and is saved as
    laid out; any other gets a tight box (measuring it took a quarter of the 9-panel figure's
    save).
    A PNG over ``MAX_PNG_BYTES`` is rewritten with a 256-colour palette."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches=None if fig.get_layout_engine() is not None else "tight",
                facecolor="white")
    plt.close(fig)
    if path.suffix.lower() == ".png" and path.stat().st_size > MAX_PNG_BYTES:
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(256)
        small.save(path, optimize=True)
    return path
