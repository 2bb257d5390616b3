"""One training loop for teachers and for every distillation method.

Batches are index slices of the in-memory dataset; the loop sums whatever loss terms
the distiller returns, records each by name, evaluates on the test set every epoch,
and writes a resumable checkpoint at the end of every epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, meta_key
from .data import Dataset, Split, augment_batch, batch_order, normalize
from .distillers import Distiller, Scratch, build_distiller
from .models import build_model
from .teachers import CachedTeachers, LiveTeachers, freeze
from .metrics import accuracy, fidelity_metrics
from .progress import EpochProgress


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss."""


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "cosine"   # cosine | constant
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "fp32"       # fp32 | bf16
    augment: str = "none"         # none | crop | crop_flip
    fidelity_freq: int = 1
    eval_batch_size: int = 1024
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on CPU/CUDA when asked; a no-op context for fp32."""
    if precision == "bf16" and device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, total_steps: int, base_lr: float, schedule: str) -> float:
    """Constant, or cosine decay from ``base_lr`` to 0 over ``total_steps`` (per step)."""
    if schedule == "constant":
        return base_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def iterate(split: Split, data: Dataset, batch_size: int, *, seed: int = 0, epoch: int = 0,
            shuffle: bool = True, augment: str = "none", channels_last: bool = False):
    """Yield ``(x, y, idx)``: normalised float batches, labels and sample indices."""
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    for idx in batch_order(len(split), batch_size, seed, epoch, shuffle):
        idx = idx.to(split.images.device)
        images = split.images[idx]
        if augment != "none":
            images = augment_batch(images, gen, flip=augment == "crop_flip")
        yield normalize(images, data.mean, data.std, channels_last), split.labels[idx], idx


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, split: Split, data: Dataset, cfg: TrainConfig,
                   device: torch.device | None = None) -> torch.Tensor:
    """Logits [N,C] (float32, on the split's device) in eval mode, large batches."""
    device = device or split.images.device
    was_training = model.training
    model.eval()
    out = []
    with autocast(device, cfg.precision):
        for x, _, _ in iterate(split, data, cfg.eval_batch_size, shuffle=False, channels_last=cfg.channels_last):
            out.append(model(x).float())
    model.train(was_training)
    return torch.cat(out)


def _check_finite(losses: dict, total: torch.Tensor, epoch: int, batch: int, cfg: TrainConfig) -> None:
    if torch.isfinite(total):
        return
    bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["total"]
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1}, batch {batch + 1}: term {bad[0]!r} is "
        f"{losses.get(bad[0], total).item()}; lower lr (now {cfg.lr}) or beta/alpha; "
        f"the last good checkpoint is kept")


def _epoch_record(epoch, lr, sums, n, correct, test_loss, test_acc, seconds, stats) -> dict:
    record = {"epoch": epoch + 1, "lr": lr, "train_loss": sum(sums.values()) / n,
              "train_acc": 100.0 * correct / n, "test_loss": test_loss, "test_acc": test_acc,
              "epoch_seconds": seconds}
    record.update({f"loss_{k}": v / n for k, v in sums.items()})
    record.update(stats)
    return record


def train_epoch(distiller: Distiller, optimizer: torch.optim.Optimizer, data: Dataset, cfg: TrainConfig,
                epoch: int, steps: int, *, max_batches: int | None = None):
    """One training pass over ``data.train`` (the part of an epoch that learns).

    Sets the per-step learning rate, runs ``forward_train`` under autocast, sums the
    loss terms, refuses a non-finite total, steps the optimizer. ``steps`` is the
    number of batches in a full epoch (for the schedule); ``max_batches`` stops early
    (warm-up in ``kdlib.bench``). Returns ``(sums, correct, n, stats, lr)``: per-term
    loss sums weighted by batch size, correct predictions, samples seen, batch-stat
    sums and the last learning rate.
    """
    device = data.train.images.device
    distiller.train()
    sums, correct, n, stats, lr = {}, 0, 0, {}, cfg.lr
    batches = iterate(data.train, data, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                      augment=cfg.augment, channels_last=cfg.channels_last)
    for b, (x, y, idx) in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        lr = lr_at(epoch * steps + b, cfg.epochs * steps, cfg.lr, cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, cfg.precision):
            logits, losses = distiller.forward_train(x, y, idx, epoch)
        total = sum(losses.values())
        _check_finite(losses, total, epoch, b, cfg)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        k = len(y)
        n += k
        correct += (logits.argmax(1) == y).sum().item()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.item() * k
        for name, value in distiller.batch_stats.items():
            stats[name] = stats.get(name, 0.0) + value.double().cpu() * k
    return sums, correct, n, stats, lr


def _load_for_resume(checkpoint, meta, device, replace_stale, desc, log):
    if not checkpoint or not Path(checkpoint).exists():
        return None
    try:
        return load_checkpoint(checkpoint, meta, map_location=device)
    except CheckpointError as err:
        if not (replace_stale and "does not match" in str(err)):
            raise
        log(f"{desc}: settings changed since {checkpoint} was written; training afresh and replacing it")
        Path(checkpoint).unlink()
        return None


def fit(distiller: Distiller, data: Dataset, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
        meta: dict | None = None, teacher_test_probs: torch.Tensor | None = None,
        desc: str = "train", log=print, replace_stale: bool = False) -> list[dict]:
    """Train ``distiller`` for ``cfg.epochs`` and return the per-epoch history.

    With ``checkpoint``, a finished checkpoint is reused, an unfinished one resumed
    from its last completed epoch (model, optimizer, RNG, history), and a new one is
    written atomically after every epoch. ``teacher_test_probs`` [M,N,C] (T = 1)
    turns on fidelity metrics every ``cfg.fidelity_freq`` epochs and at the last one.
    A checkpoint made with other settings is refused, unless ``replace_stale`` (the
    notebooks' scratch folder ``outputs/interactive``), where it is replaced, and said so.
    """
    device = data.train.images.device
    meta = dict(meta or {}, epochs=cfg.epochs)
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start = [], 0
    state = _load_for_resume(checkpoint, meta, device, replace_stale, desc, log)
    if state is not None:
        distiller.student.load_state_dict(state["model"])
        distiller.load_state_dict(state["extra"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["finished"]:
            log(f"{desc}: reusing finished checkpoint {checkpoint}")
            return history
        log(f"{desc}: resuming from epoch {start} of {cfg.epochs} ({checkpoint})")
    else:
        seed_everything(cfg.seed)
    if cfg.compile:  # compiles the student's forward in place; weights and state_dict keys unchanged
        distiller.student.forward = torch.compile(distiller.student.forward)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    bar = EpochProgress(desc, cfg.epochs, start)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        sums, correct, n, stats, lr = train_epoch(distiller, optimizer, data, cfg, epoch, steps)
        test_logits = predict_logits(distiller.student, data.test, data, cfg)
        test_loss = F.cross_entropy(test_logits, data.test.labels).item()
        record = _epoch_record(epoch, lr, sums, n, correct, test_loss, accuracy(test_logits, data.test.labels),
                               time.perf_counter() - t0, {k: (v / n).tolist() for k, v in stats.items()})
        if teacher_test_probs is not None and ((epoch + 1) % cfg.fidelity_freq == 0 or epoch + 1 == cfg.epochs):
            record["fidelity"] = fidelity_metrics(teacher_test_probs, test_logits.softmax(-1))
        history.append(record)
        if checkpoint:
            atomic_save({"meta": meta, "model": distiller.student.state_dict(),
                         "extra": {k: v for k, v in distiller.state_dict().items()
                                   if not k.startswith(("student.", "teachers."))},
                         "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "finished": epoch + 1 == cfg.epochs, "history": history,
                         "rng": {"torch": torch.get_rng_state()}}, checkpoint)
        bar.epoch(record)
    bar.close()
    return history


def set_threads(threads: int | None = None) -> int:
    """Use every available core for intra-op work (``threads`` overrides)."""
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads


def teacher_meta(name: str, data: Dataset, cfg: TrainConfig) -> dict:
    """What a teacher checkpoint must match to be reused."""
    return {"kind": "teacher", "model": name, "dataset": data.name, "in_channels": data.in_channels,
            "num_classes": data.num_classes, "image_size": data.image_size, "train_size": len(data.train),
            "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "weight_decay": cfg.weight_decay, "precision": cfg.precision, "augment": cfg.augment}


def build_for(name: str, data: Dataset, device: torch.device):
    model = build_model(name, data.in_channels, data.num_classes, data.image_size).to(device)
    return model


def train_teacher(name: str, data: Dataset, cfg: TrainConfig, teacher_dir: str | Path, log=print):
    """Train teacher ``name`` (or reuse/resume its checkpoint in ``teacher_dir``).

    Returns ``(model, history, checkpoint_path)``; the checkpoint file name carries a
    hash of the settings, so changed settings train a new teacher.
    """
    meta = teacher_meta(name, data, cfg)
    path = Path(teacher_dir) / data.name / f"{name}-{meta_key(dict(meta, epochs=cfg.epochs))}.pt"
    seed_everything(cfg.seed)
    model = build_for(name, data, data.train.images.device)
    history = fit(Scratch(model), data, cfg, checkpoint=path, meta=meta, desc=name, log=log)
    return freeze(model), history, path


def load_teacher(path: str | Path, data: Dataset) -> torch.nn.Module:
    """A frozen teacher from a checkpoint, refused if made for another dataset or shape."""
    expected = {"kind": "teacher", "dataset": data.name, "in_channels": data.in_channels,
                "num_classes": data.num_classes, "image_size": data.image_size}
    state = load_checkpoint(path, expected, map_location=data.train.images.device)
    model = build_for(state["meta"]["model"], data, data.train.images.device)
    model.load_state_dict(state["model"])
    return freeze(model)


def teacher_bank(models: list, names: list[str], data: Dataset, cfg: TrainConfig, hint_layer: int = -2,
                 cache: bool = True, log=print) -> LiveTeachers:
    """Teachers for distillation: cached outputs when ``cache`` and no augmentation,
    else live. The cache covers the train and test splits."""
    if cache and cfg.augment != "none":
        log(f"teacher cache bypassed: augment={cfg.augment!r} changes every batch, teachers run live")
        cache = False
    if cfg.channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    if not cache:
        return LiveTeachers(models, names, hint_layer)
    bank = CachedTeachers(models, names, hint_layer)
    t0 = time.perf_counter()
    device = data.train.images.device
    with autocast(device, cfg.precision):
        for split_name, split in (("train", data.train), ("test", data.test)):
            batches = ((x, idx) for x, _, idx in iterate(split, data, cfg.eval_batch_size, shuffle=False,
                                                          channels_last=cfg.channels_last))
            bank.build(split_name, len(split), batches)
    bank.build_seconds = time.perf_counter() - t0
    log(f"teacher cache: {len(names)} teachers, {bank.nbytes() / 2**20:.1f} MiB, "
        f"built in {bank.build_seconds:.1f} s")
    return bank


def teacher_test_probs(bank: LiveTeachers, data: Dataset, cfg: TrainConfig) -> torch.Tensor:
    """Teachers' test-set probabilities at T = 1: [M,N,C]."""
    return torch.stack([predict_logits(m, data.test, data, cfg) for m in bank.models]).softmax(-1)


def student_meta(method: str, data: Dataset, cfg: TrainConfig, teacher_names, **hparams) -> dict:
    return {"kind": "student", "model": "student", "method": method, "dataset": data.name,
            "in_channels": data.in_channels, "num_classes": data.num_classes, "image_size": data.image_size,
            "train_size": len(data.train), "seed": cfg.seed, "teachers": list(teacher_names),
            "batch_size": cfg.batch_size, "lr": cfg.lr, "lr_schedule": cfg.lr_schedule,
            "precision": cfg.precision, "augment": cfg.augment, **hparams}


def train_student(method: str, bank: LiveTeachers, data: Dataset, cfg: TrainConfig, *, temperature=4.0,
                  alpha=0.7, beta=100.0, hint_layer=-2, checkpoint=None, test_probs=None, log=print,
                  replace_stale=False):
    """Train the student with ``method`` (scratch, vanilla, camkd) against ``bank``.

    Returns ``(distiller, history)``; seeded by ``cfg.seed`` (init, batch order, dropout).
    """
    seed_everything(cfg.seed)
    student = build_for("student", data, data.train.images.device)
    sample = normalize(data.train.images[:1], data.mean, data.std)
    distiller = build_distiller(method, student, bank, sample, temperature, alpha, beta, hint_layer)
    distiller.to(data.train.images.device)
    meta = student_meta(method, data, cfg, bank.names, temperature=temperature, alpha=alpha, beta=beta,
                        hint_layer=hint_layer)
    history = fit(distiller, data, cfg, checkpoint=checkpoint, meta=meta, teacher_test_probs=test_probs,
                  desc=f"{method} seed {cfg.seed}", log=log, replace_stale=replace_stale)
    return distiller, history
