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

from .checkpoint import CheckpointError, CheckpointMismatch, atomic_save, load_checkpoint
from .data import Dataset, Split, augment_batch, batch_order, normalize, repeated_batch_order, unshifted_view
from .distillers import Distiller
from .losses import UNLABELLED
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
    # 256, not more: glibc mmaps every block over 32 MiB afresh (its cap on the mmap threshold), and
    # at 1024 images the first activations pass it, so each batch page-faults its memory in: the
    # student evaluates at 120 us/image at 256 against 223 at 1024 here, with bit-identical logits
    eval_batch_size: int = 256
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
            shuffle: bool = True, augment: str = "none", channels_last: bool = False,
            only: torch.Tensor | None = None, views: bool = False):
    """Yield ``(x, y, idx)``: normalised float batches, labels and sample indices; with
    ``views``, ``(x, y, idx, view)`` where ``view`` [B] is each image's augmented view
    (``kdlib.data.apply_views``; None without augmentation). ``only`` (sample indices)
    draws the epoch's ``len(split)`` samples from those alone (``repeated_batch_order``)."""
    gen = torch.Generator().manual_seed(seed * 7919 + epoch)
    order = (batch_order(len(split), batch_size, seed, epoch, shuffle) if only is None
             else repeated_batch_order(only, len(split), batch_size, seed, epoch))
    for idx in order:
        idx = idx.to(split.images.device)
        images, view = split.images[idx], None
        if augment != "none":
            images, view = augment_batch(images, gen, flip=augment == "crop_flip", return_views=True)
        x = normalize(images, data.mean, data.std, channels_last)
        yield (x, split.labels[idx], idx, view) if views else (x, split.labels[idx], idx)


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


@torch.no_grad()
def predict_teacher_weights(distiller: Distiller, data: Dataset, cfg: TrainConfig):
    """``(weights [M,N], teacher logits [M,N,C])`` over the training images, or None for a
    method without per-image teacher weights (``Distiller.teacher_weights``).

    One pass, in order, without augmentation (under ``augment`` the teachers answer on
    the unshifted view), without gradients, in eval mode; labels as training passes them
    (``UNLABELLED`` outside a ``labelled_subset``)."""
    was_training = distiller.training
    distiller.eval()
    weights, logits = [], []
    labelled = data.labelled
    device = data.train.images.device
    try:
        with autocast(device, cfg.precision):
            for x, y, idx in iterate(data.train, data, cfg.eval_batch_size, shuffle=False,
                                     channels_last=cfg.channels_last):
                target = y if labelled is None else torch.where(labelled[idx], y, UNLABELLED)
                key = idx if cfg.augment == "none" else unshifted_view() * len(data.train) + idx  # the bank's row
                w = distiller.teacher_weights(x, target, key)
                if w is None:
                    return None
                weights.append(w.float())
                logits.append(distiller.teachers.logits(x, key).float())
    finally:
        distiller.train(was_training)
    return torch.cat(weights, 1), torch.cat(logits, 1)


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
    labelled = data.labelled
    only = None if labelled is None or distiller.learns_from_teachers else labelled.nonzero().flatten()
    batches = iterate(data.train, data, cfg.batch_size, seed=cfg.seed, epoch=epoch, augment=cfg.augment,
                      channels_last=cfg.channels_last, only=only, views=True)
    for b, (x, y, idx, view) in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        lr = lr_at(epoch * steps + b, cfg.epochs * steps, cfg.lr, cfg.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        target = y if labelled is None else torch.where(labelled[idx], y, UNLABELLED)
        key = idx if view is None else view * len(data.train) + idx  # the teacher bank's row (view, sample)
        with autocast(device, cfg.precision):
            logits, losses = distiller.forward_train(x, target, key, epoch)
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


def _load_for_resume(checkpoint, identity, device, replace_stale, desc, log):
    if not checkpoint or not Path(checkpoint).exists():
        return None
    try:
        return load_checkpoint(checkpoint, identity, map_location=device)
    except CheckpointMismatch as err:
        if not replace_stale:
            raise
        log(f"{desc}: {err}; training afresh and replacing it (outputs/interactive)")
        Path(checkpoint).unlink()
        return None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(distiller: Distiller, optimizer, state: dict, checkpoint) -> None:
    """Model, the method's own parts, optimizer and RNG exactly as checkpointed; any
    missing or unexpected key fails loudly (never a silent re-initialisation)."""
    try:
        distiller.student.load_state_dict(state["model"])
        distiller.extra_module().load_state_dict(state["extra"])
        if state["finished"]:  # weights suffice (a shipped teacher carries no optimizer state)
            return
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit this model "
                              f"({str(err).splitlines()[0]}); delete it to retrain") from None
    torch.set_rng_state(state["rng"]["torch"].cpu())
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])


def fit(distiller: Distiller, data: Dataset, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
        identity: dict | None = None, teacher_test_probs: torch.Tensor | None = None,
        desc: str = "train", log=print, replace_stale: bool = False, on_epoch=None) -> list[dict]:
    """Train ``distiller`` for ``cfg.epochs`` and return the per-epoch history.

    With ``checkpoint`` (and the ``identity`` of the model being trained, from
    ``kdlib.book.params``), a finished checkpoint is reused, an unfinished one resumed from
    its last completed epoch (model, the method's own parts, optimizer, CPU and CUDA
    RNG, history), and a new one is written atomically after every epoch.
    ``teacher_test_probs`` [M,N,C] (T = 1) turns on fidelity metrics every
    ``cfg.fidelity_freq`` epochs and at the last one. A checkpoint with another
    identity is refused, naming the keys that differ, unless ``replace_stale`` (the
    notebooks' scratch folder ``outputs/interactive``), where it is replaced, and said so.
    ``on_epoch(record)`` is called after each epoch's record (and checkpoint); an exception it
    raises ends training there (a tuning trial that its pruner stops, ``kdlib.fanout.tune``).
    """
    if checkpoint and identity is None:
        raise ValueError("fit: a checkpoint needs the identity of the model it holds (kdlib.params)")
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, start = [], 0
    state = _load_for_resume(checkpoint, identity, data.train.images.device, replace_stale, desc, log)
    if state is not None:
        _restore(distiller, optimizer, state, checkpoint)
        history, start = state["history"], state["epoch"]
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
            atomic_save({"identity": identity, "model": distiller.student.state_dict(),
                         "extra": distiller.extra_module().state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                         "finished": epoch + 1 == cfg.epochs, "history": history, "rng": _rng_state()}, checkpoint)
        bar.epoch(record)
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    return history


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Let glibc's malloc keep memory freed by one training step for the next, instead of
    handing it back to the kernel and faulting it in again.

    Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
    ``distributed.nanny.pre-spawn-environ``), and the notebook kernels a sweep starts
    inherit it. Setting any malloc threshold turns off glibc's dynamic mmap threshold, so
    every tensor over 128 KiB is then mmapped and unmapped on each step: measured here, a
    student training step 1.5-1.9x slower, with 40% of a sweep run's CPU time spent in the
    kernel on page faults. Raising both thresholds at run time (``mallopt``) undoes it,
    whatever the environment says. Allocations up to ``mmap_threshold`` come from the heap;
    up to ``trim_threshold`` bytes of freed heap are kept. Returns False where the C
    library is not glibc (nothing changed)."""
    import ctypes
    import platform
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    return bool(mmap_set and trim_set)


def set_threads(threads: int | None = None) -> int:
    """Use every available core for intra-op work (``threads`` overrides); and keep freed
    memory for reuse (``keep_freed_memory``): every run, sweep task and benchmark calls this."""
    keep_freed_memory()
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return threads
