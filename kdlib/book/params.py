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
from ..train.data import CLASS_NAMES, DATASETS, SPLIT_SIZES  # noqa: F401 (SPLIT_SIZES: what the schema's subsets are of)
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
    "dataset": Key("FashionMNIST", str, "dataset name", tuple(DATASETS), identity=TS),
    "data_root": Key("data", str, "folder for torchvision's dataset files"),
    "train_subset": Key(0, int, "class-balanced training subset size (0 = all)", min=0, identity=TS),
    "test_subset": Key(0, int, "class-balanced test subset size (0 = all)", min=0, identity=TS),
    "val_subset": Key(0, int, "students: hold out this many training images and score on them "
                      "instead of the test set, for tuning (0 = off)", min=0, identity=S),
    "teachers": Key(["teacher_cnn1", "teacher_cnn2", "teacher_resnet"], list, "teacher architectures",
                    tuple(TEACHERS), identity=S),
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
        _fail(source, key, value, f"expected {spec.kind.__name__} ({spec.help})")
    if spec.per_teacher:
        for name, setting in value.items():
            _check_teacher_setting(source, key, name, setting)
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


def _check_combination(source: str, p: dict, students: bool = True) -> None:
    sizes = dict(zip(("train_subset", "test_subset"), SPLIT_SIZES[p["dataset"]]))
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
        classes = 10  # every dataset here has ten classes
        if p["labelled_subset"] < classes:
            _fail(source, "labelled_subset", p["labelled_subset"],
                  f"give at least one labelled image per class ({classes})")
    for key in (k for k, spec in SCHEMA.items() if spec.per_teacher):
        for name, setting in p[key].items():
            if name not in p["teachers"]:
                _fail(source, key, {name: setting}, f"name a teacher of this run ({', '.join(p['teachers'])})")
            if key == "teacher_class_swap" and not all(0 <= c < len(CLASS_NAMES[p["dataset"]])
                                                       for pair in setting for c in pair):
                _fail(source, key, {name: setting},
                      f"{p['dataset']}'s classes are 0 to {len(CLASS_NAMES[p['dataset']]) - 1}")
    try:
        student_sizes(p["student_width"])
    except ValueError as err:
        _fail(source, "student_width", p["student_width"], str(err).split(": ", 1)[1])
    for method in p["methods"] if students else ():
        need, why = METHODS[method].min_teachers, METHODS[method].teachers_why
        if len(p["teachers"]) < need:
            _fail(source, "teachers", p["teachers"], f"{method} needs at least {need} teachers"
                  f"{f' ({why})' if why else ''}; name more teachers or drop {method} from methods")
    for name in p["teachers"] + ["student"]:
        model = build_model(name)
        if p["hint_layer"] not in range(-model.num_features, -1):
            _fail(source, "hint_layer", p["hint_layer"],
                  f"{name} has conv feature maps at {list(range(-model.num_features, -1))}")


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


def load_params(path: str | Path) -> dict:
    """Read and validate a params YAML file."""
    return validate(read_mapping(path), str(path))


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
    ident = {"kind": "teacher", "model": name}
    ident.update({k: P[k] for k, spec in SCHEMA.items() if "teacher" in spec.identity and not spec.per_teacher})
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
    ident["teacher_sha256"] = [teacher_sha256[n] for n in P["teachers"]]
    return ident
