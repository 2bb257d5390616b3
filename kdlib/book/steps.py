"""The steps the three notebooks take, each a function of the validated params ``P``.

Notebook 01 calls ``train_teachers``, 02 ``distill_students``, 03 ``load_results``.
Each writes its machine-readable results into ``P["run_dir"]``; each can also run
alone, making (at the same size) whatever an earlier notebook would have made.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..records.paths import PACKAGE_ROOT, display_path, resolve, say
from ..train.checkpoint import export_finished, identity_key, sha256_file
from ..train.data import (DATASETS, IMAGE_FOLDER, Split, holdout_validation, image_geometry, list_image_folder,
                          load_dataset, teacher_label_seed, teacher_labels, with_labelled_subset)
from ..train.metrics import accuracy, confidently_wrong, weights_by_correctness
from ..train.models import build_model, count_parameters
from ..train.own import ModelSpecError, build_own, check_model, checkpoint_path
from ..train.teachers import freeze
from .params import (SCHEMA, ParamsError, code_dir, model_where, own_student, own_teacher, owns_models, student_identity,
                     teacher_degradation, teacher_identity, teacher_names, teacher_value, validate)
from ..train.assemble import teacher_bank, teacher_test_probs, train_student, train_teacher
from ..train.loop import TrainConfig, pick_device, predict_logits, predict_teacher_weights, set_threads


def notebook_params(namespace: dict, source: str) -> dict:
    """Validated params from a notebook's parameter variables (defaults for the rest)."""
    given = {k: namespace[k] for k in SCHEMA if k in namespace}
    P = {k: spec.default for k, spec in SCHEMA.items()} | validate(given, source, partial=True)
    P["run_dir"] = str(resolve(P["run_dir"] or "outputs/interactive"))
    os.makedirs(P["run_dir"], exist_ok=True)
    return P


def device_of(P) -> torch.device:
    set_threads(P["threads"] or None)
    return pick_device(P["device"])


def load_data(P, device=None):
    options = {} if P["dataset"] != IMAGE_FOLDER else {
        "image_size": P["image_size"], "mean": P["data_mean"] or None, "std": P["data_std"] or None,
        "memory_mb": P["data_memory_mb"]}
    data = load_dataset(P["dataset"], resolve(P["data_root"]), train_subset=P["train_subset"],
                        test_subset=P["test_subset"], **options)
    return data.to(device or device_of(P))


def geometry(P, data=None) -> tuple[int, int, int]:
    """``(in_channels, image_size, num_classes)`` of ``P``'s images, from ``data`` when loaded,
    else from the dataset's constants or the first image of an ImageFolder (nothing decoded)."""
    if data is not None:
        return data.in_channels, data.image_size, data.num_classes
    if P["dataset"] == IMAGE_FOLDER:
        listing = list_image_folder(resolve(P["data_root"]))
        channels, side = image_geometry(listing, P["image_size"])
        return channels, side, len(listing.classes)
    _, channels, side, _, _ = DATASETS[P["dataset"]]
    return channels, side, 10


def model_builder(P, name: str | None = None, data=None, source: str = "params", load: bool = True):
    """A function of no argument that builds teacher ``name`` (None: the student) for ``P``'s
    images, on the data's device: a built-in by its name, an own model from its mapping
    (``kdlib.train.own.build_own``; a given checkpoint loaded when ``load``)."""
    channels, side, classes = geometry(P, data)
    device = data.train.images.device if data is not None else torch.device("cpu")
    own = own_teacher(P, name) if name else own_student(P)
    if own:
        return lambda: build_own(own, channels, classes, side, code_dir(P), model_where(source, P, name),
                                 load=load).to(device)
    width = 1.0 if name else P["student_width"]
    return lambda: build_model(name or "student", channels, classes, side, width=width).to(device)


def check_models(P, source: str = "params", data=None, students: bool = True) -> None:
    """Build every teacher (and, with ``students``, the student) of ``P`` and run one batch
    through each (``kdlib.train.own.check_model``): a module that does not import or build,
    a checkpoint that does not fit, a wrong class count or a hint that cannot serve is one
    ``ParamsError`` line naming the source and the model, before anything trains."""
    if not owns_models(P) and P["dataset"] != IMAGE_FOLDER:
        return  # the built-in models on their own datasets: tested, nothing to check
    channels, side, classes = geometry(P, data)
    feature_term = "camkd" in P["methods"] and P["beta"] > 0
    for name in teacher_names(P) + ([None] if students else []):
        where = model_where(source, P, name)
        try:
            with torch.random.fork_rng(devices=[]):  # the seeded runs' random stream is left as it was
                model = model_builder(P, name, None, source)()
                check_model(model, channels, side, classes, where, need_hint=feature_term)
        except ModelSpecError as err:
            raise ParamsError(str(err)) from None
        except Exception as err:  # a built-in model on images it does not fit
            raise ParamsError(f"{where}: does not run on {channels}x{side}x{side} images ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def student_data(P, data):
    """The students' data: ``data``, or with ``val_subset`` images of the training set
    held out and used in place of the test set (tuning never sees the test set); with
    ``labelled_subset``, only that many of its training images labelled."""
    return with_labelled_subset(holdout_validation(data, P["val_subset"]), P["labelled_subset"])


def teacher_data(P, data, name: str):
    """The data teacher ``name`` trains on: ``data`` with its own training labels
    (``teacher_label_noise``, ``teacher_class_swap``; ``kdlib.data.teacher_labels``, the
    noise drawn with a seed of its name and ``teacher_seed``). The test set, the other
    teachers' labels and the students' are unchanged."""
    own = teacher_degradation(P, name)
    if not own:
        return data
    labels = teacher_labels(data.train.labels, data.num_classes, noise=own.get("label_noise", 0.0),
                            swap=own.get("class_swap", ()), seed=teacher_label_seed(name, P["teacher_seed"]))
    return replace(data, train=Split(data.train.images, labels))


def _config(P, epochs: int, seed: int, device, teacher: bool = False) -> TrainConfig:
    pick = (lambda key: teacher_value(P, key)) if teacher else P.__getitem__
    return TrainConfig(epochs=epochs, batch_size=P["batch_size"], lr=P["lr"], lr_schedule=pick("lr_schedule"),
                       weight_decay=P["weight_decay"], seed=seed, precision=P["precision"],
                       augment=pick("augment"), fidelity_freq=P["fidelity_freq"], device=str(device),
                       compile=P["compile"])


def teacher_config(P, device) -> TrainConfig:
    """The teachers' training settings."""
    return _config(P, P["teacher_epochs"], P["teacher_seed"], device, teacher=True)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # processes writing one file each use their own
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


REFERENCE_TEACHERS = PACKAGE_ROOT / "reference_teachers"


def teacher_checkpoint(P, name: str) -> Path:
    """Where teacher ``name`` trained with ``P``'s settings lives: ``<dataset>/<name>-<hash
    of its identity>.pt`` in ``teacher_dir``, so any run with the same settings reuses it;
    or, when only there, the same file among the shipped reference teachers."""
    own = own_teacher(P, name)
    if own and own.get("checkpoint"):  # given, used as is
        return checkpoint_path(own["checkpoint"], code_dir(P))
    relative = Path(P["dataset"]) / f"{name}-{identity_key(teacher_identity(P, name))}.pt"
    local = resolve(P["teacher_dir"]) / relative
    return REFERENCE_TEACHERS / relative if not local.exists() and (REFERENCE_TEACHERS / relative).exists() \
        else local


def view_cache_files(P, teacher_sha256: dict, data) -> list | None:
    """Where each teacher's logits on every augmented view of the students' training
    images are kept (``kdlib.assemble.view_logits``), with the identity they are made for:
    ``<teacher_dir>/<dataset>/views/<name>-<hash>.pt``; shared by every run and seed
    with the same teacher file, training split, augmentation and precision. None
    without augmentation."""
    if P["augment"] == "none":
        return None
    files = []
    for name, sha in teacher_sha256.items():
        identity = {"kind": "teacher_views", "teacher_sha256": sha, "dataset": P["dataset"],
                    "train_subset": P["train_subset"], "val_subset": P["val_subset"], "images": len(data.train),
                    "augment": P["augment"], "precision": P["precision"]}
        path = resolve(P["teacher_dir"]) / P["dataset"] / "views" / f"{name}-{identity_key(identity)}.pt"
        files.append((path, identity))
    return files


def ship_teachers(P, log=say) -> list[Path]:
    """Copy ``P``'s finished teachers from ``teacher_dir`` into ``reference_teachers/``
    (weights, identity, history; no optimizer state), to be committed and reused."""
    shipped = []
    for name in teacher_names(P):
        if (own_teacher(P, name) or {}).get("checkpoint"):
            continue  # given as a checkpoint: the user's file, not the book's to ship
        src = teacher_checkpoint(P, name)
        dst = REFERENCE_TEACHERS / src.relative_to(src.parent.parent)
        if src != dst:
            export_finished(src, dst)
            log(f"{name}: shipped {dst.stat().st_size / 1e6:.1f} MB")
        shipped.append(dst)
    return shipped


def teacher_train_errors(P, name: str, sha256: str, model, data, cfg) -> dict:
    """``{"train_wrong": %, "confidently_wrong": %}``: how often teacher ``name`` (its
    checkpoint's ``sha256``) is wrong on the training images against their true labels,
    and wrong with a probability above 0.9. One evaluation pass (about 80 s for the three
    reference teachers on 60,000 images, one thread), kept in
    ``<teacher_dir>/<dataset>/train_errors/`` for every later run of that checkpoint and split."""
    identity = {"teacher_sha256": sha256, "dataset": P["dataset"], "train_subset": P["train_subset"],
                "precision": P["precision"]}
    path = resolve(P["teacher_dir"]) / P["dataset"] / "train_errors" / f"{name}-{identity_key(identity)}.json"
    if path.exists() and json.loads(path.read_text()).get("identity") == identity:
        return json.loads(path.read_text())["errors"]
    probs = predict_logits(model, data.train, data, cfg).softmax(-1)
    errors = {"train_wrong": 100.0 - accuracy(probs, data.train.labels),
              "confidently_wrong": confidently_wrong(probs, data.train.labels)}
    _write_json(path, {"identity": identity, "errors": errors})
    return errors


def train_teachers(P, data=None, log=say) -> dict:
    """Train (or reuse) every teacher in ``P["teachers"]``, each on its own labels
    (``teacher_data``); write ``teachers.json``: per teacher its label changes, history,
    test accuracy and, against the true training labels, the % of training images it
    gets wrong and gets wrong with probability > 0.9 (``confidently_wrong``).

    Returns ``{name: model}``. A teacher is reused when a checkpoint with the same
    identity (``kdlib.book.params.teacher_identity``) exists in ``teacher_dir``.
    """
    device = device_of(P)
    data = data or load_data(P, device)
    cfg = teacher_config(P, device)
    check_models(P, data=data, students=False)
    models, records = {}, []
    for name in teacher_names(P):
        t0 = time.perf_counter()
        path = teacher_checkpoint(P, name)
        model, history = teacher_model(P, name, data, cfg, log)
        models[name] = model
        sha = sha256_file(path)
        given = not history
        test_acc = (accuracy(predict_logits(model, data.test, data, cfg).softmax(-1), data.test.labels) if given
                    else history[-1]["test_acc"])
        if given:
            log(f"{name}: given as {display_path(path)}, used as is: test accuracy {test_acc:.2f}%")
        records.append({"name": name, "params": count_parameters(model), **teacher_degradation(P, name),
                        **({"given": True} if given else {}),
                        "test_acc": test_acc, **teacher_train_errors(P, name, sha, model, data, cfg),
                        "history": history, "checkpoint": display_path(path), "sha256": sha,
                        "train_seconds": sum(h["epoch_seconds"] for h in history),
                        "seconds": time.perf_counter() - t0})
    _write_json(Path(P["run_dir"]) / "teachers.json",
                {"dataset": data.name, "device": str(device), "teachers": records})
    return models


def teacher_model(P, name: str, data, cfg, log=say):
    """``(frozen model, history)`` of teacher ``name``: an own teacher given a checkpoint is
    loaded and used as is (history ``[]``); any other is trained, or reused from its
    checkpoint (``teacher_checkpoint``), on its own labels (``teacher_data``)."""
    own = own_teacher(P, name)
    if own and own.get("checkpoint"):
        return freeze(model_builder(P, name, data)()), []
    build = model_builder(P, name, data) if own else None
    model, history, _ = train_teacher(name, teacher_data(P, data, name), cfg, teacher_checkpoint(P, name),
                                      teacher_identity(P, name), log=log, build=build)
    return model, history


def distill_students(P, data=None, teachers=None, log=say) -> dict:
    """Train the student with every method in ``P["methods"]`` for every seed.

    Writes ``metrics_<method>.json`` (per-epoch history of each seed) and
    ``predictions.npz`` (per-example test predictions of every model), and saves
    ``student_<method>_seed<k>.pt``. Returns ``{method: metrics}``.
    """
    device = device_of(P)
    data = data or load_data(P, device)
    check_models(P, data=data)
    if teachers is None:
        log("teachers: looking for checkpoints made with these settings (training any that are missing)")
        teachers = train_teachers(P, data, log=log)
    data = student_data(P, data)
    if data.labelled is not None:
        log(f"labelled_subset: the students' cross-entropy sees {int(data.labelled.sum())} labelled images; "
            f"distillation uses all {len(data.train)} training images; scratch and label_smoothing train on "
            f"the labelled ones only, as many steps per epoch as the others")
    if data.eval_split != "test":
        log(f"validation: {len(data.test)} training images held out; students train on {len(data.train)} "
            f"and every score below (test_acc, fidelity) is on the held-out images, not the test set")
    names = list(teachers)
    teacher_sha256 = {n: sha256_file(teacher_checkpoint(P, n)) for n in names}
    cfg0 = _config(P, P["student_epochs"], 0, device)
    bank = teacher_bank([teachers[n] for n in names], names, data, cfg0, P["hint_layer"],
                        cache=P["cache_teachers"], log=log, view_files=view_cache_files(P, teacher_sha256, data))
    test_probs = teacher_test_probs(bank, data, cfg0)
    run_dir = Path(P["run_dir"])
    predictions = {"labels": data.test.labels.cpu().numpy()}
    for i, n in enumerate(names):
        predictions[f"teacher/{n}"] = test_probs[i].argmax(-1).cpu().numpy()
    results = {}
    for method in P["methods"]:
        runs = []
        for seed in P["seeds"]:
            cfg = _config(P, P["student_epochs"], seed, device)
            t0 = time.perf_counter()
            distiller, history = train_student(
                method, bank, data, cfg, temperature=P["temperature"], alpha=P["alpha"], beta=P["beta"],
                hint_layer=P["hint_layer"], checkpoint=run_dir / f"student_{method}_seed{seed}.pt",
                identity=student_identity(P, method, seed, teacher_sha256), test_probs=test_probs, log=log,
                replace_stale=run_dir.name == "interactive", camkd_form=P["camkd_form"],
                label_smoothing=P["label_smoothing"], width=P["student_width"],
                build=model_builder(P, None, data) if own_student(P) else None)
            logits = predict_logits(distiller.student, data.test, data, cfg)
            predictions[f"{method}/seed{seed}"] = logits.argmax(-1).cpu().numpy()
            weighted = predict_teacher_weights(distiller, data, cfg)  # None: a method without teacher weights
            runs.append({"seed": seed, "test_acc": history[-1]["test_acc"],
                         **({"teacher_weights": weights_by_correctness(*weighted, data.train.labels)}
                            if weighted is not None else {}),
                         "fidelity": history[-1].get("fidelity"), "history": history,
                         "train_seconds": sum(h["epoch_seconds"] for h in history),
                         "seconds": time.perf_counter() - t0,
                         "extra_params": sum(p.numel() for p in distiller.extra_parameters())})
        results[method] = {"method": method, "dataset": data.name, "teachers": names,
                           "student_params": count_parameters(distiller.student),
                           "teacher_cache": bank.cached and not (bank.live_hints and method == "camkd"),
                           "eval_split": data.eval_split,
                           "train_size": len(data.train), "eval_size": len(data.test),
                           "hparams": {k: P[k] for k in ("temperature", "alpha", "beta", "hint_layer",
                                                         "student_epochs", "batch_size", "lr",
                                                         "lr_schedule", "teacher_lr_schedule", "val_subset",
                                                         "precision", "augment", "teacher_augment",
                                                         "labelled_subset", "camkd_form", "label_smoothing",
                                                         "student_width", "teacher_label_noise",
                                                         "teacher_class_swap")},
                           "runs": runs}
        _write_json(run_dir / f"metrics_{method}.json", results[method])
    np.savez_compressed(run_dir / "predictions.npz", **predictions)
    return results


def load_results(P, log=say) -> tuple[dict, dict]:
    """``(teachers_json, {method: metrics})`` from ``P["run_dir"]``, distilling first
    (at this notebook's size) when no metrics are there yet."""
    run_dir = Path(P["run_dir"])
    if not any(run_dir.glob("metrics_*.json")):
        log(f"no metrics in {display_path(run_dir)}: distilling now with this notebook's parameters")
        distill_students(P, log=log)
    metrics = {m: json.loads((run_dir / f"metrics_{m}.json").read_text())
               for m in P["methods"] if (run_dir / f"metrics_{m}.json").exists()}
    teachers = json.loads((run_dir / "teachers.json").read_text())
    held_out = {m for m, r in metrics.items() if r.get("eval_split", "test") != "test"}
    if held_out:
        log(f"note: {', '.join(sorted(held_out))} scored on a validation split held out of the training set "
            "(val_subset), not on the test set: 'test_acc' below means validation accuracy")
    return teachers, metrics


def interactive() -> bool:
    """False in batch runs (the runner and ``make`` set ``KDBOOK_PROGRESS=text``)."""
    return os.environ.get("KDBOOK_PROGRESS", "auto") == "auto"
