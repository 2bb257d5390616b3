"""Fanning out: the Dask cluster, sweeps of book runs, and tuning (the tune file, Optuna's search,
the driver). Imports ``records``, ``train``, ``book`` and, for a tuning's record, ``analysis``' names."""
