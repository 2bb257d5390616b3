"""kdbook's library, in rooms by role: ``records`` (paths, files, names, storage), ``train`` (data,
models, losses, distillers, the loop), ``book`` (params, the notebooks' steps, the runner), ``fanout``
(Dask, sweeps, tuning), ``analysis`` (statistics and the reading of a difference), ``publish`` (blocks,
pages, the site) and ``bench``; each room's ``__init__`` says what it may import."""
__version__ = "0.1.0"


def __getattr__(name):
    """``kdlib.distill`` and ``kdlib.Distilled`` (``kdlib.train.api``), imported when first used: the
    commands that need no torch do not import it."""
    if name in ("distill", "Distilled"):
        from .train import api
        return getattr(api, name)
    raise AttributeError(f"module 'kdlib' has no attribute {name!r}")
