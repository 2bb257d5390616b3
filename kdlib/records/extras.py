"""The optional parts of kdbook (pyproject.toml's extras) and the one-line error a command
gives when the part it needs is not installed.

``import kdlib`` and the notebooks in a kernel need the core dependencies only; running the
book in batch, a sweep, tuning and the site each need an extra. A command checks for its
extra before it starts, so a missing package stops it at once with the ``pip install`` line
that fixes it, never with an ImportError half-way through a run.
"""
from __future__ import annotations

from importlib.util import find_spec

_BATCH = ("papermill", "nbconvert", "nbformat", "ipykernel")
# extra -> the modules it provides, with those of the extras it builds on (a sweep runs book
# runs; tuning runs on Dask), as pyproject.toml's extras include each other
EXTRAS = {
    "batch": _BATCH,
    "sweep": ("distributed", "bokeh") + _BATCH,
    "tune": ("optuna", "distributed", "bokeh") + _BATCH,
    "docs": ("mkdocs", "material", "mkdocs_jupyter", "jupyter_server_mathjax", "jinja2"),
    "lab": ("jupyterlab",),
}
# what the message calls a module, where that is not its import name
NAMES = {"distributed": "Dask", "bokeh": "Bokeh", "optuna": "Optuna", "mkdocs": "MkDocs", "material": "mkdocs-material",
         "mkdocs_jupyter": "mkdocs-jupyter", "jupyter_server_mathjax": "jupyter-server-mathjax",
         "jupyterlab": "JupyterLab"}


class MissingExtra(RuntimeError):
    """A command's optional packages are not installed; the message says which extra to install."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [name for name in EXTRAS[extra] if find_spec(name) is None]


def require(extra: str, command: str) -> None:
    """Raise ``MissingExtra`` unless every module of ``extra`` can be imported; its message is
    one line, e.g. "kdlib sweep needs Dask, Bokeh: pip install 'kdbook[sweep]'"."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(f"{command} needs {', '.join(NAMES.get(m, m) for m in absent)}: "
                           f"pip install 'kdbook[{extra}]'")
