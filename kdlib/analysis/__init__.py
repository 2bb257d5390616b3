"""Reading the records: statistics, the one reading of a difference (``cells``), sweep, tuning and
teacher-quality results, plots. Imports ``records`` and the params schema; never what starts Dask,
papermill or Optuna's search."""
