"""The book's parameters: one schema, checked before anything runs.

Every params file, ``-p key=value`` override and notebook parameters cell goes
through ``validate``; a bad value gives one line naming the source, the key, the
value and what is allowed.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..records.names import format_value  # noqa: F401 (a run's folder name: params' values as words)
from ..records.paths import display_path, resolve
from ..train.data import (CLASS_NAMES, DATASETS, IMAGE_FOLDER, SPLIT_SIZES, ImageFolderError, check_image_folder,
                          list_image_folder)
from ..train.distillers import METHODS
from ..train.models import TEACHERS, student_sizes
from ..train.models import build_model


class ParamsError(ValueError):
    """A params file or override that cannot run."""


@dataclass(frozen=True)
class Key:
    default: Any
    kind: type | tuple
    help: str
    choices: tuple = ()
    min: float | None = None
    exclusive_min: bool = False
    max: float | None = None  # always exclusive
    identity: tuple = ()  # which trained models the key determines: "teacher", "student", both or none
    per_teacher: bool = False  # a mapping teacher name -> setting: in a teacher's identity only its own entry
    omit_default: bool = False  # in identities only when not the default: models made before the key keep theirs
    read_by: tuple | None = None  # the only methods whose training reads the key (None: every method)


T, S, TS = ("teacher",), ("student",), ("teacher", "student")
KD = tuple(m for m, cls in METHODS.items() if cls.learns_from_teachers)  # the methods that learn from teachers


SCHEMA: dict[str, Key] = {
    "dataset": Key("FashionMNIST", str, "dataset name, or ImageFolder: your own images in torchvision's "
                   "layout, data_root/train/<class>/* and data_root/test/<class>/*", (*DATASETS, IMAGE_FOLDER),
                   identity=TS),
    "data_root": Key("data", str, "folder for torchvision's dataset files, or of your ImageFolder images"),
    "image_size": Key(0, int, "ImageFolder: every image resized to image_size x image_size (0 = the first "
                      "training image's size)", min=0, identity=TS, omit_default=True),
    "data_mean": Key([], list, "ImageFolder: per-channel mean to normalise by, e.g. a pretrained teacher's "
                     "[0.485, 0.456, 0.406] ([] = the training split's)", identity=TS, omit_default=True),
    "data_std": Key([], list, "ImageFolder: per-channel std to normalise by ([] = the training split's)",
                    identity=TS, omit_default=True),
    "data_memory_mb": Key(4096, int, "ImageFolder: refuse images that would need more memory than this "
                          "(MiB, as uint8) before loading them", min=1),
    "code_dir": Key("", str, "folder your own models' modules are imported from and their checkpoints are "
                    "found in ('' = the project root; the runner gives the params file's folder)"),
    "train_subset": Key(0, int, "class-balanced training subset size (0 = all)", min=0, identity=TS),
    "test_subset": Key(0, int, "class-balanced test subset size (0 = all)", min=0, identity=TS),
    "val_subset": Key(0, int, "students: hold out this many training images and score on them "
                      "instead of the test set, for tuning (0 = off)", min=0, identity=S),
    "teachers": Key(["teacher_cnn1", "teacher_cnn2", "teacher_resnet"], list, "teachers: built-in names, or "
                    "your own as {name, model: 'module:callable', kwargs, checkpoint, hint}",
                    tuple(TEACHERS), identity=S),
    "student": Key("student", (str, dict), "the student: 'student' (the seed's, scaled by student_width), or "
                   "your own as {model: 'module:callable', kwargs, hint}", identity=S, omit_default=True),
    "teacher_epochs": Key(20, int, "epochs per teacher", min=1, identity=T),
    "teacher_seed": Key(0, int, "seed of the teacher set", min=0, identity=T),
    "teacher_dir": Key("checkpoints/teachers", str, "teacher checkpoints, reused across runs"),
    "teacher_label_noise": Key({}, dict, "per teacher, the fraction of its training labels replaced by uniformly "
                               "drawn wrong labels (a fixed class-balanced draw per teacher and teacher_seed), "
                               "e.g. {teacher_resnet: 0.4}; students' labels are never changed",
                               identity=T, per_teacher=True),
    "teacher_class_swap": Key({}, dict, "per teacher, class pairs whose training labels it learns exchanged, "
                              "e.g. {teacher_resnet: [[0, 6], [2, 4]]}; students' labels are never changed",
                              identity=T, per_teacher=True),
    "student_epochs": Key(15, int, "epochs per student", min=1, identity=S),
    "student_width": Key(1.0, float, "scale of the student's conv channels and hidden units, each rounded "
                         "(1 = the seed's 207K-parameter student)", min=0, exclusive_min=True, identity=S,
                         omit_default=True),
    "methods": Key(["camkd", "vanilla", "scratch"], list, "student training methods", tuple(METHODS)),
    "seeds": Key([0], list, "student seeds (each method runs once per seed)"),
    "batch_size": Key(128, int, "training batch size", min=1, identity=TS),
    "lr": Key(1e-3, float, "Adam learning rate", min=0, exclusive_min=True, identity=TS),
    "lr_schedule": Key("cosine", str, "learning-rate schedule", ("cosine", "constant"), identity=TS),
    "teacher_lr_schedule": Key("same", str, "teachers' schedule ('same' = lr_schedule)",
                               ("same", "cosine", "constant"), identity=T),
    "weight_decay": Key(0.0, float, "Adam weight decay", min=0, identity=TS),
    "temperature": Key(4.0, float, "distillation temperature T", min=0, exclusive_min=True, identity=S, read_by=KD),
    "alpha": Key(0.7, float, "weight of the KL (logit) term", min=0, identity=S, read_by=KD),
    "beta": Key(100.0, float, "weight of CAMKD's feature term", min=0, identity=S, read_by=("camkd",)),
    "hint_layer": Key(-2, int, "feature index for CAMKD's feature term (-2 = last conv stage)", identity=S,
                      read_by=("camkd",)),
    "fidelity_freq": Key(1, int, "compute fidelity metrics every N epochs", min=1),
    "precision": Key("fp32", str, "fp32, or bf16 autocast", ("fp32", "bf16"), identity=TS),
    "augment": Key("none", str, "batch augmentation of the training images: none, crop (random shifts of up "
                   "to 2 px) or crop_flip (and horizontal flips); teachers see the student's augmented view",
                   ("none", "crop", "crop_flip"), identity=TS),
    "teacher_augment": Key("same", str, "teachers' own training augmentation ('same' = augment)",
                           ("same", "none", "crop", "crop_flip"), identity=T),
    "labelled_subset": Key(0, int, "students: the cross-entropy sees only this many class-balanced labelled "
                           "training images while distillation uses every training image (a transfer set); "
                           "scratch and label_smoothing train on the labelled images only (0 = every image "
                           "labelled)", min=0,
                           identity=S),
    "label_smoothing": Key(0.1, float, "label_smoothing method: eps of its smoothed targets, (1 - eps) one-hot + "
                           "eps uniform", min=0, max=1, identity=S, omit_default=True, read_by=("label_smoothing",)),
    "camkd_form": Key("kdbook", str, "camkd's loss: kdbook (no extra 1/M, detached feature weights, ConvReg) "
                      "or official (Rorozhl/CA-MKD as published)", ("kdbook", "official"), identity=S,
                      read_by=("camkd",)),
    "cache_teachers": Key(True, bool, "run each frozen teacher once and cache its outputs", identity=S),
    "compile": Key(False, bool, "torch.compile the model being trained (off: no measured win on CPU)"),
    "device": Key("auto", str, "auto (CUDA, MPS, CPU) or a torch device name"),
    "threads": Key(0, int, "CPU threads (0 = all cores)", min=0),
    "run_dir": Key("", str, "folder for this run's results ('' = outputs/interactive)"),
}


def _type_ok(value, kind) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


OWN_TEACHER_KEYS = ("name", "model", "kwargs", "checkpoint", "hint")
OWN_STUDENT_KEYS = ("model", "kwargs", "hint")


def _check_own(source: str, key: str, entry: dict, allowed: tuple, required: tuple, example: str) -> None:
    """One own model's mapping: known keys, the required ones, each of its type."""
    for k in entry:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            _fail(source, key, entry, f"unknown key {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                  + f"; an own model takes {', '.join(allowed)}, e.g. {example}")
    for k in required:
        if k not in entry:
            _fail(source, key, entry, f"give its {k}, e.g. {example}")
    for k, kind in (("name", str), ("model", str), ("kwargs", dict), ("checkpoint", str), ("hint", str)):
        if k in entry and not isinstance(entry[k], kind):
            _fail(source, key, entry, f"its {k} must be a {kind.__name__}, e.g. {example}")
    model = entry.get("model", "")
    if model.count(":") != 1 or not all(model.split(":")):
        _fail(source, key, entry, f"its model {model!r} must be 'module:callable', e.g. {example}")


TEACHER_EXAMPLE = "{name: big, model: 'mynets:Big', kwargs: {width: 64}, checkpoint: big.pt, hint: layer3}"
STUDENT_EXAMPLE = "{model: 'mynets:Small', kwargs: {}, hint: features.2}"


def teacher_names(P: dict) -> list[str]:
    """The teachers' names: a built-in teacher's is its architecture's, an own one's its ``name``."""
    return [t if isinstance(t, str) else t["name"] for t in P["teachers"]]


def own_teacher(P: dict, name: str) -> dict | None:
    """Own teacher ``name``'s mapping, or None for a built-in teacher."""
    return next((t for t in P["teachers"] if isinstance(t, dict) and t["name"] == name), None)


def own_student(P: dict) -> dict | None:
    """The own student's mapping, or None for the seed's student."""
    return P.get("student") if isinstance(P.get("student"), dict) else None


def owns_models(P: dict) -> bool:
    return own_student(P) is not None or any(isinstance(t, dict) for t in P.get("teachers", ()))


def model_where(source: str, P: dict, name: str | None = None) -> str:
    """How a one-line error names a model: the source, the key and the entry."""
    if name is None:
        return f"{source}: student"
    return f"{source}: teachers[{teacher_names(P).index(name)}] ({name})"


def code_dir(P: dict) -> Path:
    """The folder own models' modules and checkpoints are found in."""
    return resolve(P.get("code_dir") or ".")


def _fail(source: str, key: str, value, allowed: str):
    raise ParamsError(f"{source}: {key}: {value!r} is not allowed; {allowed}")


def _check_teacher_setting(source: str, key: str, name, setting) -> None:
    """One entry of ``teacher_label_noise`` or ``teacher_class_swap`` (class range and
    teacher names are checked with the other keys, in ``_check_combination``)."""
    if not isinstance(name, str):
        _fail(source, key, name, "give teacher names as keys, e.g. {teacher_resnet: ...}")
    if key == "teacher_label_noise":
        if not _type_ok(setting, float) or not 0 <= setting < 1:
            _fail(source, key, {name: setting}, "give a fraction in [0, 1), e.g. {teacher_resnet: 0.4}")
        return
    pairs_ok = isinstance(setting, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(_type_ok(c, int) for c in pair) and pair[0] != pair[1]
        for pair in setting)
    if not pairs_ok:
        _fail(source, key, {name: setting}, "give a list of pairs of two different class indices, "
              "e.g. {teacher_resnet: [[0, 6], [2, 4]]}")
    classes = [c for pair in setting for c in pair]
    if len(set(classes)) != len(classes):
        _fail(source, key, {name: setting}, "name each class in one pair at most")


def _check_key(source: str, key: str, value) -> None:
    spec = SCHEMA[key]
    if not _type_ok(value, spec.kind):
        kind = " or ".join(k.__name__ for k in spec.kind) if isinstance(spec.kind, tuple) else spec.kind.__name__
        _fail(source, key, value, f"expected {kind} ({spec.help})")
    if spec.per_teacher:
        for name, setting in value.items():
            _check_teacher_setting(source, key, name, setting)
        return
    if key == "student":
        if isinstance(value, str) and value != "student":
            _fail(source, key, value, f"give 'student' (the seed's) or your own as {STUDENT_EXAMPLE}")
        if isinstance(value, dict):
            _check_own(source, key, value, OWN_STUDENT_KEYS, ("model",), STUDENT_EXAMPLE)
        return
    if key in ("data_mean", "data_std"):
        if not all(_type_ok(v, float) and math.isfinite(v) for v in value) or \
                (key == "data_std" and not all(v > 0 for v in value)):
            _fail(source, key, value, "give one number per image channel, e.g. [0.485, 0.456, 0.406]"
                  + (" (each > 0)" if key == "data_std" else "") + ", or [] for the training split's")
        return
    if key == "teachers":
        if not value:
            _fail(source, key, value, f"give a non-empty list ({spec.help})")
        for item in value:
            if isinstance(item, dict):
                _check_own(source, key, item, OWN_TEACHER_KEYS, ("name", "model"), TEACHER_EXAMPLE)
            elif item not in spec.choices:
                _fail(source, key, item, f"choose from {', '.join(spec.choices)}, or give your own as "
                      f"{TEACHER_EXAMPLE}")
        names = [t if isinstance(t, str) else t["name"] for t in value]
        if len(set(names)) != len(names):
            _fail(source, key, names, "list each name once (an own teacher by its own name)")
        return
    if spec.kind is list:
        if not value:
            _fail(source, key, value, f"give a non-empty list ({spec.help})")
        if key == "seeds":
            if not all(_type_ok(v, int) and v >= 0 for v in value) or len(set(value)) != len(value):
                _fail(source, key, value, "give distinct non-negative integers, e.g. [0, 1, 2]")
            return
        for item in value:
            if item not in spec.choices:
                _fail(source, key, item, f"choose from {', '.join(spec.choices)}")
        if len(set(value)) != len(value):
            _fail(source, key, value, "list each name once")
        return
    if spec.kind is float and not math.isfinite(value):
        _fail(source, key, value, f"give a finite number ({spec.help})")
    if spec.choices and value not in spec.choices:
        _fail(source, key, value, f"choose from {', '.join(spec.choices)}")
    if spec.min is not None and (value < spec.min or (spec.exclusive_min and value == spec.min)):
        _fail(source, key, value, f"must be {'>' if spec.exclusive_min else '>='} {spec.min} ({spec.help})")
    if spec.max is not None and value >= spec.max:
        _fail(source, key, value, f"must be < {spec.max} ({spec.help})")


def _image_folder(source: str, p: dict):
    """The listing of ``p``'s ImageFolder, or one line naming ``data_root``."""
    try:
        return list_image_folder(resolve(p["data_root"]))
    except ImageFolderError as err:
        raise ParamsError(f"{source}: {err}") from None


def _check_combination(source: str, p: dict, students: bool = True) -> None:
    folder = p["dataset"] == IMAGE_FOLDER
    if not folder:
        for key in ("image_size", "data_mean", "data_std"):
            if p[key] != SCHEMA[key].default:
                _fail(source, key, p[key], f"it applies to dataset: {IMAGE_FOLDER} (your own images); "
                      f"{p['dataset']} has its own size and normalisation")
    listing = _image_folder(source, p) if folder else None
    if folder:  # the images' channels, size and memory, from the first image's header; nothing decoded
        try:
            check_image_folder(listing, image_size=p["image_size"], train_subset=p["train_subset"],
                               test_subset=p["test_subset"], mean=p["data_mean"] or None, std=p["data_std"] or None,
                               memory_mb=p["data_memory_mb"])
        except ImageFolderError as err:
            raise ParamsError(f"{source}: {err}") from None
    classes = listing.classes if folder else CLASS_NAMES[p["dataset"]]
    split_sizes = (len(listing.train), len(listing.test)) if folder else SPLIT_SIZES[p["dataset"]]
    sizes = dict(zip(("train_subset", "test_subset"), split_sizes))
    for key, size in sizes.items():
        if p[key] > size:
            _fail(source, key, p[key], f"{p['dataset']}'s {key[:-7]} split has {size} images; give at most "
                  f"{size} (0 = the whole split)")
    if p["val_subset"] >= sizes["train_subset"]:
        _fail(source, "val_subset", p["val_subset"],
              f"it must be smaller than {p['dataset']}'s training split ({sizes['train_subset']} images)")
    if p["val_subset"] and p["train_subset"] and p["val_subset"] >= p["train_subset"]:
        _fail(source, "val_subset", p["val_subset"],
              f"it must be smaller than train_subset ({p['train_subset']}), the images it is held out of")
    if p["labelled_subset"]:
        train = (p["train_subset"] or sizes["train_subset"]) - p["val_subset"]
        if p["labelled_subset"] >= train:
            _fail(source, "labelled_subset", p["labelled_subset"],
                  f"it must be smaller than the students' {train} training images (0 = every image labelled)")
        if p["labelled_subset"] < len(classes):
            _fail(source, "labelled_subset", p["labelled_subset"],
                  f"give at least one labelled image per class ({len(classes)})")
    names = teacher_names(p)
    for key in (k for k, spec in SCHEMA.items() if spec.per_teacher):
        for name, setting in p[key].items():
            if name not in names:
                _fail(source, key, {name: setting}, f"name a teacher of this run ({', '.join(names)})")
            if (own_teacher(p, name) or {}).get("checkpoint"):
                _fail(source, key, {name: setting}, f"{name} is given as a checkpoint and used as is, never "
                      "trained here: its training labels cannot change")
            if key == "teacher_class_swap" and not all(0 <= c < len(classes) for pair in setting for c in pair):
                _fail(source, key, {name: setting}, f"{p['dataset']}'s classes are 0 to {len(classes) - 1}")
    if own_student(p) and p["student_width"] != SCHEMA["student_width"].default:
        _fail(source, "student_width", p["student_width"], "it scales the seed's student; your own student is "
              "sized by its kwargs")
    try:
        student_sizes(p["student_width"])
    except ValueError as err:
        _fail(source, "student_width", p["student_width"], str(err).split(": ", 1)[1])
    for method in p["methods"] if students else ():
        need, why = METHODS[method].min_teachers, METHODS[method].teachers_why
        if len(p["teachers"]) < need:
            _fail(source, "teachers", p["teachers"], f"{method} needs at least {need} teachers"
                  f"{f' ({why})' if why else ''}; name more teachers or drop {method} from methods")
    built_in = [t for t in p["teachers"] if isinstance(t, str)] + ([] if own_student(p) else ["student"])
    for name in built_in:
        model = build_model(name)
        if p["hint_layer"] not in range(-model.num_features, -1):
            _fail(source, "hint_layer", p["hint_layer"],
                  f"{name} has conv feature maps at {list(range(-model.num_features, -1))}")
    if students and "camkd" in p["methods"] and p["beta"] > 0:
        own = [("teachers", "teacher", t) for t in p["teachers"] if isinstance(t, dict)]
        own += [("student", "student", own_student(p))] if own_student(p) else []
        for key, what, entry in own:
            if not entry.get("hint"):
                _fail(source, key, entry, f"camkd with beta {p['beta']:g} matches hint features: give this "
                      f"{what} a hint (the dotted path of a submodule, e.g. layer3), or set beta: 0")


def validate(params: dict, source: str = "params", partial: bool = False) -> dict:
    """Check ``params`` against ``SCHEMA``; return them with defaults filled in.

    ``partial`` returns only the keys given (a notebook's own parameters), and holds a
    notebook that declares no ``methods`` (01 trains no students) to no student rule.
    """
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of key: value, got {type(params).__name__}")
    for key, value in params.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(str(key), SCHEMA, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(SCHEMA)}"
            raise ParamsError(f"{source}: unknown key {key!r}; {hint}")
        if isinstance(value, int) and SCHEMA[key].kind is float and not isinstance(value, bool):
            params[key] = float(value)
        _check_key(source, key, params[key])
        if key == "teacher_label_noise":
            params[key] = {name: float(v) for name, v in value.items()}
        if key in ("data_mean", "data_std"):
            params[key] = [float(v) for v in value]
    full = {k: params.get(k, spec.default) for k, spec in SCHEMA.items()}
    _check_combination(source, full, students="methods" in params or not partial)
    return dict(params) if partial else full


def read_mapping(path: str | Path, what: str = "params file", examples: str = "params/") -> dict:
    """The ``key: value`` mapping of a YAML file, or one ParamsError line naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such {what}; see {examples} for examples") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return raw


def read_params(path: str | Path, what: str = "params file") -> dict:
    """A params file's mapping; when it names own models and no ``code_dir``, their folder is
    the file's own (relative to the project root, as every path in the records)."""
    raw = read_mapping(path, what)
    if owns_models(raw) and not raw.get("code_dir"):
        raw["code_dir"] = display_path(Path(path).resolve().parent)
    return raw


def load_params(path: str | Path) -> dict:
    """Read and validate a params YAML file."""
    return validate(read_params(path), str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``-p seeds=[0,1]``, ``-p lr=3e-4``)."""
    if "=" not in text:
        raise ParamsError(f"-p {text}: expected key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML reads 3e-4 as a string
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def teacher_identity(P: dict, name: str) -> dict:
    """What a trained teacher is: its architecture and every key marked ``teacher`` in
    ``SCHEMA`` (``lr_schedule`` as the teachers actually use it). Two teachers with the
    same identity are interchangeable; a checkpoint with another identity is refused."""
    own = own_teacher(P, name)
    ident = {"kind": "teacher", "model": own["model"] if own else name}
    if own:
        ident["kwargs"] = own.get("kwargs", {})
    ident.update({k: P[k] for k, spec in SCHEMA.items() if "teacher" in spec.identity and not spec.per_teacher
                  and not (spec.omit_default and P[k] == spec.default)})
    ident.update(data_identity(P))
    for own, shared in TEACHER_OWN.items():  # stored under the shared key, as the teachers use it
        value = ident.pop(own)
        if value != "same":
            ident[shared] = value
    ident.update(teacher_degradation(P, name))
    return ident


def teacher_degradation(P: dict, name: str) -> dict:
    """Teacher ``name``'s own label changes: ``{"label_noise": f, "class_swap": pairs}``
    for those it has (a zero fraction or no pair is none), ``{}`` for a clean teacher,
    whose identity is then what it was before these keys existed."""
    out = {}
    noise = P.get("teacher_label_noise", {}).get(name, 0.0)
    swap = P.get("teacher_class_swap", {}).get(name, [])
    if noise:
        out["label_noise"] = float(noise)
    if swap:
        out["class_swap"] = sorted(sorted(pair) for pair in swap)
    return out


TEACHER_OWN = {"teacher_lr_schedule": "lr_schedule", "teacher_augment": "augment"}


def teacher_value(P: dict, key: str):
    """``P[key]`` as the teachers use it: their own ``teacher_<key>`` unless that is 'same'."""
    own = P.get(f"teacher_{key}", "same")
    return P[key] if own == "same" else own


def student_identity(P: dict, method: str, seed: int, teacher_sha256: dict[str, str]) -> dict:
    """What a trained student is: its method and seed, every key marked ``student`` in
    ``SCHEMA``, and the sha256 of each teacher checkpoint it learned from (a teacher
    retrained with other settings keeps its name, not its hash). Scratch students
    carry them too: their recorded fidelity is measured against those teachers."""
    ident = {"kind": "student", "model": "student", "method": method, "seed": seed}
    ident.update({k: P[k] for k, spec in SCHEMA.items() if "student" in spec.identity
                  and not (spec.omit_default and P[k] == spec.default)})
    ident.update(data_identity(P))
    ident["teacher_sha256"] = [teacher_sha256[n] for n in teacher_names(P)]
    return ident


def data_identity(P: dict) -> dict:
    """What the data is beyond its name: for an ImageFolder, a fingerprint of its files (their
    paths and sizes), so two folders of images never share a trained model."""
    if P["dataset"] != IMAGE_FOLDER:
        return {}
    return {"data": list_image_folder(resolve(P["data_root"])).fingerprint()}
