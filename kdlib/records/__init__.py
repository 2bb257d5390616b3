"""The records' floor: paths made portable, files written whole, the words for methods, settings
and knobs, the extras, Optuna's storage. Imports nothing else of kdlib; every other room may read it."""
