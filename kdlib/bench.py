"""Seconds per training epoch for each way of training the student.

    python -m kdlib.bench [--samples N] [--teachers M [M ...]] [--precision fp32|bf16]
                          [--repeats R] [--json | --markdown] [--save FILE] [--readme README.md] [--book]

One process times ONE pass (one epoch, training steps only: no evaluation, no
checkpoint) over the same ``N`` class-balanced Fashion-MNIST training samples with
the settings of ``params/fashionmnist.yaml`` (batch 128, Adam lr 1e-3, T 4, alpha 0.7,
beta 100, hint_layer -2), for

* ``scratch``, ``vanilla``, ``camkd``: kdlib's loop, teachers served from the cache
  (``CachedTeachers``; camkd is timed in an epoch where its feature term is on);
* ``camkd_official``: the same with ``camkd_form: official`` (``CalWeight``: pooling or
  resizing, then a 1x1 ``Embed``, instead of ``ConvReg``'s 5x5 conv for teacher_vgg's
  3x3 map; the teachers' heads run with their graph);
* ``vanilla_live``, ``camkd_live``: the same, teachers run on every batch;
* ``scratch_crop``, ``vanilla_crop``, ``camkd_crop``: ``augment: crop``; vanilla's
  teacher logits on each image's view served from the view cache
  (``ViewCachedTeachers``; its one-off build, 25 evaluation passes per teacher, is
  reported apart as ``view_cache_build_s``), CAMKD's teachers run live (their hint
  maps on every view are not kept);
* ``seed_style``: the old seed kit's way: torchvision dataset with per-sample
  ``ToTensor``/``Normalize`` through a ``DataLoader``, default memory layout,
  teachers run live, vanilla KD loss computed the plain way, always fp32.

Teachers are randomly initialised, frozen and in eval mode: their accuracy does not
change the work a step does, so they are not trained for timing. Each method is
warmed up for a few steps first; with ``--repeats R`` > 1 the passes are interleaved
across methods (so a burst of load elsewhere hits them alike) and the fastest pass of
each method is reported. Ratios are taken within the one process.

Then each model (student, teachers) is timed training alone for a few steps and
evaluating the test samples: its FLOPs per training step (``FlopCounterMode``) over
its seconds per step give GFLOP/s, set beside what one fp32 matrix product reaches on
the same cores (``matmul_peak``: the limit dense work can aim at). The FLOPs of one
training step of each cache-served method give a lower bound on its ratio to scratch
(``ratio_bounds``: its extra FLOPs run at that peak, its memory-bound work free).
``--book`` turns the per-step and per-image times into an estimate of the whole book's
time (``book_estimate``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .book import teacher_checkpoint
from .data import balanced_subset, load_dataset, normalize
from .distillers import Scratch, build_distiller
from .models import TEACHERS, build_model
from .params import load_params, validate
from .train import (TrainConfig, iterate, pick_device, predict_logits, seed_everything, set_threads,
                    teacher_bank, train_epoch)
from .teachers import freeze

METHODS = ["scratch", "vanilla", "camkd", "camkd_official", "vanilla_live", "camkd_live", "scratch_crop",
           "vanilla_crop", "camkd_crop", "seed_style"]
RATIOS = {"vanilla/scratch": ("vanilla", "scratch"), "camkd/scratch": ("camkd", "scratch"),
          "camkd_official/scratch": ("camkd_official", "scratch"), "seed_style/vanilla": ("seed_style", "vanilla"),
          "vanilla_live/vanilla": ("vanilla_live", "vanilla"), "camkd_live/camkd": ("camkd_live", "camkd"),
          "vanilla_crop/scratch_crop": ("vanilla_crop", "scratch_crop"),
          "camkd_crop/scratch_crop": ("camkd_crop", "scratch_crop")}
DESCRIPTIONS = {
    "scratch": "student alone (CE)",
    "vanilla": "vanilla KD, teacher logits from the cache",
    "camkd": "CAMKD (logit + feature terms), teacher outputs from the cache",
    "camkd_official": "CAMKD as published (camkd_form: official: CalWeight regressors, feature weights "
                      "with gradients), teacher outputs from the cache",
    "vanilla_live": "vanilla KD, teachers run every step",
    "camkd_live": "CAMKD, teachers run every step",
    "scratch_crop": "student alone, augment: crop (random shifts of up to 2 px)",
    "vanilla_crop": "vanilla KD, augment: crop, teacher logits on the same view from the view cache",
    "camkd_crop": "CAMKD, augment: crop, teachers run every step (hint maps are not cached per view)",
    "seed_style": "seed kit's loop: DataLoader + per-sample transforms, teachers live, no channels_last, fp32",
}
TEACHER_NOTE = "teachers: random init, frozen, eval mode (not trained; timing only)"
PARAMS_FILE = Path(__file__).resolve().parent.parent / "params" / "fashionmnist.yaml"


def bench_params() -> dict:
    """The main experiment's params (``params/fashionmnist.yaml``), or the schema's
    defaults (the same values) when the file is not there (an installed package)."""
    return load_params(PARAMS_FILE) if PARAMS_FILE.is_file() else validate({}, "defaults")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(distiller, cfg: TrainConfig) -> torch.optim.Optimizer:
    """What ``fit`` does before its first epoch: memory layout and the optimizer."""
    if cfg.channels_last:
        distiller.to(memory_format=torch.channels_last)
    return torch.optim.Adam(distiller.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def time_epoch(distiller, data, cfg: TrainConfig, epoch: int = 1, *, optimizer=None, warmup: int = 0) -> float:
    """Seconds for one training pass over ``data.train`` (``train_epoch``, fit's inner
    loop), after ``warmup`` untimed steps. Pass the same ``optimizer`` to time again."""
    optimizer = optimizer or prepare(distiller, cfg)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    if warmup:
        train_epoch(distiller, optimizer, data, cfg, epoch, steps, max_batches=warmup)
    device = data.train.images.device
    _sync(device)
    t0 = time.perf_counter()
    train_epoch(distiller, optimizer, data, cfg, epoch, steps)
    _sync(device)
    return time.perf_counter() - t0


class SeedStyle:
    """The seed kit's training loop, for comparison: torchvision's dataset with
    per-sample transforms through a ``DataLoader``, teachers run on every batch,
    CE + alpha * T^2 * KL(centroid || softmax(s/T)) computed directly, fp32,
    default (contiguous) memory layout."""

    def __init__(self, teachers: list, data_root, samples: int, cfg: TrainConfig,
                 temperature: float, alpha: float, device: torch.device):
        import torchvision
        from torch.utils.data import DataLoader, Subset
        from torchvision import transforms
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
        train = torchvision.datasets.FashionMNIST(str(data_root), train=True, download=False, transform=tf)
        indices = balanced_subset(torch.as_tensor(train.targets, dtype=torch.long), samples)  # load_dataset's
        self.loader = DataLoader(Subset(train, indices.tolist()), batch_size=cfg.batch_size, shuffle=True)
        self.teachers = [freeze(t) for t in teachers]
        seed_everything(cfg.seed)
        self.student = build_model("student").to(device)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=cfg.lr)
        self.T, self.alpha, self.device = temperature, alpha, device

    def one_pass(self, max_batches: int | None = None) -> float:
        """Train over the loader once (or ``max_batches`` batches); return the mean loss."""
        self.student.train()
        running, correct, seen = 0.0, 0, 0
        for b, (x, y) in enumerate(self.loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad()
            out = self.student(x)
            with torch.no_grad():
                t_outs = [t(x) for t in self.teachers]
            centroid = sum(F.softmax(t / self.T, dim=1) for t in t_outs) / len(t_outs)
            kd = F.kl_div(F.log_softmax(out / self.T, dim=1), centroid, reduction="batchmean") * self.T ** 2
            loss = F.cross_entropy(out, y) + self.alpha * kd
            loss.backward()
            self.optimizer.step()
            running += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
        return running / max(seen, 1)

    def time(self, warmup: int = 0) -> float:
        if warmup:
            self.one_pass(max_batches=warmup)
        _sync(self.device)
        t0 = time.perf_counter()
        self.one_pass()
        _sync(self.device)
        return time.perf_counter() - t0


FLOP_METHODS = ["scratch", "vanilla", "camkd", "camkd_official"]
STEP_ROUNDS = 40  # rounds of single steps taken in turn (interleaved_steps), by default


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of one fp32 ``size`` x ``size`` matrix product on ``device``, best of
    ``repeats`` after one warm-up: the rate these cores reach on dense work."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    best = math.inf
    for r in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def step_flops(distiller, data, cfg: TrainConfig, epoch: int = 1) -> int:
    """FLOPs of one training step of ``distiller`` (forward and backward of its loss on
    one batch, epoch ``epoch``), counted by ``torch.utils.flop_counter``; the gradients
    it leaves are cleared."""
    from torch.utils.flop_counter import FlopCounterMode
    x, y, idx = next(iterate(data.train, data, cfg.batch_size, channels_last=cfg.channels_last))
    with FlopCounterMode(display=False) as counter:
        sum(distiller.forward_train(x, y, idx, epoch)[1].values()).backward()
    distiller.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def interleaved_steps(runs: dict, data, cfg: TrainConfig, rounds: int = STEP_ROUNDS) -> dict:
    """Seconds of single training steps taken in turn: each round runs one step of every
    method in ``runs`` ({method: (distiller, optimizer, cfg)}), so a burst of load
    elsewhere falls on all of them alike. Returns {method: [seconds of each step]}."""
    device = data.train.images.device
    steps = math.ceil(len(data.train) / cfg.batch_size)
    times = {m: [] for m in runs}
    for _ in range(rounds):
        for method, (distiller, optimizer, c) in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            train_epoch(distiller, optimizer, data, c, 1, steps, max_batches=1)
            _sync(device)
            times[method].append(time.perf_counter() - t0)
    return times


def step_ratios(times: dict) -> dict:
    """``method/scratch`` of the median single-step times of ``interleaved_steps``."""
    med = {m: statistics.median(ts) for m, ts in times.items()}
    return {f"{m}/scratch": round(med[m] / med["scratch"], 3) for m in med if m != "scratch"}


def ratio_bounds(flops: dict, seconds: dict, steps: int, peak_gflops: float) -> dict:
    """For each method in ``flops`` but scratch: the least ``method/scratch`` could be
    if the student's step took what scratch's did (``seconds["scratch"] / steps``) and
    the method's extra FLOPs ran at ``peak_gflops`` with its memory-bound work free."""
    step = seconds["scratch"] / steps
    return {f"{m}/scratch": round(1 + max(f - flops["scratch"], 0) / (peak_gflops * 1e9) / step, 3)
            for m, f in flops.items() if m != "scratch"}


def model_rates(names: list[str], data, cfg: TrainConfig, steps: int = 5, warmup: int = 2) -> dict:
    """Per model, trained alone (``Scratch``, as teachers are): the FLOPs of one training
    step (forward and backward, counted by ``torch.utils.flop_counter``), the seconds
    per step (median of ``steps`` after ``warmup``), their ratio in GFLOP/s, and the
    seconds per image of evaluation (``predict_logits`` over ``data.test``)."""
    device = data.train.images.device
    steps = min(steps, math.ceil(len(data.train) / cfg.batch_size))
    rates = {}
    for name in names:
        seed_everything(0)
        distiller = Scratch(build_model(name, data.in_channels, data.num_classes, data.image_size).to(device))
        optimizer = prepare(distiller, cfg)
        flop = step_flops(distiller, data, cfg)
        train_epoch(distiller, optimizer, data, cfg, 1, steps, max_batches=warmup)
        times = []
        for b in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            train_epoch(distiller, optimizer, data, cfg, 1, steps, max_batches=1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        predict_logits(distiller.student, data.test, data, cfg)
        _sync(device)
        step = statistics.median(times)
        rates[name] = {"mflop_per_step": round(flop / 1e6, 1), "step_s": round(step, 5),
                       "gflop_per_s": round(flop / step / 1e9, 1),
                       "eval_s_per_image": (time.perf_counter() - t0) / len(data.test)}
    return rates


def run_benchmark(samples: int = 10_000, teachers: int = 3, precision: str = "fp32", repeats: int = 1, *,
                  test_samples: int = 1000, warmup: int = 3, data_root: str | Path | None = None,
                  device: str | None = None, threads: int | None = None, download: bool = True,
                  step_rounds: int = STEP_ROUNDS, log=None) -> dict:
    """Time one epoch of every method in ``METHODS``; return the ``--json`` object."""
    if not 2 <= teachers <= len(TEACHERS):
        raise ValueError(f"teachers must be 2..{len(TEACHERS)} (camkd needs 2), got {teachers}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if step_rounds < 1:
        raise ValueError(f"step_rounds must be >= 1, got {step_rounds}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    log = log or (lambda *a, **k: None)
    P = bench_params()
    set_threads(threads if threads is not None else (P["threads"] or None))
    dev = pick_device(device or P["device"])
    root = Path(data_root if data_root is not None else P["data_root"]).expanduser()
    data = load_dataset("FashionMNIST", root, train_subset=samples, test_subset=test_samples,
                        download=download).to(dev)
    cfg = TrainConfig(epochs=P["student_epochs"], batch_size=P["batch_size"], lr=P["lr"],
                      lr_schedule=P["lr_schedule"], weight_decay=P["weight_decay"], seed=0,
                      precision=precision, augment="none", device=str(dev))
    T, alpha, beta, hint = P["temperature"], P["alpha"], P["beta"], P["hint_layer"]
    names = TEACHERS[:teachers]

    seed_everything(P["teacher_seed"])
    models = [freeze(build_model(n, data.in_channels, data.num_classes, data.image_size).to(dev)) for n in names]
    seed_models = [copy.deepcopy(m).to(memory_format=torch.contiguous_format) for m in models]
    log(f"building the teacher cache ({len(names)} teachers, {len(data.train)} + {len(data.test)} samples)")
    cached = teacher_bank(models, names, data, cfg, hint, cache=True, log=log)
    live = teacher_bank(models, names, data, cfg, hint, cache=False, log=log)
    crop_cfg = dataclasses.replace(cfg, augment="crop")
    log(f"building the teacher view cache ({len(names)} teachers, 25 views of {len(data.train)} samples)")
    views = teacher_bank(models, names, data, crop_cfg, hint, cache=True, log=log)

    sample = normalize(data.train.images[:1], data.mean, data.std)
    passes, flops, built = {}, {}, {}
    for method in METHODS[:-1]:
        kind, bank, c, form = method, cached, cfg, "kdbook"
        if method == "camkd_official":
            kind, form = "camkd", "official"
        elif method.endswith("_live"):
            kind, bank = method[:-5], live
        elif method.endswith("_crop"):
            kind, bank, c = method[:-5], views, crop_cfg
        seed_everything(cfg.seed)
        student = build_model("student", data.in_channels, data.num_classes, data.image_size).to(dev)
        distiller = build_distiller(kind, student, bank, sample, T, alpha, beta, hint, camkd_form=form).to(dev)
        optimizer = prepare(distiller, c)
        if method in FLOP_METHODS:
            flops[method] = step_flops(distiller, data, c)
            built[method] = (distiller, optimizer, c)
        # epoch index 1: camkd's feature term is off in epoch 0
        passes[method] = lambda w, d=distiller, o=optimizer, c=c: time_epoch(d, data, c, 1, optimizer=o, warmup=w)
    passes["seed_style"] = SeedStyle(seed_models, root, samples, cfg, T, alpha, dev).time

    times = {m: [] for m in METHODS}
    for r in range(repeats):
        for method in METHODS:
            times[method].append(passes[method](warmup if r == 0 else 0))
            log(f"pass {r + 1}/{repeats} {method}: {times[method][-1]:.2f} s")
    seconds = {m: round(min(ts), 4) for m, ts in times.items()}
    log(f"timing single steps in turn ({', '.join(built)}; {step_rounds} rounds)")
    steps_in_turn = interleaved_steps(built, data, cfg, step_rounds)
    log("timing one training step of each model alone, and its evaluation")
    peak = matmul_peak(dev)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    return {"samples": len(data.train), "test_samples": len(data.test), "teachers": len(names), "device": str(dev),
            "threads": torch.get_num_threads(), "precision": precision, "seconds": seconds,
            "ratios": {k: round(seconds[a] / seconds[b], 3) for k, (a, b) in RATIOS.items()},
            "step_rounds": step_rounds,
            "step_ms": {m: round(1e3 * statistics.median(ts), 2) for m, ts in steps_in_turn.items()},
            "step_ratios": step_ratios(steps_in_turn),
            "cache_build_s": round(cached.build_seconds, 3), "cache_bytes": int(cached.nbytes()),
            "view_cache_build_s": round(views.build_seconds, 3), "view_cache_bytes": int(views.nbytes()),
            "models": model_rates(["student"] + names, data, cfg),
            "matmul_gflop_per_s": round(peak, 1),
            "method_mflop_per_step": {m: round(f / 1e6, 1) for m, f in flops.items()},
            "ratio_bounds": ratio_bounds(flops, seconds, steps, peak)}


FULL_SIZES = {"FashionMNIST": (60_000, 10_000), "MNIST": (60_000, 10_000), "CIFAR10": (50_000, 10_000)}


def book_estimate(result: dict, P: dict) -> dict:
    """Seconds the book (``make book`` with params ``P``) would take, from ``result``'s
    measured units: each teacher's seconds per training step and per evaluated image,
    the cache's seconds per image, and each method's seconds per step (its epoch over
    ``result["samples"]`` divided by that epoch's steps). Counts training, the
    per-epoch evaluation and the cache build; not notebook start-up, plots, reports."""
    train, test = FULL_SIZES[P["dataset"]]
    train, test = P["train_subset"] or train, P["test_subset"] or test
    steps = math.ceil(train / P["batch_size"])
    models = result["models"]
    parts = {}
    for t in P["teachers"]:
        per_epoch = steps * models[t]["step_s"] + test * models[t]["eval_s_per_image"]
        parts[f"{t}: {P['teacher_epochs']} epochs"] = P["teacher_epochs"] * per_epoch
    parts["teacher cache"] = (train + test) * result["cache_build_s"] / (result["samples"] + result["test_samples"])
    bench_steps = math.ceil(result["samples"] / P["batch_size"])
    for m in P["methods"]:
        per_epoch = steps * result["seconds"][m] / bench_steps + test * models["student"]["eval_s_per_image"]
        parts[f"{m}: {len(P['seeds'])} seeds x {P['student_epochs']} epochs"] = (
            len(P["seeds"]) * P["student_epochs"] * per_epoch)
    found = [t for t in P["teachers"] if teacher_checkpoint(P, t).exists()]
    reusing = sum(v for k, v in parts.items() if k.split(":")[0] not in found)
    return {"train_images": train, "test_images": test, "steps_per_epoch": steps,
            "parts_s": {k: round(v, 1) for k, v in parts.items()}, "total_s": round(sum(parts.values()), 1),
            "teachers_found": found, "total_reusing_s": round(reusing, 1)}


def format_book(book: dict) -> str:
    lines = [f"book estimate ({PARAMS_FILE.name}: {book['train_images']:,} training images, "
             f"{book['steps_per_epoch']} steps per epoch, {book['test_images']:,} evaluated per epoch):"]
    lines += [f"  {k:<40}{v / 60:>8.1f} min" for k, v in book["parts_s"].items()]
    lines.append(f"  {'total':<40}{book['total_s'] / 60:>8.1f} min (training, evaluation, cache; "
                 f"not notebook start-up, plots, reports)")
    if book.get("teachers_found"):
        lines.append(f"  {'total reusing the teachers found':<40}{book['total_reusing_s'] / 60:>8.1f} min "
                     f"({', '.join(book['teachers_found'])} already trained with these settings, e.g. the "
                     f"shipped reference teachers: make book loads them instead of training them)")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(result: dict) -> str:
    dev = result["device"]
    where = cpu_name()
    if dev.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(torch.device(dev))} (host CPU {where})"
    return (f"machine: {where}; {result['threads']} torch threads; device {dev}; "
            f"torch {torch.__version__}")


def _header(result: dict, repeats: int) -> str:
    names = ", ".join(TEACHERS[:result["teachers"]])
    best = f"best of {repeats} passes" if repeats > 1 else "one pass"
    return (f"one training epoch over {result['samples']} Fashion-MNIST samples (batch 128), "
            f"{result['teachers']} teachers ({names}), {result['precision']}, {best} per method")


def work_line(result: dict) -> str:
    """FLOPs per training step of the cache-served methods, and the ratio bounds they give."""
    mf, bounds = result["method_mflop_per_step"], result["ratio_bounds"]
    work = ", ".join(f"{m} {v:,.0f}" for m, v in mf.items())
    least = ", ".join(f"{k} {v:.2f}" for k, v in bounds.items())
    return (f"M={result['teachers']}: MFLOP per training step (batch 128): {work}. Least ratios if each "
            f"method's extra FLOPs ran at the peak, its memory-bound work free: {least}.")


def steps_line(result: dict) -> str:
    """The interleaved single steps: median ms per method and their ratios to scratch."""
    ms = ", ".join(f"{m} {v:.1f}" for m, v in result["step_ms"].items())
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in result["step_ratios"].items())
    return (f"M={result['teachers']}: single steps taken in turn ({result['step_rounds']} rounds, one step of each "
            f"method per round), median ms: {ms}; ratios of the medians: {ratios}.")


def format_table(result: dict, repeats: int = 1) -> str:
    s = result["seconds"]
    lines = [_header(result, repeats), TEACHER_NOTE, "",
             f"{'method':<14}{'seconds':>9}{'x scratch':>11}  what runs"]
    for m in METHODS:
        lines.append(f"{m:<14}{s[m]:>9.2f}{s[m] / s['scratch']:>11.2f}  {DESCRIPTIONS[m]}")
    lines.append("")
    lines += [f"{k:<22}{v:>7.2f}" for k, v in result["ratios"].items()]
    lines += ["", steps_line(result)]
    peak = result["matmul_gflop_per_s"]
    lines += ["", f"{'model':<18}{'MFLOP/step':>11}{'ms/step':>9}{'GFLOP/s':>9}{'% of peak':>11}"]
    lines += [f"{n:<18}{r['mflop_per_step']:>11.0f}{r['step_s'] * 1e3:>9.1f}{r['gflop_per_s']:>9.1f}"
              f"{100 * r['gflop_per_s'] / peak:>10.0f}%" for n, r in result["models"].items()]
    lines += ["", f"peak: one fp32 2048x2048 matrix product, {peak:.1f} GFLOP/s on these cores",
              work_line(result)]
    lines += ["", f"teacher cache: built in {result['cache_build_s']:.2f} s (train + test), "
                  f"{result['cache_bytes'] / 2**20:.1f} MiB",
              f"teacher view cache (augment: crop, logits only): built once in {result['view_cache_build_s']:.2f} s "
              f"(25 passes per teacher over the training samples), {result['view_cache_bytes'] / 2**20:.1f} MiB",
              machine_line(result)]
    return "\n".join(lines)


def format_markdown(result: dict, repeats: int = 1) -> str:
    s = result["seconds"]
    lines = ["| method | what runs each step | s / epoch | × scratch |", "|---|---|---:|---:|"]
    for m in METHODS:
        lines.append(f"| `{m}` | {DESCRIPTIONS[m]} | {s[m]:.2f} | {s[m] / s['scratch']:.2f} |")
    r = result["ratios"]
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in r.items())
    lines += ["", work_line(result), "", steps_line(result),
              "", f"Seconds for {_header(result, repeats)}; {TEACHER_NOTE}. Teacher cache (train + test) "
                  f"built in {result['cache_build_s']:.1f} s, {result['cache_bytes'] / 2**20:.1f} MiB; view cache "
                  f"(crop) built once in {result['view_cache_build_s']:.1f} s, "
                  f"{result['view_cache_bytes'] / 2**20:.1f} MiB. "
                  f"Ratios: {ratios}. M{machine_line(result)[1:]}."]
    return "\n".join(lines)


def speed_markdown(results: list[dict], repeats: int = 1, load: tuple | None = None) -> str:
    """The README's Speed table: one column pair (seconds, x scratch) per teacher count."""
    head = "| method | what runs each step | " + " | ".join(
        f"s / epoch, M={r['teachers']} | × scratch" for r in results) + " |"
    lines = [head, "|---|---|" + "---:|---:|" * len(results)]
    for m in METHODS:
        cells = " | ".join(f"{r['seconds'][m]:.2f} | {r['seconds'][m] / r['seconds']['scratch']:.2f}"
                           for r in results)
        lines.append(f"| `{m}` | {DESCRIPTIONS[m]} | {cells} |")
    r0 = results[0]
    best = f"best of {repeats} passes" if repeats > 1 else "one pass"
    cache = "; ".join(f"M={r['teachers']}: built in {r['cache_build_s']:.1f} s, {r['cache_bytes'] / 2**20:.0f} MiB"
                      for r in results)
    views = "; ".join(f"M={r['teachers']}: built once in {r['view_cache_build_s']:.1f} s, "
                      f"{r['view_cache_bytes'] / 2**20:.0f} MiB" for r in results if "view_cache_build_s" in r)
    quiet = "" if load is None else f" Load average when it started: {load[0]:.2f}."
    flags = "".join(flag for flag, on in ((f" --samples {r0['samples']}", r0["samples"] != 10_000),
                                          (f" --repeats {repeats}", repeats > 1),
                                          (f" --step-rounds {r0.get('step_rounds')}",
                                           r0.get("step_rounds", STEP_ROUNDS) != STEP_ROUNDS),
                                          (" --book", any("book" in r for r in results))) if on)
    lines += ["", f"Generated by `python -m kdlib.bench --teachers {' '.join(str(r['teachers']) for r in results)}"
                  f"{flags} --readme README.md`: one training epoch over "
                  f"{r0['samples']:,} Fashion-MNIST images (batch 128, params of `fashionmnist.yaml`), {best} per "
                  f"method, {r0['precision']}; {TEACHER_NOTE}. M{machine_line(r0)[1:]}.{quiet}",
              f"Teacher cache (train + test splits, hint features in fp16): {cache}. "
              f"Teacher view cache for `augment: crop` (logits on 25 views of each training image): {views}."]
    lines += [""] + [work_line(r) for r in results]
    lines += [""] + [steps_line(r) for r in results if "step_ratios" in r]
    last = results[-1]  # the largest teacher set holds every model
    models, peak = last["models"], last["matmul_gflop_per_s"]
    lines += ["", "| model | MFLOP per training step (batch 128) | ms per step | GFLOP/s | % of peak |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| `{n}` | {r['mflop_per_step']:,.0f} | {r['step_s'] * 1e3:.1f} | {r['gflop_per_s']:.1f} | "
              f"{100 * r['gflop_per_s'] / peak:.0f}% |" for n, r in models.items()]
    lines += ["", "Each model trained alone (cross-entropy, Adam), median of 5 steps; FLOPs counted by "
                  "`torch.utils.flop_counter` (forward and backward); peak: one fp32 2048x2048 matrix "
                  f"product on the same cores, {peak:.1f} GFLOP/s (best of 5)."]
    books = [r["book"] for r in results if "book" in r]
    if books:
        b = books[0]
        lines += ["", f"`--book` estimate of `make book` from these measurements: {b['total_s'] / 60:.1f} min "
                      f"with the teachers trained"
                      + (f", {b['total_reusing_s'] / 60:.1f} min loading the shipped reference teachers "
                         f"(what `make book` does on a fresh clone)" if b["teachers_found"] else "")
                      + " (training, evaluation and the cache; not notebook start-up, plots, reports)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdlib.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=10_000, help="training samples per epoch (default 10000)")
    ap.add_argument("--teachers", type=int, nargs="+", default=[3],
                    help="3 (cnn1, cnn2, resnet) or 5 (+ vgg, densenet); several values run one after another")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per method; the fastest is kept")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    ap.add_argument("--step-rounds", type=int, default=STEP_ROUNDS,
                    help="rounds of single steps taken in turn (scratch, vanilla, camkd, camkd_official)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    ap.add_argument("--data-root", default=None, help="torchvision's data folder (default: data)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--markdown", action="store_true", help="print a markdown table for the README")
    ap.add_argument("--save", help="also write the results (a JSON list, one object per M) to this file")
    ap.add_argument("--readme", help="replace the <!-- speed:start --> ... <!-- speed:end --> block of this file")
    ap.add_argument("--book", action="store_true",
                    help=f"also estimate the whole book's time ({PARAMS_FILE.name}) from this run's measurements")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be >= 1")
    book_teachers = bench_params()["teachers"]
    if args.book and book_teachers not in [TEACHERS[:m] for m in args.teachers]:
        ap.error(f"--book needs --teachers {len(book_teachers)} among the teacher counts (the teachers of "
                 f"{PARAMS_FILE.name}: {', '.join(book_teachers)})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = []
    for m in args.teachers:
        try:
            result = run_benchmark(args.samples, m, args.precision, args.repeats, warmup=args.warmup,
                                   data_root=args.data_root, device=args.device, threads=args.threads,
                                   step_rounds=args.step_rounds,
                                   log=lambda *a, **k: print(*a, file=sys.stderr))
        except ValueError as err:
            ap.error(str(err))
        if args.book and TEACHERS[:m] == book_teachers:
            result["book"] = book_estimate(result, bench_params())
        results.append(result)
        if args.json:
            print(TEACHER_NOTE, file=sys.stderr)
            print(json.dumps(result), flush=True)
        elif args.markdown:
            print(format_markdown(result, args.repeats), flush=True)
        else:
            print(format_table(result, args.repeats), flush=True)
        if "book" in result and not args.json:
            print(format_book(result["book"]), flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1) + "\n")
    if args.readme:
        from .report import update_readme
        update_readme(args.readme, speed_markdown(results, args.repeats, load), "speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
