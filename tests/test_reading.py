"""The one reading of a paired difference: the four words against their definitions (an
interval exactly at the margin, one seed), Holm's adjustment against a computation written out
by hand, the star rule, and the cell."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from kdlib.analysis.cells import cell, count_words, holm, read, star, word

CASES = [  # (low, high, seeds, word)
    (0.05, 0.30, 10, "ahead"),
    (0.05, 0.15, 10, "ahead"),        # above 0 and inside the margin: ahead comes first
    (-0.50, -0.01, 10, "behind"),
    (-0.15, 0.12, 10, "level"),
    (-0.20, 0.20, 10, "level"),       # exactly at the margin: inside, ends included
    (-0.2000001, 0.10, 10, "undecided"),  # just past it
    (-0.10, 0.35, 10, "undecided"),
    (0.0, 0.3, 10, "undecided"),      # touching 0 is not above it
    (0.05, 0.30, 1, None),            # one seed: no interval, no word
    (math.nan, math.nan, 3, None),
]


@pytest.mark.parametrize("low, high, seeds, expected", CASES)
def test_each_interval_gets_its_one_word(low, high, seeds, expected):
    assert word(low, high, seeds) == expected


def test_level_is_two_one_sided_tests_at_2_5_percent_each():
    """An interval inside ±0.2 is what two one-sided t tests at 2.5 % each reject (that the gap is
    0.2 or more either way); checked on drawn differences with scipy's one-sided tests."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = rng.normal(rng.uniform(-0.3, 0.3), rng.uniform(0.05, 0.4), 10)
        sem = d.std(ddof=1) / math.sqrt(len(d))
        half = st.t.ppf(0.975, len(d) - 1) * sem
        low, high = d.mean() - half, d.mean() + half
        p_low = st.ttest_1samp(d, -0.2, alternative="greater").pvalue
        p_high = st.ttest_1samp(d, 0.2, alternative="less").pvalue
        tost = max(p_low, p_high) < 0.025
        assert (word(low, high, 10) == "level") == (tost and not low > 0 and not high < 0), (low, high)


def test_holm_matches_the_step_down_written_out():
    p = [0.01, 0.04, 0.03, 0.005, math.nan, 0.5]
    # five finite p-values; sorted: 0.005, 0.01, 0.03, 0.04, 0.5 times 5, 4, 3, 2, 1
    expected = {3: 0.025, 0: 0.04, 2: 0.09, 1: 0.09, 5: 0.5}  # 0.04 x 2 = 0.08 < 0.09: held at 0.09
    out = holm(p)
    for i, value in expected.items():
        assert out[i] == pytest.approx(value)
    assert math.isnan(out[4])
    assert list(holm([0.3, 0.9])) == pytest.approx([0.6, 0.9])  # monotone: never below an earlier one
    assert list(holm([0.6, 0.6])) == [1.0, 1.0]
    assert len(holm([])) == 0


def test_holm_against_scipy_when_it_has_it():
    false_discovery_control = getattr(st, "false_discovery_control", None)
    p = np.array([0.001, 0.02, 0.03, 0.2, 0.04])
    ranks = np.argsort(p)
    by_hand = np.empty_like(p)
    running = 0
    for k, i in enumerate(ranks):
        running = max(running, min(1, (len(p) - k) * p[i]))
        by_hand[i] = running
    assert np.allclose(holm(p), by_hand)
    if false_discovery_control is not None:  # Benjamini-Hochberg is never above Holm
        assert (false_discovery_control(p) <= holm(p) + 1e-12).all()


def test_no_star_on_one_seed_and_one_below_alpha_with_two():
    assert not star(0.001, 1)
    assert star(0.049, 2) and not star(0.05, 2) and not star(math.nan, 5)


def test_a_cell_is_the_mean_and_its_interval_with_the_star_rule():
    assert cell(87.714, 86.871, 88.559) == "87.71 (86.87 to 88.56)"
    assert cell(0.29, -0.14, 0.73, p=0.01, seeds=3, signed=True) == "+0.29 (-0.14 to +0.73) \\*"
    assert cell(0.29, -0.14, 0.73, p=0.01, seeds=3, signed=True, escape=False) == "+0.29 (-0.14 to +0.73) *"
    assert cell(0.5, math.nan, math.nan, p=0.001, seeds=1, signed=True) == "+0.50"  # one seed: no star
    assert cell(math.nan) == "—"
    assert "\u00a0" in cell(1.0, 0.5, 1.5, nbsp=True)


def test_read_adds_the_word_and_holms_p_over_the_frame():
    frame = pd.DataFrame({"mean_diff": [0.3, -0.05, 0.1], "ci_low": [0.1, -0.15, -0.4], "ci_high": [0.5, 0.05, 0.6],
                          "p_value": [0.01, 0.5, 0.6], "seeds": [10, 10, 1]})
    out = read(frame)
    assert [w if isinstance(w, str) else None for w in out["word"]] == ["ahead", "level", None]
    assert list(out["p_holm"]) == pytest.approx([0.03, 1.0, 1.0])
    assert count_words(out["word"]) == "1 ahead, 1 level"


def test_by_setting_names_the_settings_under_each_word_and_says_all_when_one_word_holds():
    from kdlib.analysis.cells import by_setting
    assert by_setting([("shipped", "behind"), ("small", "level"), ("swapped", "behind")]) == \
        "behind in shipped and swapped, level in small"
    assert by_setting([("a", "level"), ("b", "ahead"), ("c", "ahead"), ("d", "ahead")]) == \
        "level in a, ahead in b, c and d"
    assert by_setting([("a", "level"), ("b", "level"), ("c", "level")]) == "level in all 3 settings"
    assert by_setting([("a", "ahead"), ("b", "ahead")]) == "ahead in both settings"
    assert by_setting([("a", "ahead")]) == "ahead in a"
    assert by_setting([("a", math.nan), ("b", "level")]) == "unread (one seed) in a, level in b"
