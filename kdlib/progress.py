"""Progress bars: a widget in Jupyter, plain text in logs and batch runs.

Set ``KDBOOK_PROGRESS=text`` (the runner does) to force text bars: widget state
saved into executed notebooks would bloat them; ``KDBOOK_PROGRESS=off`` hides them.
"""
from __future__ import annotations

import os
import sys


def progress_bar(**kwargs):
    mode = os.environ.get("KDBOOK_PROGRESS", "auto")
    if mode == "off":
        kwargs["disable"] = True
    if mode in ("text", "off"):
        from tqdm.std import tqdm
        return tqdm(file=sys.stdout, mininterval=5, dynamic_ncols=False, ncols=100, **kwargs)
    from tqdm.auto import tqdm
    return tqdm(**kwargs)
