"""Training progress: one plain line per epoch in batch runs, a tqdm bar in Jupyter.

``KDBOOK_PROGRESS`` picks the form. ``text`` (the runner and ``make`` set it) prints
one line per finished epoch: papermill keeps it in the executed notebook and the runner
echoes it to the terminal as it happens. ``auto`` (interactive sessions) shows a tqdm
bar, a widget in Jupyter. ``off`` prints nothing. Every number a line shows is also
in the run's JSON, epoch by epoch.
"""
from __future__ import annotations

import os


def mode() -> str:
    return os.environ.get("KDBOOK_PROGRESS", "auto")


def duration(seconds: float) -> str:
    """``42 s``, ``7.5 min`` or ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def epoch_line(desc: str, record: dict, total: int, seconds_left: float) -> str:
    """``camkd seed 0: epoch 3/15 | ce 0.312 kd 0.12 feat 48.1 | test acc 89.63% | 27.9 s | 5.6 min left``."""
    terms = " ".join(f"{k[5:]} {v:.3g}" for k, v in record.items() if k.startswith("loss_"))
    return (f"{desc}: epoch {record['epoch']}/{total} | {terms} | test acc {record['test_acc']:.2f}% | "
            f"{record['epoch_seconds']:.1f} s | {duration(seconds_left)} left")


class EpochProgress:
    """Progress of one model's training, fed one epoch record at a time.

    Time left is the mean duration of the epochs this process has run so far times
    the epochs still to run (epochs resumed from a checkpoint are not counted).
    """

    def __init__(self, desc: str, total: int, done: int = 0):
        self.desc, self.total, self.seconds = desc, total, []
        self.bar = None
        if mode() == "auto":
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=done, desc=desc)

    def epoch(self, record: dict) -> None:
        self.seconds.append(record["epoch_seconds"])
        left = (self.total - record["epoch"]) * sum(self.seconds) / len(self.seconds)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{record['test_acc']:.2f}")
        elif mode() == "text":
            print(epoch_line(self.desc, record, self.total, left), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
