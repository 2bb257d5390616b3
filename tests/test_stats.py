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
