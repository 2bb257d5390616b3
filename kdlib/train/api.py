"""Distillation from Python: your teacher modules, your student, your tensors or ``Dataset``.

``distill`` runs what the book's notebooks run (``kdlib.train.assemble.teacher_bank`` and
``train_student``, the loop's ``fit`` with its fidelity metrics), on data given in memory::

    from kdlib import distill
    result = distill({"big": big, "mine": mine}, small, train=(x_train, y_train), test=(x_test, y_test),
                     method="camkd", hints={"big": "layer3", "mine": "layer3", "student": "features.2"})
    result.student, result.test_acc, result.fidelity, result.history

Images are uint8 ``[N, C, H, W]`` (scaled to [0, 1], then standardised by ``mean``/``std``,
by default the training images' per-channel ones) or floating point, taken as already
normalised (``mean``/``std`` default 0 and 1). A ``torch.utils.data.Dataset`` of ``(image
tensor, label)`` pairs is read once into such tensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .assemble import teacher_bank, teacher_test_probs, train_student
from .data import Dataset, Split, channel_stats
from .distillers import METHODS
from .loop import TrainConfig, pick_device
from .metrics import accuracy
from .models import StagedNet
from .own import HookedNet, ModelSpecError, check_model


@dataclass
class Distilled:
    """What ``distill`` returns: the trained ``student`` (your module's trained copy, unwrapped),
    its per-epoch ``history``, its last ``test_acc`` (%) and ``fidelity`` (KL to each teacher and
    to their centroid, agreement, diversity: ``kdlib.train.metrics.fidelity_metrics``), and the
    teachers' test accuracies."""

    student: nn.Module
    history: list[dict]
    test_acc: float
    fidelity: dict | None
    teacher_acc: dict[str, float] = field(default_factory=dict)


def _tensors(data, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data)
    if not pair and hasattr(data, "__getitem__") and hasattr(data, "__len__"):  # a map-style Dataset
        images, labels = [], []
        for i in range(len(data)):
            x, y = data[i]
            if not torch.is_tensor(x):
                raise TypeError(f"{what}: item {i} is a {type(x).__name__}, not a tensor; give the Dataset a "
                                "transform that returns tensors (torchvision.transforms.ToTensor())")
            images.append(x)
            labels.append(int(y))
        return torch.stack(images), torch.tensor(labels)
    if not pair:
        raise TypeError(f"{what}: give (images [N,C,H,W], labels [N]) tensors or a torch Dataset")
    images, labels = data
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{what}: images {list(images.shape)} and labels {list(labels.shape)}: expected "
                         "[N,C,H,W] and [N]")
    return images, labels.long()


def _wrapped(model: nn.Module, hint: str | None, shape, where: str) -> nn.Module:
    if isinstance(model, (StagedNet, HookedNet)):
        return model
    return HookedNet(model, hint, shape, where)


def distill(teachers, student: nn.Module, train, test, *, method: str = "camkd", hints: dict | None = None,
            epochs: int = 15, seed: int = 0, temperature: float = 4.0, alpha: float = 0.7, beta: float = 100.0,
            batch_size: int = 128, lr: float = 1e-3, lr_schedule: str = "cosine", weight_decay: float = 0.0,
            augment: str = "none", mean=None, std=None, classes: list[str] | None = None,
            camkd_form: str = "kdbook", label_smoothing: float = 0.1, device: str = "auto",
            cache_teachers: bool = True, log=print) -> Distilled:
    """Distill ``teachers`` (``{name: module}`` or a list; frozen, used as they are) into a copy
    of ``student`` with ``method`` (any of ``kdlib.train.distillers.METHODS``), on ``train`` and
    scored on ``test``, each ``(images, labels)`` or a ``Dataset``. ``hints`` maps a teacher's
    name, and ``"student"``, to the dotted path of the submodule whose output CAMKD's feature
    term matches (needed for camkd with ``beta`` > 0; the book's own models need none)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: choose from {', '.join(METHODS)}")
    named = dict(teachers) if isinstance(teachers, dict) else {f"teacher{i}": t for i, t in enumerate(teachers)}
    hints = dict(hints or {})
    unknown = set(hints) - set(named) - {"student"}
    if unknown:
        raise ValueError(f"hints: {', '.join(sorted(unknown))} is no teacher ({', '.join(named)}) nor 'student'")
    dev = pick_device(device)
    (x_train, y_train), (x_test, y_test) = _tensors(train, "train"), _tensors(test, "test")
    shape = tuple(x_train.shape[1:])
    if tuple(x_test.shape[1:]) != shape:
        raise ValueError(f"test images are {list(x_test.shape[1:])}, training images {list(shape)}")
    if shape[1] != shape[2]:
        raise ValueError(f"images are {shape[1]}x{shape[2]}; give square images")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    classes = list(classes) if classes else [str(c) for c in range(num_classes)]
    own = (channel_stats(x_train) if x_train.dtype == torch.uint8  # as an ImageFolder's, no float copy
           else (torch.zeros(shape[0]), torch.ones(shape[0])))       # floats: taken as normalised
    mean = own[0] if mean is None else mean
    std = own[1] if std is None else std
    data = Dataset("tensors", Split(x_train, y_train), Split(x_test, y_test), torch.as_tensor(mean).float(),
                   torch.as_tensor(std).float(), classes).to(dev)

    models = {n: _wrapped(m, hints.get(n), shape, f"teachers[{n!r}]").to(dev) for n, m in named.items()}
    mine = _wrapped(copy.deepcopy(student), hints.get("student"), shape, "student").to(dev)
    feature_term = method == "camkd" and beta > 0
    try:
        for where, model in [*models.items(), ("student", mine)]:
            check_model(model, shape[0], shape[1], len(classes), model.where if isinstance(model, HookedNet)
                        else where, need_hint=feature_term)
    except ModelSpecError as err:
        raise ValueError(str(err)) from None

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_schedule=lr_schedule,
                      weight_decay=weight_decay, seed=seed, augment=augment, device=str(dev))
    bank = teacher_bank(list(models.values()), list(models), data, cfg, cache=cache_teachers, log=log)
    probs = teacher_test_probs(bank, data, cfg)
    teacher_acc = {n: accuracy(p, data.test.labels) for n, p in zip(models, probs)}
    distiller, history = train_student(method, bank, data, cfg, temperature=temperature,
                                       alpha=alpha, beta=beta, test_probs=probs, log=log, camkd_form=camkd_form,
                                       label_smoothing=label_smoothing, build=lambda: mine)
    trained = distiller.student
    trained = trained.net if isinstance(trained, HookedNet) and not isinstance(student, HookedNet) else trained
    return Distilled(trained, history, history[-1]["test_acc"], history[-1].get("fidelity"), teacher_acc)


__all__ = ["Distilled", "distill"]
