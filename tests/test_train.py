"""Training end to end on a real Fashion-MNIST subset: teachers, the three methods,
the teacher cache, checkpoints, the learning-rate schedule and non-finite losses."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import pytest
import torch

from kdlib.train.checkpoint import CheckpointError, CheckpointMismatch, load_checkpoint
from kdlib.train.data import Split
from kdlib.train.distillers import CAMKD, Scratch, build_distiller
from kdlib.train.metrics import accuracy, fidelity_metrics
from kdlib.train.models import CalWeight, build_model
from kdlib.train.teachers import CachedTeachers, LiveTeachers
from kdlib.train.assemble import load_teacher, teacher_bank, teacher_test_probs, train_student, train_teacher
from kdlib.train.loop import NonFiniteLossError, TrainConfig, fit, iterate, lr_at, predict_logits, train_epoch

from conftest import fashion_mnist_subset, student_id, teacher_id

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
        out = {name: train_teacher(name, fmnist_small, CFG, folder / f"{name}.pt", teacher_id(name), log=quiet)
               for name in TEACHER_NAMES}
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
        assert state["finished"] and state["epoch"] == 2 and state["identity"] == teacher_id(name)


def test_evaluation_batch_size_does_not_change_logits(fmnist_small, teachers):
    """Evaluation runs in batches of ``eval_batch_size`` (256: see TrainConfig); what the
    records hold must not depend on it: a trained teacher's and a fresh student's logits
    on 1,000 test images are the same bit for bit at 64, 256 and 1024 (one batch)."""
    model = teachers[1]["teacher_cnn1"][0]
    student = build_model("student").to(memory_format=torch.channels_last)
    assert CFG.eval_batch_size == 256
    for net in (model, student):
        base = predict_logits(net, fmnist_small.test, fmnist_small, CFG)
        for size in (64, 1024):
            other = predict_logits(net, fmnist_small.test, fmnist_small, dataclasses.replace(CFG, eval_batch_size=size))
            assert torch.equal(base, other), (type(net).__name__, size)


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


def test_distillation_pulls_the_student_towards_the_teachers(students):
    """KD's direction: both distilled students end closer to the teachers' centroid
    (lower KL(C||S)) than the student trained alone on the same data and seed."""
    kl = {m: h[-1]["fidelity"]["centroid_fidelity"] for m, (_, h) in students[1].items()}
    assert kl["vanilla"] < kl["scratch"] and kl["camkd"] < kl["scratch"], kl


def test_epoch_losses_are_sample_weighted_means(fmnist_small):
    """train_epoch's recorded loss and accuracy against an independent computation:
    with lr = 0 the model never changes, so the epoch's mean CE (200 images in batches of
    64, 64, 64 and 8) must equal the CE of the whole training set computed in numpy."""
    torch.manual_seed(0)
    data = tiny(fmnist_small, n_train=200)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.0, lr_schedule="constant")
    distiller = Scratch(model)
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=0.0)
    sums, correct, n, _, _ = train_epoch(distiller, optimizer, data, cfg, 0, 4)
    x = ((data.train.images.float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1))
    z = (x.reshape(200, -1).double().numpy() @ model[1].weight.detach().double().numpy().T
         + model[1].bias.detach().double().numpy())
    y = data.train.labels.numpy()
    log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    assert n == 200
    assert sums["ce"] / n == pytest.approx(-log_p[np.arange(200), y].mean(), rel=1e-5)
    assert correct == int((z.argmax(1) == y).sum())


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
    model, history, path = train_teacher("teacher_cnn1", fmnist_small, CFG, folder / "teacher_cnn1.pt",
                                         teacher_id("teacher_cnn1"), log=logs.append)
    first_model, first_history, first_path = trained["teacher_cnn1"]
    assert path == first_path and history == first_history
    assert any("reusing finished checkpoint" in m for m in logs)
    for (k, a), b in zip(model.state_dict().items(), first_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_truncated_checkpoint_raises_naming_file(fmnist_small, teachers, tmp_path):
    _, trained = teachers
    src = trained["teacher_resnet"][2]
    dst = tmp_path / src.name
    blob = src.read_bytes()
    dst.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="unreadable") as err:
        train_teacher("teacher_resnet", fmnist_small, CFG, dst, teacher_id("teacher_resnet"), log=quiet)
    assert str(dst) in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(dst)
    assert str(dst) in str(err.value)


def test_checkpoint_with_other_meta_is_refused(fmnist_small, teachers, bank, tmp_path):
    _, trained = teachers
    path = trained["teacher_cnn1"][2]
    other = dataclasses.replace(fmnist_small, name="MNIST")
    with pytest.raises(CheckpointMismatch) as err:
        load_teacher(path, other)
    assert "dataset: file has 'FashionMNIST', expected 'MNIST'" in str(err.value) and str(path) in str(err.value)
    assert load_teacher(path, fmnist_small) is not None
    with pytest.raises(CheckpointMismatch, match="teacher_epochs: file has 20, expected 3"):
        load_teacher(path, fmnist_small, teacher_id("teacher_cnn1", teacher_epochs=3))
    # fit refuses a checkpoint written for something else (a teacher's, for a student run)
    ckpt = tmp_path / "student.pt"
    shutil.copy(path, ckpt)
    with pytest.raises(CheckpointMismatch, match="kind: file has 'teacher', expected 'student'"):
        train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, identity=student_id("scratch"), log=quiet)


def test_checkpoint_without_identity_is_refused(fmnist_small):
    with pytest.raises(ValueError, match="identity"):
        fit(Scratch(build_model("student")), tiny(fmnist_small), CFG, checkpoint="x.pt", log=quiet)


def test_pickled_payload_is_refused_not_run(tmp_path):
    """Every checkpoint load is weights_only: a file carrying a pickled callable is
    refused with the file named, and the callable never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"identity": {}, "model": {}, "x": Payload()}, bad)
    with pytest.raises(CheckpointError, match="not plain weights") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and not marker.exists()


def crash_in_epoch(monkeypatch, cls, epoch: int):
    """Make ``cls`` stop with KeyboardInterrupt at the start of epoch ``epoch`` (1-based);
    returns the real ``forward_train`` to put back."""
    real = cls.forward_train

    def crashing(self, x, y, idx, e):
        if e == epoch - 1:
            raise KeyboardInterrupt
        return real(self, x, y, idx, e)

    monkeypatch.setattr(cls, "forward_train", crashing)
    return real


def crash_and_resume(monkeypatch, cls, run, path, epoch: int, epochs: int) -> dict:
    """``run(path)`` stopped at the start of epoch ``epoch`` (its checkpoint then holds
    epoch ``epoch - 1``), then run again: it says it resumes. Returns the final checkpoint."""
    real = crash_in_epoch(monkeypatch, cls, epoch)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        run(path)
    assert load_checkpoint(path)["epoch"] == epoch - 1
    monkeypatch.setattr(cls, "forward_train", real)
    logs = []
    with one_thread():
        run(path, logs.append)
    assert any(f"resuming from epoch {epoch - 1} of {epochs}" in m for m in logs)
    return load_checkpoint(path)


def test_interrupted_run_resumes_to_the_same_result(fmnist_small, bank, students, tmp_path, monkeypatch):
    """Stop a scratch run in its second epoch, rerun: it resumes from epoch 1 and ends
    where the uninterrupted run ended (model, optimizer and RNG were all restored)."""
    ckpt = tmp_path / "scratch.pt"
    real = crash_in_epoch(monkeypatch, Scratch, 2)
    ident = student_id("scratch")
    with one_thread(), pytest.raises(KeyboardInterrupt):
        train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, identity=ident, log=quiet)
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and not state["finished"]
    monkeypatch.setattr(Scratch, "forward_train", real)
    logs = []
    with one_thread():       # the reference run used one thread too
        _, history = train_student("scratch", bank, fmnist_small, CFG, checkpoint=ckpt, identity=ident,
                                   log=logs.append)
    assert any("resuming from epoch 1" in m for m in logs)
    reference = students[1]["scratch"][1]
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_seconds", "fidelity")} for r in h]
    assert strip(history) == strip(reference)


def test_camkd_killed_after_epoch_2_resumes_to_the_same_state(fmnist_small, bank, tmp_path, monkeypatch):
    """CAMKD, 3 epochs (the feature term and its regressors train from epoch 2): a run
    stopped in epoch 3 and resumed ends with the same history, student and regressor
    weights, optimizer state and RNG state as an uninterrupted run."""
    data, cfg = tiny(fmnist_small, n_train=400), dataclasses.replace(CFG, epochs=3)
    ident = student_id("camkd", student_epochs=3)
    run = lambda ckpt, log=quiet: train_student("camkd", bank, data, cfg, checkpoint=ckpt, identity=ident, log=log)
    with one_thread():
        run(tmp_path / "straight.pt")
    b = crash_and_resume(monkeypatch, CAMKD, run, tmp_path / "resumed.pt", epoch=3, epochs=3)
    a = load_checkpoint(tmp_path / "straight.pt")
    assert b["finished"] and a["history"][-1]["loss_feat"] > 0
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]
    assert strip(b["history"]) == strip(a["history"])
    assert list(b["extra"]) == list(a["extra"]) and len(a["extra"]) > 0     # the regressors
    for part in ("model", "extra"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(torch.as_tensor(opt_a[i][k]), torch.as_tensor(opt_b[i][k])), (i, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def test_renamed_regressor_key_fails_loudly(fmnist_small, bank, tmp_path):
    """A checkpoint whose regressor weights do not fit (a renamed key) is refused;
    the regressors are never silently re-initialised."""
    data, cfg = tiny(fmnist_small, n_train=200), dataclasses.replace(CFG, epochs=2)
    ident, ckpt = student_id("camkd"), tmp_path / "camkd.pt"
    with one_thread():
        train_student("camkd", bank, data, dataclasses.replace(cfg, epochs=1), checkpoint=ckpt,
                      identity=ident, log=quiet)
    state = torch.load(ckpt, weights_only=True)
    state["finished"] = False
    state["extra"] = {k.replace("0.", "zero.", 1): v for k, v in state["extra"].items()}
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="does not fit this model") as err:
        train_student("camkd", bank, data, cfg, checkpoint=ckpt, identity=ident, log=quiet)
    assert str(ckpt) in str(err.value)


def test_camkd_official_form_trains_and_resumes(fmnist_small, tmp_path, monkeypatch):
    """``camkd_form: official`` end to end on 256 images with two untrained teachers
    (teacher_vgg's 3x3 map exercises CalWeight's pooling; no teacher training needed for
    the plumbing): finite losses, no feature term in epoch 1, the official regressors
    checkpointed, a run stopped in epoch 2 resumes to the uninterrupted run's state, and
    the kdbook regressors refuse its checkpoint."""
    data, cfg = tiny(fmnist_small, n_train=256, n_test=100), dataclasses.replace(CFG, epochs=2)
    names = ["teacher_cnn1", "teacher_vgg"]
    torch.manual_seed(0)
    with one_thread():
        bank = teacher_bank([build_model(n) for n in names], names, data, cfg, log=quiet)
    ident = student_id("camkd", student_epochs=2, camkd_form="official")
    run = lambda ckpt, log=quiet, form="official": train_student(
        "camkd", bank, data, cfg, checkpoint=ckpt, identity=ident, log=log, camkd_form=form)
    with one_thread():
        dist, history = run(tmp_path / "straight.pt")
    assert isinstance(dist.regressors, CalWeight) and dist.form == "official"
    assert history[0]["loss_feat"] == 0.0 and history[1]["loss_feat"] > 0
    for r in history:
        assert all(math.isfinite(r[k]) for k in ("train_loss", "loss_ce", "loss_kd", "loss_feat")), r
        assert sum(r["weight"]) == pytest.approx(1.0) and len(r["weight"]) == 2
    assert sum(history[1]["feat_weight"]) == pytest.approx(1.0)
    straight = load_checkpoint(tmp_path / "straight.pt")
    assert set(straight["extra"]) == set(dist.regressors.state_dict())
    assert {k.split(".")[0] for k in straight["extra"]} == {"embed0", "embed1"}

    resumed = crash_and_resume(monkeypatch, CAMKD, run, tmp_path / "resumed.pt", epoch=2, epochs=2)
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]
    assert resumed["finished"] and strip(resumed["history"]) == strip(straight["history"])
    for part in ("model", "extra"):
        assert straight[part].keys() == resumed[part].keys()
        for k in straight[part]:
            assert torch.equal(straight[part][k], resumed[part][k]), (part, k)
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])

    resumed["finished"] = False
    torch.save(resumed, tmp_path / "resumed.pt")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        run(tmp_path / "resumed.pt", form="kdbook")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA RNG state exists only where CUDA does")
def test_cuda_rng_state_is_checkpointed_and_restored(fmnist_small, tmp_path):
    data = tiny(fmnist_small).to("cuda")
    cfg = dataclasses.replace(CFG, epochs=1, device="cuda")
    ckpt = tmp_path / "cuda.pt"
    fit(Scratch(build_model("student").cuda()), data, cfg, checkpoint=ckpt, identity={"kind": "test"}, log=quiet)
    saved = load_checkpoint(ckpt)["rng"]["cuda"]
    torch.cuda.manual_seed_all(12345)
    state = load_checkpoint(ckpt)
    state["finished"] = False
    torch.save(state, ckpt)
    fit(Scratch(build_model("student").cuda()), data, cfg, checkpoint=ckpt, identity={"kind": "test"}, log=quiet)
    assert all(torch.equal(a, b) for a, b in zip(saved, torch.cuda.get_rng_state_all()))


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
        train_teacher("student", tiny(fmnist_small), cfg, log=quiet)
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
        fit(NaNAtEpoch2Batch3(build_model("student")), tiny(fmnist_small), CFG, checkpoint=ckpt,
            identity={"kind": "test"}, log=quiet)
    msg = str(err.value)
    assert "epoch 2, batch 3" in msg and "'kd'" in msg and "nan" in msg
    state = load_checkpoint(ckpt)
    assert state["epoch"] == 1 and not state["finished"] and len(state["history"]) == 1


STEPS_SCRIPT = """
import resource, sys, torch
from kdlib.train.distillers import Scratch
from kdlib.train.models import build_model
from kdlib.train.loop import set_threads
if sys.argv[1] == "set_threads":
    set_threads(1)
torch.manual_seed(0)
torch.set_num_threads(1)
x, y = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (128,))
d = Scratch(build_model("student")).to(memory_format=torch.channels_last)
opt = torch.optim.Adam(d.parameters(), 1e-3)
def step():
    loss = sum(d.forward_train(x, y, None, 1)[1].values())
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_training_steps_do_not_fault_memory_in_under_dasks_malloc_setting():
    """A Dask worker (and every notebook kernel a sweep starts) has MALLOC_TRIM_THRESHOLD_=65536,
    which makes glibc mmap and unmap every tensor over 128 KiB on every step. set_threads
    (called by every run) raises the thresholds: the steps then reuse freed memory instead
    of faulting fresh pages in (counted by the kernel, not timed)."""
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    faults = {mode: int(subprocess.run([sys.executable, "-c", STEPS_SCRIPT, mode], env=env, check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("plain", "set_threads")}
    assert faults["plain"] > 10_000  # the trap: tens of thousands of page faults in 5 steps
    assert faults["set_threads"] < faults["plain"] / 20
