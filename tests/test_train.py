"""Training end to end on a real Fashion-MNIST subset: teachers, the three methods,
the teacher cache, checkpoints, the learning-rate schedule and non-finite losses."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil

import pytest
import torch

from kdlib.checkpoint import CheckpointError, load_checkpoint
from kdlib.data import Split
from kdlib.distillers import Scratch, build_distiller
from kdlib.metrics import accuracy, fidelity_metrics
from kdlib.models import build_model
from kdlib.teachers import CachedTeachers, LiveTeachers
from kdlib.train import (NonFiniteLossError, TrainConfig, fit, iterate, load_teacher, lr_at, predict_logits,
                         teacher_bank, teacher_test_probs, train_student, train_teacher)

from conftest import fashion_mnist_subset

# batch 64: 32 steps an epoch on 2000 samples, enough for > 70% in 2 epochs
CFG = TrainConfig(epochs=2, batch_size=64)
TEACHER_NAMES = ["teacher_cnn1", "teacher_resnet"]
BASE_KEYS = {"epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "loss_ce"}
quiet = lambda *a: None


@contextlib.contextmanager
def one_thread():
    """Train on one intra-op thread: on the shared 2-core machine two threads
    oversubscribe the cores and run about 3x slower; restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="session")
def fmnist_small(tmp_path_factory):
    return fashion_mnist_subset(tmp_path_factory, 2000, 1000)


@pytest.fixture(scope="session")
def teachers(fmnist_small, tmp_path_factory):
    """{name: (frozen model, history, checkpoint path)}, trained once, plus their folder."""
    folder = tmp_path_factory.mktemp("teachers")
    with one_thread():
        out = {name: train_teacher(name, fmnist_small, CFG, folder, log=quiet) for name in TEACHER_NAMES}
    return folder, out


@pytest.fixture(scope="session")
def bank(fmnist_small, teachers):
    models = [teachers[1][n][0] for n in TEACHER_NAMES]
    with one_thread():
        return teacher_bank(models, TEACHER_NAMES, fmnist_small, CFG, log=quiet)


@pytest.fixture(scope="session")
def students(fmnist_small, bank):
    with one_thread():
        probs = teacher_test_probs(bank, fmnist_small, CFG)
        runs = {m: train_student(m, bank, fmnist_small, CFG, test_probs=probs, log=quiet)
                for m in ("scratch", "vanilla", "camkd")}
    return probs, runs


# --------------------------------------------------------------------------- (a) end to end
def test_teachers_learn(fmnist_small, teachers):
    for name, (model, history, path) in teachers[1].items():
        assert [r["epoch"] for r in history] == [1, 2]
        assert set(history[-1]) == BASE_KEYS
        assert history[-1]["test_acc"] > 50, (name, history[-1]["test_acc"])
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        # the recorded accuracy is the returned model's accuracy
        logits = predict_logits(model, fmnist_small.test, fmnist_small, CFG)
        assert accuracy(logits, fmnist_small.test.labels) == pytest.approx(history[-1]["test_acc"])
        state = load_checkpoint(path)
        assert state["finished"] and state["epoch"] == 2 and state["meta"]["model"] == name


@pytest.mark.parametrize("method", ["scratch", "vanilla", "camkd"])
def test_students_learn_with_every_method(fmnist_small, students, method):
    probs, runs = students
    distiller, history = runs[method]
    expected = set(BASE_KEYS) | {"fidelity"}
    if method != "scratch":
        expected.add("loss_kd")
    if method == "camkd":
        expected |= {"loss_feat", "weight"}
    assert set(history[0]) == expected
    assert set(history[1]) == expected | ({"feat_weight"} if method == "camkd" else set())
    for r in history:
        assert r["test_acc"] > 50, (method, r)
        assert r["train_loss"] == pytest.approx(sum(v for k, v in r.items() if k.startswith("loss_")))
    if method == "camkd":
        assert history[0]["loss_feat"] == 0.0 and history[1]["loss_feat"] > 0
        assert len(history[1]["weight"]) == 2 and sum(history[1]["weight"]) == pytest.approx(1.0)
        assert sum(history[1]["feat_weight"]) == pytest.approx(1.0)
    if method != "scratch":
        assert all(r["loss_kd"] > 0 for r in history)
    # the fidelity record is that of the returned student, recomputed independently
    logits = predict_logits(distiller.student, fmnist_small.test, fmnist_small, CFG)
    assert accuracy(logits, fmnist_small.test.labels) == pytest.approx(history[-1]["test_acc"])
    again = fidelity_metrics(probs, logits.softmax(-1))
    assert history[-1]["fidelity"]["centroid_fidelity"] == pytest.approx(again["centroid_fidelity"], rel=1e-6)
    assert history[-1]["fidelity"]["top1_agreement"] == again["top1_agreement"]


def test_methods_train_different_students(students):
    """The teachers' terms change what the student learns (not just what is logged)."""
    ce = {m: tuple(r["loss_ce"] for r in h) for m, (_, h) in students[1].items()}
    assert len(set(ce.values())) == 3


# --------------------------------------------------------------------------- (b) cache
def test_cached_and_live_teachers_agree(fmnist_small, bank):
    assert isinstance(bank, CachedTeachers) and set(bank.store) == {"train", "test"}
    live = LiveTeachers(list(bank.models), bank.names)
    for split_name, split in (("train", fmnist_small.train), ("test", fmnist_small.test)):
        x, _, idx = next(iterate(split, fmnist_small, 64, seed=3, epoch=1, channels_last=True))
        assert not torch.equal(idx, torch.arange(64))      # shuffled: the index lookup matters
        c_logits, c_feats = bank.outputs(x, idx, split=split_name)
        l_logits, l_feats = live.outputs(x, idx)
        torch.testing.assert_close(c_logits, l_logits, rtol=1e-4, atol=1e-4)
        for cf, lf in zip(c_feats, l_feats):
            assert cf.shape == lf.shape and cf.dtype == bank.feature_dtype == torch.float16  # served as stored
            torch.testing.assert_close(cf.float(), lf, rtol=1e-3, atol=1e-3)


def test_cached_and_live_give_same_camkd_loss(fmnist_small, bank):
    live = LiveTeachers(list(bank.models), bank.names)
    x, y, idx = next(iterate(fmnist_small.train, fmnist_small, 64, seed=0, epoch=0))
    torch.manual_seed(0)
    dist = build_distiller("camkd", build_model("student"), bank, x[:1])
    dist.train()
    out = {}
    for name, teachers in (("cached", bank), ("live", live)):
        dist.teachers = teachers
        torch.manual_seed(1)                       # same dropout masks
        _, out[name] = dist.forward_train(x, y, idx, epoch=1)
    assert out["cached"]["feat"] > 0
    torch.testing.assert_close(out["cached"]["ce"], out["live"]["ce"], rtol=0, atol=0)
    torch.testing.assert_close(out["cached"]["kd"], out["live"]["kd"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cached"]["feat"], out["live"]["feat"], rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- (c) checkpoints
def test_finished_checkpoint_is_reused(fmnist_small, teachers, monkeypatch):
    folder, trained = teachers

    def no_training(*a, **k):
        raise AssertionError("a finished checkpoint must not train again")

    monkeypatch.setattr(Scratch, "forward_train", no_training)
    logs = []
    model, history, path = train_teacher("teacher_cnn1", fmnist_small, CFG, folder, log=logs.append)
    first_model, first_history, first_path = trained["teacher_cnn1"]
    assert path == first_path and history == first_history
    assert any("reusing finished checkpoint" in m for m in logs)
    for (k, a), b in zip(model.state_dict().items(), first_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_checkpoint_raises_naming_file(fmnist_small, teachers, tmp_path):
    _, trained = teachers
    src = trained["teacher_resnet"][2]
    folder = tmp_path / "teachers"
    dst = folder / src.parent.name / src.name           # where train_teacher will look
    dst.parent.mkdir(parents=True)
    blob = src.read_bytes()
    dst.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        train_teacher("teacher_resnet", fmnist_small, CFG, folder, log=quiet)
    assert str(dst) in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dst)
    assert str(dst) in str(err.value)


def test_checkpoint_with_other_meta_is_refused(fmnist_small, teachers, bank, tmp_path):
    _, trained = teachers
    path = trained["teacher_cnn1"][2]
    other = dataclasses.replace(fmnist_small, name="MNIST")
    with pytest.raises(CheckpointError) as err:
        load_teacher(path, other)
    assert "dataset" in str(err.value) and "'MNIST'" in str(err.value) and str(path) in str(err.value)
    assert load_teacher(path, fmnist_small) is not None
    # fit refuses a checkpoint written for something else (a teacher's, for a student run)
    ckpt = tmp_path / "student.pt"
    shutil.copy(path, ckpt)
    with pytest.raises(CheckpointError, match="kind: file has 'teacher', expected 'student'"):
        train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, log=quiet)


def test_interrupted_run_resumes_to_the_same_result(fmnist_small, bank, students, tmp_path, monkeypatch):
    """Stop a scratch run in its second epoch, rerun: it resumes from epoch 1 and ends
    where the uninterrupted run ended (model, optimizer and RNG were all restored)."""
    ckpt = tmp_path / "scratch.pt"
    real = Scratch.forward_train

    def crash_in_epoch_2(self, x, y, idx, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, x, y, idx, epoch)

    monkeypatch.setattr(Scratch, "forward_train", crash_in_epoch_2)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, log=quiet)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and not state["finished"]
    monkeypatch.setattr(Scratch, "forward_train", real)
    logs = []
    with one_thread():       # the reference run used one thread too
        _, history = train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, log=logs.append)
    assert any("resuming from epoch 1" in m for m in logs)
    reference = students[1]["scratch"][1]
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "fidelity")} for r in h]
    assert strip(history) == strip(reference)


# --------------------------------------------------------------------------- (d) schedule
def test_lr_at():
    assert lr_at(0, 100, 0.1, "cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 0.1, "cosine") == pytest.approx(0.05)
    assert lr_at(25, 100, 0.1, "cosine") == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(100, 100, 0.1, "cosine") == pytest.approx(0.0, abs=1e-15)
    assert lr_at(150, 100, 0.1, "cosine") == pytest.approx(0.0, abs=1e-15)   # clamped, never rises
    lrs = [lr_at(s, 100, 0.1, "cosine") for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert all(lr_at(s, 100, 0.1, "constant") == 0.1 for s in (0, 50, 100, 150))


def test_history_records_the_scheduled_lr(teachers):
    history = teachers[1]["teacher_cnn1"][1]
    steps = math.ceil(2000 / CFG.batch_size)
    for e, r in enumerate(history):       # the lr of each epoch's last step
        last = (e + 1) * steps - 1
        assert r["lr"] == pytest.approx(0.5 * CFG.lr * (1 + math.cos(math.pi * last / (CFG.epochs * steps))))


# --------------------------------------------------------------------------- (e) NaN
def tiny(data, n_train=200, n_test=100):
    return dataclasses.replace(data, train=Split(data.train.images[:n_train], data.train.labels[:n_train]),
                               test=Split(data.test.images[:n_test], data.test.labels[:n_test]))


def test_absurd_lr_raises_non_finite(fmnist_small, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=50, lr=1e12, lr_schedule="constant")
    with pytest.raises(NonFiniteLossError, match=r"epoch \d+, batch \d+: term 'ce'") as err:
        train_teacher("student", tiny(fmnist_small), cfg, tmp_path, log=quiet)
    assert "lower lr" in str(err.value)


def test_non_finite_term_named_and_last_checkpoint_kept(fmnist_small, tmp_path):
    class NaNAtEpoch2Batch3(Scratch):
        seen = 0

        def forward_train(self, x, y, idx, epoch):
            logits, losses = super().forward_train(x, y, idx, epoch)
            self.seen += epoch == 1
            bad = epoch == 1 and self.seen == 3
            losses["kd"] = torch.tensor(float("nan") if bad else 0.0)
            return logits, losses

    ckpt = tmp_path / "nan.pt"
    with pytest.raises(NonFiniteLossError) as err:
        fit(NaNAtEpoch2Batch3(build_model("student")), tiny(fmnist_small), CFG, checkpoint=ckpt, log=quiet)
    msg = str(err.value)
    assert "epoch 2, batch 3" in msg and "'kd'" in msg and "nan" in msg
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and not state["finished"] and len(state["history"]) == 1
