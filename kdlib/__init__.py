"""kdbook's library, in rooms by role: ``records`` (paths, files, names, storage), ``train`` (data,
models, losses, distillers, the loop), ``book`` (params, the notebooks' steps, the runner), ``fanout``
(Dask, sweeps, tuning), ``analysis`` (statistics and the reading of a difference), ``publish`` (blocks,
pages, the site) and ``bench``; each room's ``__init__`` says what it may import."""
__version__ = "0.1.0"
