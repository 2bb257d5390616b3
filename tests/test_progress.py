"""Batch progress: one plain line per epoch, echoed to the runner's terminal with the notebook's name."""
import re

import pytest
import torch

from conftest import fashion_mnist_subset
from kdlib.train.progress import EpochProgress, duration, epoch_line
from kdlib.book.runner import _Echo

RECORD = {"epoch": 3, "lr": 1e-3, "train_loss": 48.4, "train_acc": 88.0, "test_loss": 0.3, "test_acc": 89.634,
          "epoch_seconds": 27.94, "loss_ce": 0.3121, "loss_kd": 0.12, "loss_feat": 48.06}


def test_epoch_line_names_model_epoch_terms_accuracy_and_time():
    line = epoch_line("camkd seed 0", RECORD, 15, 12 * 27.94)
    assert line == "camkd seed 0: epoch 3/15 | ce 0.312 kd 0.12 feat 48.1 | test acc 89.63% | 27.9 s | 5.6 min left"
    assert [duration(s) for s in (42, 450, 9000)] == ["42 s", "7.5 min", "2.5 h"]


def test_text_mode_prints_one_line_per_epoch(monkeypatch, capsys):
    monkeypatch.setenv("KDBOOK_PROGRESS", "text")
    bar = EpochProgress("t", total=4, done=1)  # resumed after epoch 1
    for epoch, seconds in ((2, 10.0), (3, 20.0)):
        bar.epoch(dict(RECORD, epoch=epoch, epoch_seconds=seconds))
    bar.close()
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["t: epoch 2/4", "t: epoch 3/4"]
    assert lines[0].endswith("20 s left") and lines[1].endswith("15 s left")  # 2 x 10 s, then 1 x mean(10, 20)


@pytest.mark.parametrize("mode", ["off", "auto"])
def test_other_modes_print_no_lines(monkeypatch, capsys, mode):
    monkeypatch.setenv("KDBOOK_PROGRESS", mode)
    bar = EpochProgress("t", total=2)
    bar.epoch(RECORD)
    bar.close()
    assert capsys.readouterr().out == ""  # auto: tqdm writes its bar to stderr or a widget


def test_fit_prints_one_line_per_epoch(tmp_path_factory, monkeypatch, capsys):
    from kdlib.train.assemble import teacher_bank, train_student
    from kdlib.train.loop import TrainConfig, set_threads
    data = fashion_mnist_subset(tmp_path_factory, 300, 100)
    monkeypatch.setenv("KDBOOK_PROGRESS", "text")
    threads = torch.get_num_threads()
    set_threads(1)
    try:
        cfg = TrainConfig(epochs=2)
        _, history = train_student("scratch", teacher_bank([], [], data, cfg, cache=False), data, cfg)
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, record in zip(lines, history):
        assert re.fullmatch(rf"scratch seed 0: epoch {record['epoch']}/2 \| ce [0-9.]+ \| "
                            rf"test acc {record['test_acc']:.2f}% \| [0-9.]+ s \| [0-9]+ s left", line), line


def test_echo_prefixes_whole_lines_as_they_complete():
    seen = []
    echo = _Echo("02_distill_students.ipynb", seen.append)
    echo.write("camkd seed 0: epoch 1/2 | ce 0.5")
    assert seen == []  # half a line waits for the rest
    echo.write(" | test acc 80.00%\nnext: epoch\r")
    echo.write("\rbar 50%\rbar 100%\n\n")
    echo.close()
    assert seen == ["02_distill_students | camkd seed 0: epoch 1/2 | ce 0.5 | test acc 80.00%",
                    "02_distill_students | bar 100%"]
