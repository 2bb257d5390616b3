"""kdlib.analysis.plots on synthetic metrics (no training): tables, panel counts, files, widget."""
import ast
import inspect

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kdlib.analysis import plots  # noqa: E402

TEACHERS = ["t_a", "t_b", "t_c"]
METHODS = ["camkd", "vanilla", "scratch"]
SEEDS = [0, 1]
EPOCHS = 3


def fidelity(k: float, m: int = 3) -> dict:
    """A fidelity record whose every value is a distinct function of ``k``."""
    return {"individual_fidelity": [k + 0.1 * (i + 1) for i in range(m)],
            "mean_individual_fidelity": k + 0.2, "centroid_fidelity": k + 0.05,
            "teacher_diversity": [0.01 * (i + 1) for i in range(m)],
            "pairwise_diversity": [[abs(i - j) * 0.5 for j in range(m)] for i in range(m)],
            "top1_agreement": [50 + k + i for i in range(m)], "centroid_agreement": 80 + k}


def make_metrics(method: str, seeds=SEEDS, epochs=EPOCHS, teachers=TEACHERS, fidelity_every=1) -> dict:
    """A ``metrics_<method>.json``-shaped dict (camkd: weights, feat_weight from epoch 2)."""
    m, runs = len(teachers), []
    for seed in seeds:
        history = []
        for e in range(1, epochs + 1):
            k = METHODS.index(method) + seed + e / 10
            rec = {"epoch": e, "lr": 1e-3 / e, "train_loss": 2 / e + k, "train_acc": 50 + e + k,
                   "test_loss": 1.5 / e + k, "test_acc": 60 + e + k, "epoch_seconds": 0.1, "loss_ce": 1 / e}
            if method != "scratch":
                rec["loss_kd"] = 0.1 * e
            if method == "camkd":
                rec["loss_feat"] = 0.0 if e == 1 else 5.0 / e
                rec["weight"] = [(i + 1) / (m * (m + 1) / 2) for i in range(m)]
                if e >= 2:
                    rec["feat_weight"] = [1 / m] * m
            if e % fidelity_every == 0 or e == epochs:
                rec["fidelity"] = fidelity(k, m)
            history.append(rec)
        runs.append({"seed": seed, "test_acc": history[-1]["test_acc"], "fidelity": history[-1]["fidelity"],
                     "history": history, "seconds": 1.5 + seed})
    return {"method": method, "dataset": "Synthetic", "teachers": list(teachers), "student_params": 1234,
            "hparams": {"temperature": 4.0, "alpha": 0.7, "beta": 100.0, "student_epochs": epochs, "lr": 1e-3,
                        "lr_schedule": "cosine"}, "runs": runs}


def make_all(**kw) -> dict:
    return {method: make_metrics(method, **kw) for method in METHODS}


def make_teachers(teachers=TEACHERS, epochs=2) -> dict:
    return {"dataset": "Synthetic", "device": "cpu",
            "teachers": [{"name": n, "params": 1000 * (i + 1), "test_acc": 90 + i,
                          "history": [{"epoch": e, "test_acc": 80 + e + i, "test_loss": 1 / e, "train_acc": 70.0,
                                       "train_loss": 1.0, "lr": 1e-3, "epoch_seconds": 0.1, "loss_ce": 1.0}
                                      for e in range(1, epochs + 1)],
                          "checkpoint": f"/x/{n}.pt", "sha256": "0" * 64, "seconds": 1.0}
                         for i, n in enumerate(teachers)]}


def panels(fig: Figure) -> list:
    """The figure's axes, colorbars left out."""
    return [a for a in fig.axes if not hasattr(a, "_colorbar")]


# ---------------------------------------------------------------- tables
def expected_rows_per_epoch(method: str, epoch: int, m: int = 3) -> int:
    scalars = 5  # train/test loss and accuracy, lr
    losses = {"camkd": 3, "vanilla": 2, "scratch": 1}[method]
    weights = m * (method == "camkd") + m * (method == "camkd" and epoch >= 2)
    fid = 3 + 3 * m  # 3 scalars; individual_fidelity, teacher_diversity, top1_agreement per teacher
    return scalars + losses + weights + fid


def test_history_frame_columns_and_counts():
    hf = plots.history_frame(make_all())
    assert list(hf.columns) == ["method", "seed", "epoch", "metric", "teacher", "value"]
    for method in METHODS:
        want = len(SEEDS) * sum(expected_rows_per_epoch(method, e) for e in range(1, EPOCHS + 1))
        assert (hf["method"] == method).sum() == want, method
    assert "pairwise_diversity" not in set(hf["metric"])
    assert "epoch_seconds" not in set(hf["metric"])
    assert {"loss_ce", "loss_kd", "loss_feat", "weight", "feat_weight", "top1_agreement"} <= set(hf["metric"])
    assert hf.loc[hf["metric"] == "test_acc", "teacher"].isna().all()
    per_teacher = hf[hf["metric"] == "individual_fidelity"]
    assert set(per_teacher["teacher"]) == set(TEACHERS)
    assert len(hf.drop_duplicates(["method", "seed", "epoch", "metric", "teacher"])) == len(hf)


def test_history_frame_values_match_input():
    metrics = make_all()
    hf = plots.history_frame(metrics).set_index(["method", "seed", "epoch", "metric", "teacher"])["value"]
    rec = metrics["camkd"]["runs"][1]["history"][1]  # seed 1, epoch 2
    assert hf[("camkd", 1, 2, "individual_fidelity", "t_b")] == rec["fidelity"]["individual_fidelity"][1]
    assert hf[("camkd", 1, 2, "feat_weight", "t_c")] == rec["feat_weight"][2]
    scalar = plots.history_frame(metrics)
    row = scalar[(scalar.method == "vanilla") & (scalar.seed == 0) & (scalar.epoch == 3)
                 & (scalar.metric == "test_acc")]
    assert row["value"].item() == metrics["vanilla"]["runs"][0]["history"][2]["test_acc"]


def test_history_frame_skips_epochs_without_fidelity():
    hf = plots.history_frame({"vanilla": make_metrics("vanilla", fidelity_every=2)})
    epochs = set(hf.loc[hf["metric"] == "centroid_fidelity", "epoch"])
    assert epochs == {2, 3}


def test_final_frame_equals_inputs():
    metrics = make_all()
    ff = plots.final_frame(metrics)
    assert len(ff) == len(METHODS) * len(SEEDS)
    for col in ["method", "seed", "test_acc", "centroid_fidelity", "mean_individual_fidelity", "centroid_agreement"]:
        assert col in ff.columns
    for method in METHODS:
        for run in metrics[method]["runs"]:
            row = ff[(ff["method"] == method) & (ff["seed"] == run["seed"])].iloc[0]
            assert row["test_acc"] == run["test_acc"]
            for key in ("centroid_fidelity", "mean_individual_fidelity", "centroid_agreement"):
                assert row[key] == run["fidelity"][key]
            for i, t in enumerate(TEACHERS):
                assert row[f"individual_fidelity[{t}]"] == run["fidelity"]["individual_fidelity"][i]
                assert row[f"top1_agreement[{t}]"] == run["fidelity"]["top1_agreement"][i]


def test_final_frame_falls_back_to_last_epoch_with_fidelity():
    m = make_metrics("scratch")
    m["runs"][0]["fidelity"] = None
    m["runs"][0]["history"][-1].pop("fidelity")
    ff = plots.final_frame({"scratch": m})
    assert ff.loc[0, "centroid_fidelity"] == m["runs"][0]["history"][-2]["fidelity"]["centroid_fidelity"]


# ---------------------------------------------------------------- figures
@pytest.mark.parametrize("method", METHODS)
def test_plot_training_has_nine_panels(method):
    fig = plots.plot_training(make_metrics(method))
    assert isinstance(fig, Figure)
    assert len(panels(fig)) == 9
    assert method in fig._suptitle.get_text() and "2 seeds" in fig._suptitle.get_text()


def test_plot_comparison_has_fourteen_panels():
    fig = plots.plot_comparison(make_all(), make_teachers())
    assert len(panels(fig)) == 14
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == METHODS


@pytest.mark.parametrize("teachers", [["t_a", "t_b"], ["t_a", "t_b", "t_c", "t_d"]])
def test_plot_comparison_other_teacher_counts(teachers):
    metrics = {m: make_metrics(m, seeds=[0], teachers=teachers) for m in METHODS}
    assert len(panels(plots.plot_comparison(metrics))) == 14


def test_plot_teachers_bars_are_the_final_accuracies():
    teachers = make_teachers()
    ax_acc, _, ax_bar = panels(plots.plot_teachers(teachers))
    heights = [b.get_height() for b in ax_bar.patches]
    assert heights == [t["test_acc"] for t in teachers["teachers"]]
    assert [t.get_text() for t in ax_bar.get_xticklabels()] == TEACHERS
    # the curves are the histories, one line per teacher, in order
    for line, t in zip(ax_acc.get_lines(), teachers["teachers"]):
        assert list(line.get_ydata()) == [h["test_acc"] for h in t["history"]]


def test_diversity_heatmap_rows_are_T_i_columns_T_j():
    """An asymmetric KL matrix must be drawn with row i = KL(T_i || .), not transposed."""
    pairwise = [[0.0, 0.1, 0.2], [0.7, 0.0, 0.3], [0.9, 0.5, 0.0]]
    fig = plots.plot_diversity(pairwise, TEACHERS, [0.01, 0.02, 0.03])
    heat, bars = panels(fig)
    drawn = heat.collections[0].get_array().reshape(3, 3)
    assert drawn.tolist() == pairwise
    assert [t.get_text() for t in heat.get_yticklabels()] == TEACHERS
    assert (heat.get_ylabel(), heat.get_xlabel()) == ("T_i", "T_j")
    cells = {t.get_text() for t in heat.texts}
    assert {"0.700", "0.100"} <= cells
    assert [b.get_height() for b in bars.patches] == [0.01, 0.02, 0.03]
    assert len(panels(plots.plot_diversity(pairwise, TEACHERS))) == 1


def test_save_writes_small_png(tmp_path):
    path = plots.save(plots.plot_comparison(make_all(), make_teachers()), tmp_path / "sub" / "cmp.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 1000 < len(data) < 400_000


def test_save_keeps_a_laid_out_figure_at_its_size_and_crops_any_other(tmp_path):
    """Constrained layout already fits the page, so no tight box is measured: the PNG is the
    page's own size. A figure without a layout engine gets a tight box: cropped."""
    from PIL import Image
    from matplotlib.figure import Figure
    for layout in ("constrained", None):
        fig = Figure(figsize=(4, 3), layout=layout)
        fig.subplots().plot([0, 1], [0, 1])
        size = Image.open(plots.save(fig, tmp_path / f"{layout}.png", dpi=50)).size
        if layout:
            assert size == (200, 150)
        else:
            assert size[0] < 200 and size[1] < 150, size


# ---------------------------------------------------------------- explorer
def test_plots_does_not_import_ipywidgets_at_module_level():
    tree = ast.parse(inspect.getsource(plots))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(str(n).startswith(("ipywidgets", "IPython")) for n in names)


def test_explorer_returns_widget():
    widgets = pytest.importorskip("ipywidgets")
    box = plots.explorer(make_all())
    assert isinstance(box, widgets.Widget)
    metric, teacher, methods = box.children[0].children
    image = box.children[1]
    assert isinstance(image, widgets.Image) and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    shown = [image.value]
    metric.value = "individual_fidelity"
    assert not teacher.disabled
    teacher.value = "t_b"
    methods.value = ("camkd",)
    metric.value = "test_acc"
    assert teacher.disabled
    shown.append(image.value)
    metric.value = "test_loss"
    shown.append(image.value)
    assert len(set(shown)) == 3, "each selection redraws the image"


def bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches if p.get_height() > 0]


def test_accuracy_bars_zoom_to_the_differences():
    """Bars a point apart must look a point apart: no 0-100 axis for accuracies near 92."""
    teachers = make_teachers()
    for t, acc in zip(teachers["teachers"], (92.1, 93.1, 92.6)):
        t["test_acc"] = acc
    ax_bar = plots.plot_teachers(teachers).axes[2]
    lo, hi = ax_bar.get_ylim()
    assert 85 < lo < 92.1 and 93.1 < hi < 100
    assert (93.1 - 92.1) / (hi - lo) > 0.1, "a one-point gap fills over a tenth of the axis"
    fig = plots.plot_comparison(make_all(), teachers)
    for ax in (fig.axes[10], fig.axes[12]):  # final accuracy; top-1 agreement
        lo, hi = ax.get_ylim()
        heights = bar_heights(ax)
        assert lo > 0.5 * min(heights) and max(heights) < hi, ax.get_title()


def test_plot_metric_lines():
    hf = plots.history_frame(make_all())
    fig = plots.plot_metric(hf, "individual_fidelity", methods=["camkd", "vanilla"])
    assert len(fig.axes[0].get_lines()) == 2 * len(TEACHERS)
    assert len(plots.plot_metric(hf, "test_acc").axes[0].get_lines()) == len(METHODS)


# ---------------------------------------------------------------- the forest plot of a sweep
SWAP = {"teacher_resnet": [[0, 6], [2, 4]]}
SCRATCH = {0: 80.0, 1: 82.0, 2: 81.0}
SHIFTS = {"camkd": {0: -1.0, 1: -2.0, 2: -0.5}, "vanilla": {0: 0.2, 1: -0.1, 2: 0.4},
          "label_smoothing": {0: 0.5, 1: 0.3, 2: 0.7}, "camkd[beta=0]": {0: 0.9, 1: 1.5, 2: 1.2}}


def forest_sweep(folder, scratch=SCRATCH):
    """A sweep over teacher quality with known accuracies: in each of two settings (the shipped
    teachers, a swapped resnet) four methods with every seed, and CAMKD with beta 0 in runs of
    its own; each method = scratch + SHIFTS (one point lower with the swapped resnet)."""
    from conftest import write_sweep
    runs, acc = [], {}
    for swap, drop in (({}, 0.0), (SWAP, 1.0)):
        by = {m: {s: SCRATCH[s] + d - drop * (m != "label_smoothing") for s, d in SHIFTS[m].items()}
              for m in ("camkd", "vanilla", "label_smoothing")}
        by["scratch"] = dict(scratch)
        runs.append(({"teacher_class_swap": swap, "methods": list(by), "seeds": [0, 1, 2]}, by))
        variant = {s: SCRATCH[s] + d - drop for s, d in SHIFTS["camkd[beta=0]"].items()}
        runs.append(({"teacher_class_swap": swap, "methods": ["camkd"], "beta": 0.0, "seeds": [0, 1, 2]},
                     {"camkd": variant}))
        acc["swapped resnet" if swap else "shipped"] = {**by, "camkd[beta=0]": variant}
    write_sweep(folder, runs)
    return acc


def drawn_intervals(fig) -> dict:
    """{(setting, method, reference): (ci_low, ci_high)} as the figure draws them."""
    out = {}
    for ax in fig.axes:
        for line in ax.lines:
            if (line.get_gid() or "").startswith("ci|"):
                _, setting, method, ref = line.get_gid().split("|")
                x = line.get_xdata()
                out[(setting, method, ref)] = (min(x), max(x))
    return out


def expected_intervals(acc) -> dict:
    from kdlib.analysis.stats import paired_t
    out = {}
    for setting, by in acc.items():
        for ref in ("scratch", "label_smoothing"):
            for method in by:
                if method not in (ref, "scratch"):
                    t = paired_t([by[method][s] for s in (0, 1, 2)], [by[ref][s] for s in (0, 1, 2)])
                    out[(setting, method, ref)] = (t["ci_low"], t["ci_high"])
    return out


def assert_same_intervals(drawn, expected):
    assert set(drawn) == set(expected), "one bar per method, reference and setting"
    for key, ends in expected.items():
        assert drawn[key] == pytest.approx(ends, abs=1e-9), key


def test_forest_plot_draws_the_paired_intervals_of_kdlib_stats(tmp_path):
    acc = forest_sweep(tmp_path)
    fig = plots.plot_forest(tmp_path)
    assert_same_intervals(drawn_intervals(fig), expected_intervals(acc))
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert len(panels) == 4 and all(ax.get_legend() is None for ax in fig.axes)
    assert all(any(line.get_gid() == "zero" and list(line.get_xdata()) == [0, 0] for line in ax.lines)
               for ax in panels)
    heads = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_fontweight() == "bold"]
    assert heads == ["shipped", "swapped resnet"]  # the settings in words, shipped first
    order = ["CAMKD", "CAMKD (beta 0)", "vanilla", "label smoothing"]
    assert all([t.get_text() for t in ax.get_yticklabels()] == order for ax in panels[::2])  # one order everywhere
    colors = {}
    for ax in panels:
        for line in ax.lines:
            if (line.get_gid() or "").startswith("mean|"):
                colors.setdefault(line.get_gid().split("|")[2], set()).add(line.get_color())
    assert all(len(c) == 1 for c in colors.values()) and colors["camkd"] == colors["camkd[beta=0]"]
    assert fig.get_figwidth() * 110 <= 900  # the site's content width, at plots.save's dpi


def test_forest_plot_check_fails_when_the_seeds_are_paired_wrongly(tmp_path):
    """The same means, scratch's seeds shuffled: each mean difference is unchanged, its
    interval is not, and the check above notices."""
    acc = forest_sweep(tmp_path / "right")
    forest_sweep(tmp_path / "shuffled", scratch={0: 82.0, 1: 81.0, 2: 80.0})
    with pytest.raises(AssertionError):
        assert_same_intervals(drawn_intervals(plots.plot_forest(tmp_path / "shuffled")), expected_intervals(acc))


def test_forest_plot_needs_a_reference(tmp_path):
    from conftest import write_sweep
    write_sweep(tmp_path, [({"methods": ["camkd", "vanilla"], "beta": b, "seeds": [0]},
                            {"camkd": {0: 80.0 + b}, "vanilla": {0: 81.0}}) for b in (1.0, 2.0)])
    with pytest.raises(ValueError, match="scratch, label_smoothing"):
        plots.plot_forest(tmp_path)


def test_sweep_runs_are_named_in_words(tmp_path):
    from kdlib.analysis.sweep_results import run_titles
    forest_sweep(tmp_path)
    titles = {" · ".join(t) for t in run_titles(tmp_path).values()}
    assert titles == {"shipped · CAMKD, vanilla, label smoothing, scratch · seeds 0, 1, 2",
                      "shipped · CAMKD (beta 0) · seeds 0, 1, 2",
                      "swapped resnet · CAMKD, vanilla, label smoothing, scratch · seeds 0, 1, 2",
                      "swapped resnet · CAMKD (beta 0) · seeds 0, 1, 2"}


def test_a_sweeps_runs_table_names_each_run_in_words_in_the_sweep_files_order(tmp_path):
    """04's and 05's table of runs: setting and run in words, status and minutes from sweep.json,
    the folder last; a run still pending has no minutes; a sweep not started has no rows."""
    import json
    from kdlib.analysis.sweep_results import runs_frame
    assert runs_frame(tmp_path / "none").empty
    forest_sweep(tmp_path)
    record = json.loads((tmp_path / "sweep.json").read_text())
    last = list(record["runs"])[-1]
    record["runs"][last] = {"status": "pending", "seconds": None, "error": None}
    (tmp_path / "sweep.json").write_text(json.dumps(record))
    frame = runs_frame(tmp_path)
    assert list(frame["folder"]) == list(record["runs"])  # the sweep file's order
    assert list(frame["setting"]) == ["shipped", "shipped", "swapped resnet", "swapped resnet"]
    assert list(frame["run"]) == ["CAMKD, vanilla, label smoothing, scratch · seeds 0, 1, 2", "CAMKD (beta 0) · seeds 0, 1, 2"] * 2
    assert list(frame["status"]) == ["finished"] * 3 + ["pending"]
    assert list(frame["minutes"][:3]) == [2.0] * 3 and frame["minutes"].isna().iloc[-1]


def test_forest_plot_takes_a_tuned_reference_for_its_method(tmp_path):
    """In a tuned comparison each method runs at its own values: label smoothing at a tuned
    epsilon is a variant (``label_smoothing[label_smoothing=0.2]``) and still the reference."""
    from conftest import write_sweep
    from kdlib.analysis.stats import paired_t
    camkd, ls = {0: 81.0, 1: 83.5, 2: 82.0}, {0: 80.0, 1: 82.0, 2: 81.5}
    write_sweep(tmp_path, [({"methods": ["camkd", "scratch"], "seeds": [0, 1, 2]}, {"camkd": camkd, "scratch": SCRATCH}),
                           ({"methods": ["label_smoothing"], "label_smoothing": 0.2, "seeds": [0, 1, 2]},
                            {"label_smoothing": ls})])
    drawn = drawn_intervals(plots.plot_forest(tmp_path))
    t = paired_t(list(camkd.values()), list(ls.values()))
    assert drawn[("base", "camkd", "label_smoothing")] == pytest.approx((t["ci_low"], t["ci_high"]))
    assert ("base", "label_smoothing[label_smoothing=0.2]", "scratch") in drawn
    names = [t.get_text() for ax in plots.plot_forest(tmp_path).axes for t in ax.get_yticklabels()]
    assert "label smoothing (eps 0.2)" in names and "CAMKD" in names and not any("=" in n for n in names)


@pytest.mark.parametrize("label, words", [
    ("camkd[beta=0]", "CAMKD (beta 0)"),
    ("vanilla[temperature=1.05371,alpha=0.11079]", "vanilla (T 1.05, alpha 0.111)"),
    ("camkd[beta=33.3]", "CAMKD (beta 33.3)"),
    ("camkd[beta=100.0]", "CAMKD (beta 100)"),
    ("label_smoothing[label_smoothing=0.296366]", "label smoothing (eps 0.296)"),
    ("camkd[alpha=1,beta=50,camkd_form=official]", "CA-MKD official (alpha 1, beta 50)"),
    ("ebkd", "EBKD"),
])
def test_a_method_variant_in_words_has_short_knobs_and_three_digits(label, words):
    from kdlib.analysis.sweep_results import method_words
    assert method_words(label) == words


@pytest.mark.parametrize("name, n", [("tab10", None), ("Dark2", 3), ("Dark2", 11), ("Set1", 9), ("Set1", 1)])
def test_palette_is_seaborns_color_palette(name, n):
    """The colours seaborn gives (cycled past the colormap's end), without importing it."""
    import seaborn as sns
    assert plots.palette(name, n) == sns.color_palette(name, n).as_hex()


def test_plots_loads_without_seaborn_or_scipy():
    """A kernel that only draws lines (01, 02) imports neither seaborn nor scipy.stats (together 1.7 s
    of CPU at every start on a loaded 2-core machine); the functions that need seaborn load it."""
    import subprocess
    import sys
    code = ("import sys; import kdlib.analysis.plots, kdlib.book.steps; "
            "print(sorted(m for m in ('seaborn', 'scipy.stats') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
