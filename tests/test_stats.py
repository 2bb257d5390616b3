"""Paired statistics against scipy and hand-computed values."""
import math

import numpy as np
import pytest
from scipy import stats as st

from kdlib.stats import comparison_frame, mcnemar_exact, paired_t, verdict


def test_paired_t_matches_scipy_and_hand_interval():
    a, b = [91.2, 91.5, 91.0, 91.4], [91.0, 91.1, 91.1, 91.0]
    out = paired_t(a, b)
    d = np.subtract(a, b)
    half = st.t.ppf(0.975, 3) * d.std(ddof=1) / 2  # sqrt(4) = 2
    assert out["mean_diff"] == pytest.approx(d.mean())
    assert out["ci_low"] == pytest.approx(d.mean() - half)
    assert out["ci_high"] == pytest.approx(d.mean() + half)
    assert out["p_value"] == pytest.approx(st.ttest_rel(a, b).pvalue)


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
    assert text.startswith("CAMKD vs vanilla: +0.35 points (95% CI") and "at 5% over 2 seeds" in text


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
