"""Assembling what the loop trains: teachers (trained, resumed or loaded), the bank
that serves their outputs, and students with their distillers.

``kdlib.train`` holds the loop; this module builds what goes into it, and the book's
steps (``kdlib.book.steps``) call these.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from filelock import FileLock

from .checkpoint import CheckpointError, CheckpointMismatch, atomic_save, identity_diff, load_checkpoint
from .data import Dataset, Split, apply_views, batch_order, normalize, view_count
from .distillers import Scratch, build_distiller
from .models import build_model
from .teachers import CachedTeachers, LiveTeachers, ViewCachedTeachers, freeze
from .loop import TrainConfig, autocast, fit, iterate, predict_logits, seed_everything


def build_for(name: str, data: Dataset, device: torch.device, width: float = 1.0):
    """Model ``name`` for ``data``'s images and classes; ``width`` scales the student."""
    return build_model(name, data.in_channels, data.num_classes, data.image_size, width=width).to(device)


def train_teacher(name: str, data: Dataset, cfg: TrainConfig, checkpoint: str | Path | None = None,
                  identity: dict | None = None, log=print, build=None):
    """Train teacher ``name`` (or reuse/resume ``checkpoint``, which must hold a model
    with this ``identity``). Returns ``(model, history, checkpoint)``. A file lock beside
    the checkpoint makes processes racing on one setting train it once. ``build`` (no
    argument) makes an own model in place of the built-in ``name``, after the seed is set."""
    seed_everything(cfg.seed)
    model = (build() if build else build_for(name, data, data.train.images.device)).to(data.train.images.device)
    if checkpoint is None:
        history = fit(Scratch(model), data, cfg, desc=name, log=log)
    elif _finished(checkpoint, identity):  # only read: no lock, nothing written beside it (shipped teachers)
        history = fit(Scratch(model), data, cfg, checkpoint=checkpoint, identity=identity, desc=name, log=log)
    else:
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{checkpoint}.lock"):  # a second process waits, then reuses what the first wrote
            history = fit(Scratch(model), data, cfg, checkpoint=checkpoint, identity=identity, desc=name, log=log)
    return freeze(model), history, checkpoint


def _finished(checkpoint, identity) -> bool:
    """Whether ``checkpoint`` is a finished one made with ``identity`` (a mismatch is left
    to ``fit``, which names the keys that differ)."""
    if not Path(checkpoint).exists():
        return False
    try:
        return bool(load_checkpoint(checkpoint, identity, map_location="cpu")["finished"])
    except CheckpointError:
        return False


def load_teacher(path: str | Path, data: Dataset, identity: dict | None = None) -> torch.nn.Module:
    """A frozen teacher from a checkpoint: refused if its ``identity`` differs from the
    given one, or (without one) if it is no teacher or was made for another dataset."""
    state = load_checkpoint(path, identity, map_location=data.train.images.device)
    found = state["identity"]
    expected = {"kind": "teacher", "dataset": data.name}
    diff = identity_diff({k: found.get(k) for k in expected}, expected)
    if diff:
        raise CheckpointMismatch(f"checkpoint {path} is not a teacher for this data ({diff})")
    model = build_for(found["model"], data, data.train.images.device)
    model.load_state_dict(state["model"])
    return freeze(model)


@torch.inference_mode()
def view_logits(model: torch.nn.Module, split: Split, data: Dataset, cfg: TrainConfig) -> torch.Tensor:
    """A frozen model's logits on every augmented view (``cfg.augment``) of every image
    of ``split``: [V, N, C] float32, row ``[v, i]`` for view ``v`` of image ``i``
    (``kdlib.data.apply_views``). Costs V evaluation passes over the split."""
    flip = cfg.augment == "crop_flip"
    device = split.images.device
    out = None
    with autocast(device, cfg.precision):
        for v in range(view_count(flip=flip)):
            for idx in batch_order(len(split), cfg.eval_batch_size, 0, 0, shuffle=False):
                idx = idx.to(device)
                images = apply_views(split.images[idx], torch.full((len(idx),), v, device=device))
                logits = model(normalize(images, data.mean, data.std, cfg.channels_last)).float()
                if out is None:
                    out = torch.empty((view_count(flip=flip), len(split), logits.shape[-1]), device=device)
                out[v, idx] = logits
    return out


def _views_of(model, split, data, cfg, file, log) -> torch.Tensor:
    """``view_logits``, read from ``file`` (path, identity) when it holds them for that
    identity, else computed and written there for every later run and seed."""
    if file is None:
        return view_logits(model, split, data, cfg)
    path, identity = Path(file[0]), file[1]
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                return load_checkpoint(path, identity, map_location=split.images.device)["model"]["logits"]
            except CheckpointError as err:
                log(f"teacher view cache: {err}; rebuilding it")
        logits = view_logits(model, split, data, cfg)
        atomic_save({"identity": identity, "model": {"logits": logits.cpu()}}, path)
        return logits


def teacher_bank(models: list, names: list[str], data: Dataset, cfg: TrainConfig, hint_layer: int = -2,
                 cache: bool = True, log=print, view_files: list | None = None) -> LiveTeachers:
    """Teachers for distillation. With ``cache``: without augmentation, their outputs on
    the train and test splits computed once (``CachedTeachers``); with augmentation,
    their logits on every view of every training image (``ViewCachedTeachers``), read
    from or written to ``view_files`` (one ``(path, identity)`` per teacher) so later
    runs and seeds reuse them. Without ``cache``: live teachers."""
    if cfg.channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    if not cache:
        return LiveTeachers(models, names, hint_layer)
    t0 = time.perf_counter()
    device = data.train.images.device
    if cfg.augment != "none":
        files = view_files or [None] * len(models)
        logits = torch.stack([_views_of(m, data.train, data, cfg, f, log).flatten(0, 1)
                              for m, f in zip(models, files)])
        bank = ViewCachedTeachers(models, names, hint_layer, logits=logits)
        bank.build_seconds = time.perf_counter() - t0
        log(f"teacher view cache: {len(names)} teachers x {logits.shape[1] // len(data.train)} views of "
            f"{len(data.train)} images ({cfg.augment}), {bank.nbytes() / 2**20:.1f} MiB, ready in "
            f"{bank.build_seconds:.1f} s; logits served from it, hint features (camkd) computed live")
        return bank
    bank = CachedTeachers(models, names, hint_layer)
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


def train_student(method: str, bank: LiveTeachers, data: Dataset, cfg: TrainConfig, *, temperature=4.0,
                  alpha=0.7, beta=100.0, hint_layer=-2, checkpoint=None, identity=None, test_probs=None, log=print,
                  replace_stale=False, camkd_form="kdbook", label_smoothing=0.1,
                  width=1.0, on_epoch=None, build=None):
    """Train the student with ``method`` (a name in ``kdlib.distillers.METHODS``) against ``bank``.

    Returns ``(distiller, history)``; seeded by ``cfg.seed`` (init, batch order, dropout).
    ``checkpoint`` needs the student's ``identity`` (``kdlib.book.params.student_identity``).
    ``width`` scales the student (``kdlib.models.student_sizes``); CAMKD's regressors
    size themselves from its feature map. ``on_epoch``: see ``kdlib.train.fit``. ``build`` (no
    argument) makes an own student in place of the seed's, after the seed is set.
    """
    seed_everything(cfg.seed)
    student = (build() if build else build_for("student", data, data.train.images.device, width)).to(
        data.train.images.device)
    sample = normalize(data.train.images[:1], data.mean, data.std)
    distiller = build_distiller(method, student, bank, sample, temperature, alpha, beta, hint_layer, camkd_form,
                                label_smoothing)
    distiller.to(data.train.images.device)
    history = fit(distiller, data, cfg, checkpoint=checkpoint, identity=identity, teacher_test_probs=test_probs,
                  desc=f"{method} seed {cfg.seed}", log=log, replace_stale=replace_stale, on_epoch=on_epoch)
    return distiller, history
