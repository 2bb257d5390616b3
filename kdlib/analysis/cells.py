"""The one reading of a paired difference, for every table of the book (a tuning's test, a
sweep's settings, the teacher-quality sweep): its cell, its word, and Holm's adjustment.

* **cell**: ``mean (low to high)`` with a star where at least 2 seeds were paired and the
  (Holm-adjusted, where the table gives it) p-value is below ``ALPHA``; never a star on one seed.
* **word**, from the 95% interval and a margin of ``MARGIN`` points (the low end of the gap the
  seed's document claims for CAMKD over vanilla, 0.2 to 0.5), first match wins:
  *ahead* (the whole interval above 0), *behind* (the whole interval below 0), *level* (the
  interval inside ±margin, ends included: two one-sided t tests reject a difference of the
  margin or more, each at 2.5 %), *undecided* (anything else); no word for one seed.
* **Holm**: the step-down adjustment of a family's p-values (Holm 1979), so that reading a
  table of many comparisons keeps the chance of any false "significant" at ``ALPHA``.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

MARGIN = 0.2  # points of accuracy
NBSP = "\u00a0"  # a number and its interval stay on one line in a table cell
BR = "<br>"  # a line break inside a markdown table cell (GitHub and the site both render it)
ALPHA = 0.05
WORDS = ("ahead", "behind", "level", "undecided")


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x)


def word(low: float, high: float, seeds: int | None, margin: float = MARGIN) -> str | None:
    """'ahead', 'behind', 'level' or 'undecided' for a paired difference's 95% interval
    ``[low, high]`` over ``seeds`` paired seeds; None with fewer than 2 (no interval)."""
    if _missing(seeds) or seeds < 2 or _missing(low) or _missing(high):
        return None
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    if -margin <= low and high <= margin:
        return "level"
    return "undecided"


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values, in the order given; NaN stays NaN and does not count
    in the family. The i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = len(finite)
    order = finite[np.argsort(p[finite], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def star(p: float | None, seeds: int | None, alpha: float = ALPHA) -> bool:
    """The one star rule: at least 2 paired seeds and p below ``alpha``."""
    return not _missing(p) and not _missing(seeds) and seeds >= 2 and p < alpha


def cell(mean: float, low: float = math.nan, high: float = math.nan, p: float | None = None,
         seeds: int | None = None, signed: bool = False, escape: bool = True, nbsp: bool = False,
         sep: str = " ", digits: int = 2) -> str:
    """'87.71 (86.87 to 88.56)', '+0.29 (-0.14 to +0.73) \\*' (``star``), the mean alone without an
    interval, '—' without a mean. ``escape``: the star as markdown's ``\\*``; ``nbsp``: the number and
    its interval held on one line; ``sep``: what stands between the mean and its interval ('<br>' puts
    the interval on a line of its own); ``digits`` after the point."""
    if _missing(mean):
        return "—"
    f = f"+.{digits}f" if signed else f".{digits}f"
    interval = f"({low:{f}} to {high:{f}})"
    if nbsp:
        interval = interval.replace(" ", "\u00a0")
    text = f"{mean:{f}}" if _missing(low) or _missing(high) else f"{mean:{f}}{sep}{interval}"
    if star(p, seeds if seeds is not None else (2 if not _missing(low) else 1)):
        text += ("\u00a0" if nbsp or sep != " " else " ") + ("\\*" if escape else "*")
    return text.replace(" ", "\u00a0") if nbsp else text


def read(frame: pd.DataFrame, margin: float = MARGIN, alpha: float = ALPHA) -> pd.DataFrame:
    """``frame`` (one paired difference a row: mean_diff, ci_low, ci_high, p_value, seeds) with
    ``word`` and ``p_holm`` (Holm over the frame's rows, its family) added."""
    out = frame.copy()
    out["word"] = [word(lo, hi, n, margin) for lo, hi, n in zip(out["ci_low"], out["ci_high"], out["seeds"])]
    out["p_holm"] = holm(out["p_value"]) if len(out) else []
    return out


def count_words(words) -> str:
    """'5 level, 1 behind, 3 undecided' in the order of ``WORDS`` (those with none left out)."""
    words = [w for w in words if isinstance(w, str)]
    return ", ".join(f"{words.count(w)} {w}" for w in WORDS if w in words) or "none read"


def by_setting(pairs) -> str:
    """'behind in shipped and noisy resnet, undecided in small student' from [(setting, word)]
    (a missing word: 'unread (one seed)'), settings kept in their order under their word's first place;
    'level in all 3 settings' (or 'in both settings') when one word holds for every setting."""
    by_word: dict = {}
    for setting, w in pairs:
        by_word.setdefault(w if isinstance(w, str) else "unread (one seed)", []).append(setting)
    if len(by_word) == 1 and len(settings := next(iter(by_word.values()))) > 1:
        return f"{next(iter(by_word))} in " + ("both settings" if len(settings) == 2 else f"all {len(settings)} settings")
    return ", ".join(f"{w} in {listed(settings)}" for w, settings in by_word.items())


def listed(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def markdown_table(header, rows) -> str:
    """A markdown table: the header row, the rule, one line per row (each cell as ``str``)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def frame_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A data frame as a markdown table, without its index: shown with ``display(Markdown(...))`` its
    cells wrap, in a notebook and on the site alike, so that the table fits its page. Numbers keep
    ``digits`` significant digits; a missing value is '—'."""
    def text(v):
        if _missing(v):
            return "—"
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        return str(v)
    return markdown_table(list(map(str, frame.columns)), [[text(v) for v in row]
                                                          for row in frame.itertuples(index=False)])
