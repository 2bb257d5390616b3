"""Paired statistics against scipy and hand-computed values."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kdlib.analysis.stats import NAMES, comparison_frame, mcnemar_exact, mean_ci, paired_t, verdict


def test_paired_t_matches_scipy_and_hand_interval():
    a, b = [91.2, 91.5, 91.0, 91.4], [91.0, 91.1, 91.1, 91.0]
    out = paired_t(a, b)
    d = np.subtract(a, b)
    half = st.t.ppf(0.975, 3) * d.std(ddof=1) / 2  # sqrt(4) = 2
    assert out["mean_diff"] == pytest.approx(d.mean())
    assert out["ci_low"] == pytest.approx(d.mean() - half)
    assert out["ci_high"] == pytest.approx(d.mean() + half)
    assert out["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_intervals_and_p_values_match_scipy_stats(n, confidence):
    """kdlib.analysis.stats reads the t and binomial distributions from scipy.special (scipy.stats costs
    every kernel a second to import); scipy.stats' own intervals and tests agree."""
    rng = np.random.default_rng(n)
    a, b = rng.normal(90, 1, n), rng.normal(89.5, 1, n)
    out = paired_t(a, b, confidence)
    low, high = st.t.interval(confidence, n - 1, loc=np.mean(a - b), scale=st.sem(a - b))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high))
    assert out["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)
    ci = mean_ci(a, confidence)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(st.t.interval(confidence, n - 1, loc=a.mean(),
                                                                          scale=st.sem(a)))
    right_a, right_b = rng.random(40 * n) < 0.8, rng.random(40 * n) < 0.7
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    assert mcnemar_exact(right_a, right_b)["p_value"] == pytest.approx(
        st.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_paired_t_one_pair_has_no_interval():
    out = paired_t([91.0], [90.0])
    assert out["mean_diff"] == 1.0 and math.isnan(out["ci_low"]) and math.isnan(out["p_value"])


def test_mcnemar_exact_hand_value():
    # A right / B wrong on 1 example, the reverse on 6: p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 2 * 8/128
    a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    b = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1], bool)
    out = mcnemar_exact(a, b)
    assert (out["only_a_correct"], out["only_b_correct"]) == (1, 6)
    assert out["p_value"] == pytest.approx(16 / 128)
    assert st.binomtest(1, 7, 0.5).pvalue == pytest.approx(out["p_value"])


def test_mcnemar_identical_predictions():
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0


def test_comparison_frame_and_verdict():
    labels = np.array([0, 1, 2, 3] * 5)
    preds = {"labels": labels}
    metrics = {}
    for method, acc, wrong in [("camkd", [92.0, 92.4], 1), ("vanilla", [91.8, 91.9], 3)]:
        metrics[method] = {"runs": [{"seed": s, "test_acc": acc[s]} for s in (0, 1)]}
        for s in (0, 1):
            p = labels.copy()
            p[:wrong] = (p[:wrong] + 1) % 4
            preds[f"{method}/seed{s}"] = p
    row = comparison_frame(metrics, preds).iloc[0]
    assert (row.method_a, row.method_b, row.seeds) == ("camkd", "vanilla", 2)
    assert row.mean_diff == pytest.approx(0.35)
    assert (row.only_a_correct, row.only_b_correct) == (4, 0)
    text = verdict(row)
    assert text.startswith("CAMKD vs vanilla: +0.35 points (95% CI") and text.endswith(": undecided over 2 seeds")


def test_paired_t_zero_variance_differences():
    """Every seed differs by the same amount: no spread, so the interval is the point
    and the difference is certain (p = 0); equal runs give p = 1."""
    out = paired_t([91.0, 92.0, 93.0], [90.5, 91.5, 92.5])
    assert out["mean_diff"] == pytest.approx(0.5)
    assert out["ci_low"] == pytest.approx(0.5) and out["ci_high"] == pytest.approx(0.5)
    assert out["p_value"] == 0.0
    assert paired_t([91.0, 92.0], [91.0, 92.0])["p_value"] == 1.0


def comparison_inputs(seeds_a, seeds_b):
    labels = np.array([0, 1, 2, 3] * 5)
    preds, metrics = {"labels": labels}, {}
    for method, seeds in (("camkd", seeds_a), ("vanilla", seeds_b)):
        metrics[method] = {"runs": [{"seed": s, "test_acc": 90.0 + s + (method == "camkd")} for s in seeds]}
        for s in seeds:
            preds[f"{method}/seed{s}"] = labels
    return metrics, preds


def test_comparison_pairs_only_the_shared_seeds():
    metrics, preds = comparison_inputs([0, 1, 2], [1, 2, 3])
    row = comparison_frame(metrics, preds).iloc[0]
    assert row.seeds == 2 and row.mean_diff == pytest.approx(1.0)


def test_comparison_with_one_seed_says_no_interval():
    metrics, preds = comparison_inputs([0], [0])
    row = comparison_frame(metrics, preds).iloc[0]
    assert row.seeds == 1 and math.isnan(row.ci_low) and math.isnan(row.p_value)
    assert "one seed: no confidence interval" in verdict(row)


def test_comparison_without_shared_seeds_says_so():
    metrics, preds = comparison_inputs([0, 1], [2, 3])
    row = comparison_frame(metrics, preds).iloc[0]
    assert row.seeds == 0 and math.isnan(row.mean_diff)
    assert verdict(row) == "CAMKD vs vanilla: no seed in common, nothing to compare"
def synthetic_run(tmp_path):
    """teachers.json / metrics / predictions.npz shaped inputs: 3 methods x 3 seeds, 2 teachers."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200)
    preds, metrics = {"labels": labels}, {}
    for method in ("camkd", "vanilla", "scratch"):
        runs = []
        for seed in (0, 1, 2):
            p = np.where(rng.random(200) < 0.9, labels, (labels + 1) % 10)
            preds[f"{method}/seed{seed}"] = p
            fid = {"centroid_fidelity": rng.uniform(0.04, 0.08), "mean_individual_fidelity": rng.uniform(0.05, 0.1),
                   "centroid_agreement": rng.uniform(93, 97), "individual_fidelity": list(rng.uniform(0, 1, 2)),
                   "top1_agreement": list(rng.uniform(90, 99, 2))}
            runs.append({"seed": seed, "test_acc": float((p == labels).mean() * 100), "fidelity": fid})
        metrics[method] = {"method": method, "teachers": ["t1", "t2"], "student_params": 1000, "runs": runs}
    np.savez(tmp_path / "predictions.npz", **preds)
    teachers = {"teachers": [{"name": "t1", "params": 10, "test_acc": 93.11}, {"name": "t2", "params": 20,
                                                                              "test_acc": 92.1}]}
    return teachers, metrics


def test_answer_table_cells_match_results_csv(tmp_path):
    import csv
    from kdlib.analysis.stats import headline, method_table, write_tables
    results, comparison = write_tables(tmp_path, *synthetic_run(tmp_path))
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    table = method_table(results)
    assert list(table["student"]) == ["CAMKD", "vanilla", "scratch"]
    for (method, label), cells in zip([("camkd", "CAMKD"), ("vanilla", "vanilla"), ("scratch", "scratch")],
                                      table.to_dict("records")):
        for column, digits, header in [("test_acc", 2, "test accuracy %"),
                                       ("centroid_fidelity", 3, "centroid fidelity KL(C‖S)"),
                                       ("centroid_agreement", 2, "agreement with the centroid %")]:
            v = np.array([float(r[column]) for r in rows if r["name"] == method])
            assert cells[header] == f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}", (method, column)
        assert cells["n"] == 3
    text = headline(results, comparison)
    means = {m: np.mean([float(r["test_acc"]) for r in rows if r["name"] == m]) for m in ("camkd", "vanilla", "scratch")}
    best = max(means, key=means.get)
    assert text.startswith(f"**Highest mean test accuracy: {NAMES[best]}** ({means[best]:.2f} %, n = 3).")
    for _, row in comparison.iterrows():
        assert f"- {verdict(row)}" in text
    assert "Teachers: t1 93.11 %, t2 92.10 %." in text
    assert text.count("\n| ") == 4  # header and one row per method
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("role,name,test_acc_mean,test_acc_std,test_acc_count")
    assert len(summary) == 1 + 2 + 3  # header, two teachers, three students


SEVEN = ["camkd", "vanilla", "aver", "ebkd", "aekd", "label_smoothing", "scratch"]


def seven_methods(order):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 100)
    preds, metrics = {"labels": labels}, {}
    for i, method in enumerate(order):
        runs = []
        for seed in (0, 1):
            preds[f"{method}/seed{seed}"] = np.where(rng.random(100) < 0.8, labels, (labels + 1) % 10)
            runs.append({"seed": seed, "test_acc": 80.0 + i + seed})
        metrics[method] = {"runs": runs}
    return metrics, preds


def test_seven_methods_pair_in_method_order_and_the_headline_shows_each_against_camkd_and_scratch():
    from kdlib.analysis.stats import anchored_pairs, headline, method_rank
    metrics, preds = seven_methods(list(reversed(SEVEN)))   # given in another order
    comp = comparison_frame(metrics, preds)
    assert len(comp) == 21
    assert all(method_rank(a) < method_rank(b) for a, b in zip(comp["method_a"], comp["method_b"]))
    shown = anchored_pairs(comp)
    pairs = list(zip(shown["method_a"], shown["method_b"]))
    assert pairs == ([(m, "scratch") for m in SEVEN[1:-1]] + [("camkd", m) for m in SEVEN[1:]])  # 5 + 6 = 11
    results = pd.DataFrame([{"role": "student", "name": m, "seed": r["seed"], "test_acc": r["test_acc"]}
                            for m, met in metrics.items() for r in met["runs"]])
    text = headline(results, comp)
    assert text.count("\n- ") == 12 and "11 of the 21 pairs" in text
    assert "AVER vs scratch" in text and "CAMKD vs label smoothing" in text and "vanilla vs AVER" not in text
    three = comparison_frame(*seven_methods(["scratch", "vanilla", "camkd"]))  # the book's three: every pair
    assert list(zip(anchored_pairs(three)["method_a"], anchored_pairs(three)["method_b"])) == [
        ("vanilla", "scratch"), ("camkd", "vanilla"), ("camkd", "scratch")]
    none = comparison_frame(*seven_methods(["aver", "ebkd", "aekd"]))  # no anchor ran: every pair
    assert len(anchored_pairs(none)) == 3
