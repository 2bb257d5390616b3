"""Measuring the speed of training: seconds per epoch and per step of every way of
training the student, FLOPs per step, the cores' matmul peak, and an estimate of the
whole book's time from those units. ``kdlib.bench`` presents them (tables, the README's
Speed block) and is the command line; see its docstring for what each row times.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..book.steps import teacher_checkpoint
from ..records.paths import PACKAGE_ROOT
from ..train.data import balanced_subset, load_dataset, normalize
from ..train.distillers import Scratch, build_distiller
from ..train.models import TEACHERS, build_model
from ..book.params import load_params, validate
from ..train.assemble import teacher_bank
from ..train.loop import TrainConfig, iterate, pick_device, predict_logits, seed_everything, set_threads, train_epoch
from ..train.teachers import freeze

BASELINES = ["aver", "ebkd", "aekd", "label_smoothing"]  # the CA-MKD paper's baselines and a teacher-free control
METHODS = ["scratch", "vanilla", "camkd", "camkd_official", *BASELINES, "vanilla_live", "camkd_live",
           "scratch_crop", "vanilla_crop", "camkd_crop", "seed_style"]
RATIOS = {"vanilla/scratch": ("vanilla", "scratch"), "camkd/scratch": ("camkd", "scratch"),
          "camkd_official/scratch": ("camkd_official", "scratch"),
          **{f"{m}/scratch": (m, "scratch") for m in BASELINES}, "seed_style/vanilla": ("seed_style", "vanilla"),
          "vanilla_live/vanilla": ("vanilla_live", "vanilla"), "camkd_live/camkd": ("camkd_live", "camkd"),
          "vanilla_crop/scratch_crop": ("vanilla_crop", "scratch_crop"),
          "camkd_crop/scratch_crop": ("camkd_crop", "scratch_crop")}
DESCRIPTIONS = {
    "scratch": "student alone (CE)",
    "vanilla": "vanilla KD, teacher logits from the cache",
    "camkd": "CAMKD (logit + feature terms), teacher outputs from the cache",
    "camkd_official": "CAMKD as published (camkd_form: official: CalWeight regressors, feature weights "
                      "with gradients), teacher outputs from the cache",
    "aver": "AVER: mean of the per-teacher KL terms, teacher logits from the cache",
    "ebkd": "EBKD: per-teacher KL terms weighted by teacher entropy, teacher logits from the cache",
    "aekd": "AEKD: per-teacher KL terms weighted by a one-class SVM (scikit-learn) on their logit "
            "gradients, each batch, teacher logits from the cache",
    "label_smoothing": "student alone, cross-entropy with smoothed labels (eps 0.1)",
    "vanilla_live": "vanilla KD, teachers run every step",
    "camkd_live": "CAMKD, teachers run every step",
    "scratch_crop": "student alone, augment: crop (random shifts of up to 2 px)",
    "vanilla_crop": "vanilla KD, augment: crop, teacher logits on the same view from the view cache",
    "camkd_crop": "CAMKD, augment: crop, teachers run every step (hint maps are not cached per view)",
    "seed_style": "seed kit's loop: DataLoader + per-sample transforms, teachers live, no channels_last, fp32",
}
CROP_METHODS = [m for m in METHODS if m.endswith("_crop")]
TEACHER_NOTE = "teachers: random init, frozen, eval mode (not trained; timing only)"
PARAMS_FILE = PACKAGE_ROOT / "params" / "fashionmnist.yaml"


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


FLOP_METHODS = ["scratch", "vanilla", "camkd", "camkd_official", *BASELINES]  # FLOPs counted, steps timed in turn
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


def chosen_methods(methods=None) -> list[str]:
    """The rows to time, in ``METHODS``' order: all of them, or the ones named and
    ``scratch`` (every ratio is taken to it)."""
    if methods is None:
        return list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown bench method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in set(methods) | {"scratch"}]


def _check(teachers: int, repeats: int, step_rounds: int, precision: str) -> None:
    """A ``ValueError`` naming the argument and what it takes, before anything is built."""
    if not 2 <= teachers <= len(TEACHERS):
        raise ValueError(f"teachers must be 2..{len(TEACHERS)} (camkd needs 2), got {teachers}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if step_rounds < 1:
        raise ValueError(f"step_rounds must be >= 1, got {step_rounds}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


def _epoch_passes(rows, data, banks: dict, cfg, crop_cfg, knobs: tuple, dev):
    """Per timed row (but the seed-style one): a function timing one epoch of its method (``time_epoch``
    with ``warmup`` steps first), on the teacher bank the row names (``_live``: teachers run every step;
    ``_crop``: the view cache); with the FLOPs of one step and the built model for the rows in
    ``FLOP_METHODS``. Returns ``(passes, flops, built)``."""
    T, alpha, beta, hint = knobs
    sample = normalize(data.train.images[:1], data.mean, data.std)
    passes, flops, built = {}, {}, {}
    for method in (m for m in rows if m != "seed_style"):
        kind, bank, c, form = method, banks["cached"], cfg, "kdbook"
        if method == "camkd_official":
            kind, form = "camkd", "official"
        elif method.endswith("_live"):
            kind, bank = method[:-5], banks["live"]
        elif method.endswith("_crop"):
            kind, bank, c = method[:-5], banks["views"], crop_cfg
        seed_everything(cfg.seed)
        student = build_model("student", data.in_channels, data.num_classes, data.image_size).to(dev)
        distiller = build_distiller(kind, student, bank, sample, T, alpha, beta, hint, camkd_form=form).to(dev)
        optimizer = prepare(distiller, c)
        if method in FLOP_METHODS:
            flops[method] = step_flops(distiller, data, c)
            built[method] = (distiller, optimizer, c)
        # epoch index 1: camkd's feature term is off in epoch 0
        passes[method] = lambda w, d=distiller, o=optimizer, c=c: time_epoch(d, data, c, 1, optimizer=o, warmup=w)
    return passes, flops, built


def run_benchmark(samples: int = 10_000, teachers: int = 3, precision: str = "fp32", repeats: int = 1, *,
                  test_samples: int = 1000, warmup: int = 3, data_root: str | Path | None = None,
                  device: str | None = None, threads: int | None = None, download: bool = True,
                  step_rounds: int = STEP_ROUNDS, methods: list[str] | None = None, log=None) -> dict:
    """Time one epoch of every method in ``methods`` (default ``METHODS``; scratch always);
    return the ``--json`` object. The teacher view cache is built only for a crop row,
    the live bank only for a live row."""
    rows = chosen_methods(methods)
    _check(teachers, repeats, step_rounds, precision)
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
    live = teacher_bank(models, names, data, cfg, hint, cache=False, log=log)  # nothing to build
    crop_cfg = dataclasses.replace(cfg, augment="crop")
    views = None
    if any(m in CROP_METHODS for m in rows):
        log(f"building the teacher view cache ({len(names)} teachers, 25 views of {len(data.train)} samples)")
        views = teacher_bank(models, names, data, crop_cfg, hint, cache=True, log=log)

    passes, flops, built = _epoch_passes(rows, data, {"cached": cached, "live": live, "views": views}, cfg, crop_cfg,
                                         (T, alpha, beta, hint), dev)
    if "seed_style" in rows:
        passes["seed_style"] = SeedStyle(seed_models, root, samples, cfg, T, alpha, dev).time

    times = {m: [] for m in rows}
    for r in range(repeats):
        for method in rows:
            times[method].append(passes[method](warmup if r == 0 else 0))
            log(f"pass {r + 1}/{repeats} {method}: {times[method][-1]:.2f} s")
    seconds = {m: round(min(ts), 4) for m, ts in times.items()}
    log(f"timing single steps in turn ({', '.join(built)}; {step_rounds} rounds)")
    steps_in_turn = interleaved_steps(built, data, cfg, step_rounds)
    log("timing one training step of each model alone, and its evaluation")
    peak = matmul_peak(dev)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    result = {"samples": len(data.train), "test_samples": len(data.test), "teachers": len(names),
              "device": str(dev), "threads": torch.get_num_threads(), "precision": precision, "methods": rows,
              "seconds": seconds,
              "ratios": {k: round(seconds[a] / seconds[b], 3) for k, (a, b) in RATIOS.items()
                         if a in seconds and b in seconds},
              "step_rounds": step_rounds,
              "step_ms": {m: round(1e3 * statistics.median(ts), 2) for m, ts in steps_in_turn.items()},
              "step_ratios": step_ratios(steps_in_turn),
              "cache_build_s": round(cached.build_seconds, 3), "cache_bytes": int(cached.nbytes()),
              "models": model_rates(["student"] + names, data, cfg),
              "matmul_gflop_per_s": round(peak, 1),
              "method_mflop_per_step": {m: round(f / 1e6, 1) for m, f in flops.items()},
              "ratio_bounds": ratio_bounds(flops, seconds, steps, peak)}
    if views is not None:
        result.update(view_cache_build_s=round(views.build_seconds, 3), view_cache_bytes=int(views.nbytes()))
    return result


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
    missing = [m for m in P["methods"] if m not in result["seconds"]]
    if missing:
        raise ValueError(f"the book estimate needs every method of the book timed; {', '.join(missing)} was not")
    for m in P["methods"]:
        per_epoch = steps * result["seconds"][m] / bench_steps + test * models["student"]["eval_s_per_image"]
        parts[f"{m}: {len(P['seeds'])} seeds x {P['student_epochs']} epochs"] = (
            len(P["seeds"]) * P["student_epochs"] * per_epoch)
    found = [t for t in P["teachers"] if teacher_checkpoint(P, t).exists()]
    reusing = sum(v for k, v in parts.items() if k.split(":")[0] not in found)
    return {"train_images": train, "test_images": test, "steps_per_epoch": steps,
            "parts_s": {k: round(v, 1) for k, v in parts.items()}, "total_s": round(sum(parts.values()), 1),
            "teachers_found": found, "total_reusing_s": round(reusing, 1)}


