"""Training: data in memory, models, losses, one class per distillation method, teachers, metrics,
checkpoints and the loop. Imports only ``kdlib.records``; knows nothing of notebooks, sweeps or reports."""
