"""A tune file (``params/tune/NAME.yaml``), read and checked: its ``base`` params file (with a
``val_subset``: the test set is never read while tuning), ``settings``, ``methods``, ``trials``,
``space`` and the optional ``seeds``, ``test_seeds``, ``sampler_seed``, ``pruner``, ``rescore`` and
``reuse`` (``kdlib.fanout.tune`` says what each does). Every bad input is one ``ParamsError`` line
naming the file, the key and the fix, before anything runs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..book.params import SCHEMA, ParamsError, read_mapping, read_params, validate
from ..records.names import run_name
from ..records.paths import display_path, locate
from ..train.distillers import METHODS

TUNE_KEYS = ("base", "settings", "methods", "trials", "space", "seeds", "test_seeds", "sampler_seed", "pruner",
             "rescore", "reuse")
RESUMABLE = ("trials", "tune", "test_seeds")  # what may change on --resume: more trials, more test seeds
# keys that no search may move: what the run is, where it runs, and the split it is scored on
NOT_KNOBS = {"methods": "the tune file's methods list says which methods run",
             "seeds": "the tune file's seeds say which seeds run",
             "run_dir": "the tuning names its folders", "threads": "each task gets its worker's threads",
             "device": "it changes where a run goes, not what it learns",
             "data_root": "it is a folder", "teacher_dir": "it is a folder",
             "dataset": "a setting, not a knob", "teachers": "a setting, not a knob",
             "train_subset": "it sets the data", "test_subset": "it sets the data",
             "val_subset": "it sets the split that every trial is scored on",
             "fidelity_freq": "it changes what is measured, not what is learned",
             "cache_teachers": "it changes speed, not what is learned",
             "compile": "it changes speed, not what is learned"}
# no trial stopped before epoch 10 of 15: from there on every method's validation accuracy ranks the complete
# trials of the book's first searches as their last epoch does (Spearman >= 0.8, pooled over their five journals,
# tune_analysis.FIDELITY_STUDIES); at epoch 2, where those searches cut, label smoothing's ranking was near
# chance (docs/tuning.md)
PRUNER = {"startup_trials": 5, "warmup_epochs": 10}


@dataclass
class Knob:
    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.name, self.choices)
        if SCHEMA[self.name].kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return f"{self.low:g} to {self.high:g}" + (", log scale" if self.log else "")


@dataclass
class Setting:
    name: str        # as a sweep run is named: student_width=0.25 ('base' for none)
    overrides: dict
    P: dict          # base + overrides, validated


@dataclass
class TuneSpec:
    source: str
    base: str
    base_raw: dict
    settings: list[Setting]
    methods: list[str]
    trials: int
    space: dict[str, list[Knob]]
    seeds: list[int]
    sampler_seed: int = 0
    pruner: dict = field(default_factory=lambda: dict(PRUNER))
    rescore: int = 3
    test_seeds: list[int] = field(default_factory=list)
    reuse: dict | None = None  # {"from": tuning folder, "methods": [...]}

    def tuned(self, method: str) -> bool:
        return bool(self.space.get(method))

    def as_dict(self) -> dict:
        """What the tuning folder records in ``tune.yaml`` (and a resume must match)."""
        return {"tune": display_path(Path(self.source)), "base": display_path(Path(self.base)),
                "settings": [s.overrides for s in self.settings], "methods": self.methods, "trials": self.trials,
                "space": {m: {k.name: (k.choices if k.choices is not None else
                                       {"low": k.low, "high": k.high, "log": k.log}) for k in knobs}
                          for m, knobs in self.space.items()},
                "seeds": self.seeds, "test_seeds": self.test_seeds, "sampler_seed": self.sampler_seed,
                "pruner": self.pruner, "rescore": self.rescore,
                **({"reuse": self.reuse} if self.reuse else {})}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _knob(src: str, method: str, name: str, spec, base: dict) -> Knob:
    where = f"{src}: space: {method}: {name}"
    if name not in SCHEMA:
        raise ParamsError(f"{where}: not a params key; knobs are params keys, e.g. temperature, alpha, beta")
    if name in NOT_KNOBS:
        raise ParamsError(f"{where}: cannot be tuned ({NOT_KNOBS[name]}); remove it")
    readers = SCHEMA[name].read_by
    if readers is not None and method not in readers:
        raise ParamsError(f"{where}: {method} does not use {name} (only {', '.join(readers)} read it); remove it")
    if isinstance(spec, list):
        if not spec:
            raise ParamsError(f"{where}: an empty list of choices; give at least one value, e.g. [0, 10, 100]")
        knob = Knob(name, choices=spec)
        values = spec
    elif isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ParamsError(f"{where}: give {{low: L, high: H}} (and log: true for a log scale) or a list of "
                              f"choices, not {spec}")
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        if SCHEMA[name].kind not in (int, float):
            raise ParamsError(f"{where}: {name} is not a number; give a list of choices instead of a range")
        if not (_number(low) and _number(high)) or not isinstance(log, bool):
            raise ParamsError(f"{where}: low and high must be numbers and log true or false, not {spec}")
        if low > high:
            raise ParamsError(f"{where}: low {low} is above high {high}; swap them")
        if log and low <= 0:
            raise ParamsError(f"{where}: a log scale needs low > 0 (it is {low}); raise low or drop log")
        if SCHEMA[name].kind is int and not (float(low).is_integer() and float(high).is_integer()):
            raise ParamsError(f"{where}: {name} takes whole numbers; give low and high as integers")
        knob = Knob(name, low=low, high=high, log=log)
        values = [low, high]
    else:
        raise ParamsError(f"{where}: give {{low: L, high: H, log: true}} or a list of choices, not {spec!r}")
    for value in values:  # every end of the range, every choice, must be a valid params value
        try:
            validate({**base, name: value, "methods": [method]}, where)
        except ParamsError as err:
            raise ParamsError(f"{err} (a value of the search space)") from None
    return knob


def load_tune(tune_file: str | Path) -> TuneSpec:
    """Read and check a tune file; every bad input is one ``ParamsError`` line naming the
    file, the key and the fix, before anything runs."""
    src = str(tune_file)
    raw = read_mapping(tune_file, "tune file", "params/tune/")
    for key in raw:
        if key not in TUNE_KEYS:
            raise ParamsError(f"{src}: unknown key {key!r}; a tune file has {', '.join(TUNE_KEYS)}")
    for key in ("base", "methods", "trials"):
        if key not in raw:
            raise ParamsError(f"{src}: no {key!r} key; see params/tune/ for examples")
    base = str(locate(Path(raw["base"])))
    base_raw = read_params(base, "base params file")
    base_P = validate(dict(base_raw), base)
    if not base_P["val_subset"]:
        raise ParamsError(f"{src}: base {raw['base']} has no val_subset; tuning scores on images held out of the "
                          "training set, never the test set: set val_subset (e.g. 5000) in the base")
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods or len(set(map(str, methods))) != len(methods):
        raise ParamsError(f"{src}: methods: give a list of distinct method names, e.g. [scratch, vanilla, camkd]")
    for m in methods:
        if m not in METHODS:
            raise ParamsError(f"{src}: methods: {m!r} is not a method; choose from {', '.join(METHODS)}")
    trials = raw["trials"]
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ParamsError(f"{src}: trials: {trials!r} is not allowed; give the trials per method and setting, "
                          "a whole number >= 1")
    seeds = _seeds(src, "seeds", raw.get("seeds", [0, 1, 2]))
    test_seeds = _seeds(src, "test_seeds", raw.get("test_seeds", seeds))
    settings_raw = raw.get("settings") or [{}]
    if not isinstance(settings_raw, list) or not all(isinstance(s, dict) for s in settings_raw):
        raise ParamsError(f"{src}: settings: give a list of overrides, e.g. [{{student_width: 0.25}}]")
    settings, names = [], set()
    for own in settings_raw:
        for key in own:
            if key in ("methods", "seeds", "run_dir", "threads"):
                raise ParamsError(f"{src}: settings: {key!r} cannot be set in a setting (the tuning sets it)")
        name = run_name(own)
        if name in names:
            raise ParamsError(f"{src}: settings: {own} is listed twice")
        names.add(name)
        P = validate({**base_raw, **own, "methods": methods}, f"{src}, setting {name}")
        if not P["val_subset"]:
            raise ParamsError(f"{src}: settings: {name} sets val_subset to 0, which would tune on the test set; "
                              "remove it")
        settings.append(Setting(name, own, P))
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise ParamsError(f"{src}: space: give method -> {{knob: {{low, high, log}} or [choices]}}")
    space = {}
    for method, knobs in space_raw.items():
        if method not in methods:
            raise ParamsError(f"{src}: space: {method!r} is not in methods ({', '.join(methods)}); add it there "
                              "or remove its space")
        if not isinstance(knobs, dict) or not knobs:
            raise ParamsError(f"{src}: space: {method}: give knob: {{low, high, log}} or [choices], e.g. "
                              "temperature: {low: 1, high: 8, log: true}")
        space[method] = [_knob(src, method, k, v, {**base_raw, **settings[0].overrides}) for k, v in knobs.items()]
    pruner = {**PRUNER, **(raw.get("pruner") or {})}
    if set(pruner) != set(PRUNER) or not all(isinstance(v, int) and v >= 0 for v in pruner.values()):
        raise ParamsError(f"{src}: pruner: give {{startup_trials: N, warmup_epochs: N}} with whole numbers >= 0")
    rescore = raw.get("rescore", 3)
    if not isinstance(rescore, int) or isinstance(rescore, bool) or rescore < 1:
        raise ParamsError(f"{src}: rescore: give how many of a study's best trials may be re-scored over the "
                          "seeds, a whole number >= 1 (1: never re-score)")
    sampler_seed = raw.get("sampler_seed", 0)
    if not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool) or sampler_seed < 0:
        raise ParamsError(f"{src}: sampler_seed: give a non-negative integer")
    spec = TuneSpec(src, base, base_raw, settings, methods, trials, space, seeds, sampler_seed, pruner, rescore,
                    test_seeds)
    if raw.get("reuse") is not None:
        spec.reuse = _reuse(spec, raw["reuse"])
    return spec


def _seeds(src: str, key: str, seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                          and s >= 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ParamsError(f"{src}: {key}: {seeds!r} is not allowed; give distinct non-negative integers, e.g. [0, 1, 2]")
    return seeds


def _reuse(spec: TuneSpec, raw) -> dict:
    """``reuse: {from: FOLDER, methods: [...]}`` checked against the earlier tuning in FOLDER: the
    same base, settings and seeds, and for each reused method the same search space, so that its
    copied studies are what this tuning would have run (but for the pruner's settings)."""
    src = spec.source
    if not isinstance(raw, dict) or set(raw) != {"from", "methods"} or not isinstance(raw["methods"], list) \
            or not raw["methods"]:
        raise ParamsError(f"{src}: reuse: give {{from: outputs/EARLIER_TUNING, methods: [scratch, ...]}}")
    folder = locate(Path(str(raw["from"])))
    if not (folder / "tune.yaml").is_file() or not (folder / "study.journal").is_file():
        raise ParamsError(f"{src}: reuse: from: {raw['from']} holds no tuning (tune.yaml and study.journal); "
                          "name an earlier tuning's folder")
    earlier = yaml.safe_load((folder / "tune.yaml").read_text())
    mine = spec.as_dict()
    for key in ("settings", "seeds"):
        if earlier.get(key) != mine[key]:
            raise ParamsError(f"{src}: reuse: {raw['from']} has {key} {earlier.get(key)}, this tuning {mine[key]}; "
                              "reuse only a tuning of the same settings and seeds")
    if Path(str(earlier.get("base"))).name != Path(spec.base).name:
        raise ParamsError(f"{src}: reuse: {raw['from']} has base {earlier.get('base')}, this tuning {spec.base}; "
                          "reuse only a tuning of the same base")
    for m in raw["methods"]:
        if m not in spec.methods or m not in earlier.get("methods", []):
            raise ParamsError(f"{src}: reuse: methods: {m!r} is not a method of both tunings "
                              f"({', '.join(spec.methods)} here)")
        if (earlier.get("space") or {}).get(m) != mine["space"].get(m):
            raise ParamsError(f"{src}: reuse: {m} was searched over {(earlier.get('space') or {}).get(m)} in "
                              f"{raw['from']}, here over {mine['space'].get(m)}; search it again (drop it from reuse)")
    return {"from": display_path(folder), "methods": list(raw["methods"])}
