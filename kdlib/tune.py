"""Tuning: every method's hyperparameters searched on a validation split with the same
budget (Optuna on Dask), then the chosen values tested over seeds as an ordinary sweep.

A tune file (``params/tune/NAME.yaml``) names a ``base`` params file (with ``val_subset``:
the test set is never read while tuning), ``settings`` (overrides, like a sweep's runs),
``methods``, ``trials`` (per tuned method and setting, the same for all) and ``space``
(per method, knob -> ``{low, high, log}`` or a list of choices; any params key the method
reads). Optional: ``seeds`` (default [0, 1, 2]: the references and the re-scoring on the
validation split, and the test), ``test_seeds`` (default ``seeds``: the seeds of the test, which
may be raised on ``--resume``), ``sampler_seed`` (0), ``pruner`` (``{startup_trials: 5,
warmup_epochs: 10}``: no trial is stopped before 5 trials of its study have finished, nor
before it has run 10 epochs: the first epoch from which every method's ranking of the committed
studies' trials agrees with their last epoch's, ``tune_analysis.pruner_fidelity``), ``rescore``
(3) and ``reuse`` (``{from: TUNING_FOLDER, methods: [...]}``: those methods' studies are copied
from an earlier tuning with the same base, settings, seeds and search space instead of run
again, and so are their finished test runs).

Everything lives in one Optuna storage (a journal file in the tuning folder, or an RDB
URL every worker reaches): per setting and method a search study (``SETTING/METHOD``:
TPE with a fixed seed, a median pruner fed the validation accuracy after each epoch) and
a study of single-seed evaluations (``SETTING/METHOD/seeds``): a method with no space
(scratch) runs each seed there as its setting's reference, and the trials within noise of
a study's best are re-scored there on the other seeds. Each trial or evaluation is one
Dask task on the sweeps' cluster; the client asks Optuna for a trial when a worker is
free, the worker reports and tells. A killed tuning resumes (``--resume``): a trial left
running is marked failed and asked again; finished ones are kept and never counted twice.

Then the test: each method at its chosen values on the full training set, for every
seed, scored once on the test set: a sweep (``kdlib.sweep``) in ``NAME/test/`` with its
records and 04. Last, ``trials.csv``, ``best.yaml`` and the executed ``05_tune.ipynb``.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import book
from .distillers import METHODS
from .params import SCHEMA, ParamsError, read_mapping, validate
from .records import write_atomic
from .runner import RunError, now
from .sweep import RESOURCES, _error_line, _locate, _worker, ended_attempt, portable, run_name

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
TUNE_OUT = ("trials.csv", "best.yaml")
ANALYSIS = "05_tune.ipynb"
SEARCH, SEEDS = "search", "seeds"


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
        return {"tune": portable(Path(self.source)), "base": portable(Path(self.base)),
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
    base = str(_locate(Path(raw["base"])))
    base_raw = read_mapping(base, "base params file", "params/")
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
    folder = _locate(Path(str(raw["from"])))
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
    return {"from": portable(folder), "methods": list(raw["methods"])}


# ---- storage -------------------------------------------------------------------------------------

def storage_url(tune_dir: Path, given: str | None) -> str:
    """The Optuna storage: ``given`` (an RDB URL, or a journal file's path), or the journal file
    ``tune_dir/study.journal`` (one machine: every worker process opens the same file)."""
    return given or str(tune_dir / "study.journal")


def check_storage(url: str) -> None:
    """Refuse a storage that cannot be written, in one line, before anything runs."""
    if "://" in url:
        try:
            open_storage(url)
        except Exception as err:
            raise RunError(f"--storage {url}: cannot open it ({_error_line(err)}); give a reachable database URL "
                           "or leave --storage out for a journal file in the tuning folder") from None
        return
    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as err:
        raise RunError(f"storage {path}: cannot write it ({err.strerror}); choose --outputs or --storage "
                       "elsewhere") from None


def repair_journal(path: Path) -> bool:
    """Cut a journal file back to its last complete line (a process killed while appending
    leaves a partial one, which Optuna skips on reading but which would swallow the next
    line appended). Returns whether anything was cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
    return True


_STORAGES: dict = {}


def open_storage(url: str):
    """One storage object per process and URL: an RDB URL as Optuna takes it, or a
    ``JournalStorage`` on a file (file locks keep concurrent processes consistent)."""
    if url not in _STORAGES:
        import optuna
        if "://" in url:
            _STORAGES[url] = optuna.storages.RDBStorage(url)
        else:
            from optuna.storages.journal import JournalFileBackend
            _STORAGES[url] = optuna.storages.JournalStorage(JournalFileBackend(url))
    return _STORAGES[url]


def _pruner(cfg: dict):
    import optuna
    return optuna.pruners.MedianPruner(n_startup_trials=cfg["startup_trials"], n_warmup_steps=cfg["warmup_epochs"])


def _study(url: str, name: str, sampler=None, pruner: dict | None = None, create: bool = False):
    import optuna
    kwargs = {"study_name": name, "storage": open_storage(url), "sampler": sampler,
              "pruner": _pruner(pruner) if pruner is not None else optuna.pruners.NopPruner()}
    if create:
        return optuna.create_study(direction="maximize", load_if_exists=True, **kwargs)
    return optuna.load_study(**kwargs)


def study_name(setting: str, method: str, kind: str = SEARCH) -> str:
    return f"{setting}/{method}" + ("" if kind == SEARCH else f"/{SEEDS}")


# ---- one trial, on a worker ----------------------------------------------------------------------

_PREPARED: dict = {}


def _prepared(P: dict, device, teachers: bool = True):
    """``(student data, teacher bank)`` for ``P`` (the bank None where ``teachers`` is false: a
    method that never sees one), each kept for the next trial of this process that needs the
    same: one data load and one teacher pass serve every trial of a setting on this worker."""
    from .assemble import teacher_bank, train_teacher
    from .checkpoint import sha256_file
    from .params import teacher_identity
    from .sweep import teacher_key
    data_key = json.dumps([str(device)] + [P[k] for k in ("dataset", "data_root", "train_subset", "test_subset",
                                                          "val_subset", "labelled_subset")])
    if _PREPARED.get("data", (None,))[0] != data_key:
        _PREPARED.clear()  # one setting's data and teachers at a time in memory
        data = book.load_data(P, device)
        sdata = book.student_data(P, data)
        if sdata.eval_split != "validation":  # never score a trial on the test set
            raise RunError(f"val_subset is {P['val_subset']}: a trial must be scored on a validation split")
        _PREPARED["data"] = (data_key, data, sdata)
    _, data, sdata = _PREPARED["data"]
    if not teachers:
        return sdata, None
    bank_key = json.dumps([teacher_key(P)] + [P[k] for k in ("hint_layer", "precision", "augment", "cache_teachers",
                                                             "batch_size")])
    if _PREPARED.get("bank", (None,))[0] != bank_key:
        quiet = lambda *a: None  # noqa: E731
        tcfg = book.teacher_config(P, device)
        models = [train_teacher(n, book.teacher_data(P, data, n), tcfg, book.teacher_checkpoint(P, n),
                                teacher_identity(P, n), log=quiet)[0] for n in P["teachers"]]
        sha = {n: sha256_file(book.teacher_checkpoint(P, n)) for n in P["teachers"]}
        cfg0 = book._config(P, P["student_epochs"], 0, device)
        bank = teacher_bank(models, list(P["teachers"]), sdata, cfg0, P["hint_layer"], cache=P["cache_teachers"],
                            log=quiet, view_files=book.view_cache_files(P, sha, sdata))
        _PREPARED["bank"] = (bank_key, bank)
    return sdata, _PREPARED["bank"][1]


def evaluate(P: dict, method: str, seed: int, on_epoch=None) -> list[dict]:
    """Train ``method``'s student with ``P`` and ``seed`` on the validation split's training part;
    return its history, whose ``test_acc`` is accuracy on the held-out validation images."""
    from .assemble import train_student
    device = book.device_of(P)
    data, bank = _prepared(P, device, METHODS[method].learns_from_teachers)
    cfg = book._config(P, P["student_epochs"], seed, device)
    _, history = train_student(method, bank, data, cfg, temperature=P["temperature"], alpha=P["alpha"],
                               beta=P["beta"], hint_layer=P["hint_layer"], log=lambda *a: None,
                               camkd_form=P["camkd_form"], label_smoothing=P["label_smoothing"],
                               width=P["student_width"], on_epoch=on_epoch)
    return history


def trial_task(url: str, name: str, number: int, P: dict, method: str, seed: int, pruner: dict | None) -> dict:
    """Run trial ``number`` of study ``name`` and tell Optuna how it ended: complete (its last
    validation accuracy), pruned (the median pruner stopped it, or its loss became
    non-finite), or failed (an error, recorded). With ``pruner`` None (an evaluation at fixed
    values) nothing is pruned. Returns ``{state, value, epochs, seconds, worker, error}``."""
    import optuna
    from optuna.trial import TrialState
    from .train import NonFiniteLossError
    address, threads = _worker()
    os.environ["KDBOOK_PROGRESS"] = "off"
    study = _study(url, name, pruner=pruner)
    trial = optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    t0 = time.perf_counter()
    epochs, last = [0], [None]

    def report(record):
        epochs[0], last[0] = record["epoch"], record["test_acc"]
        with warnings.catch_warnings():  # a trial run again (its worker died) reports its epochs again:
            warnings.filterwarnings("ignore", "The reported value is ignored", UserWarning)  # the first stays
            trial.report(record["test_acc"], record["epoch"])
        if pruner is not None and trial.should_prune():
            raise optuna.TrialPruned()

    state, value, error = TrialState.COMPLETE, None, None
    try:
        history = evaluate(dict(P, threads=threads), method, seed, report)
        value = history[-1]["test_acc"]
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except NonFiniteLossError as err:
        state, error = TrialState.PRUNED, _error_line(err)
    except Exception as err:  # recorded, and the trial asked again
        state, error = TrialState.FAIL, _error_line(err)
    seconds = round(time.perf_counter() - t0, 1)
    for key, v in {"epochs": epochs[0], "seconds": seconds, "worker": address, "error": error}.items():
        trial.set_user_attr(key, v)
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    return {"state": state.name.lower(), "value": value if state == TrialState.COMPLETE else last[0],
            "epochs": epochs[0], "seconds": seconds, "worker": address, "error": error}


# ---- the client: which trial runs next ---------------------------------------------------------

@dataclass
class Job:
    setting: Setting
    method: str
    kind: str                 # SEARCH: a new trial of the search study; SEEDS: one seed at fixed values
    seed: int
    knobs: dict = field(default_factory=dict)
    source: int | None = None  # SEEDS: the search trial it re-scores (None: a reference run)

    @property
    def study(self) -> str:
        return study_name(self.setting.name, self.method, self.kind)


def _done(t) -> bool:
    from optuna.trial import TrialState
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED)


class Tuning:
    """The client's side: the studies in the storage, the next job to run, and the choice."""

    MAX_SEED_FAILURES = 3

    def __init__(self, spec: TuneSpec, url: str, folder: Path | None = None):
        self.spec, self.url, self.dir = spec, url, folder
        self.studies = {}
        for s in spec.settings:
            for m in spec.methods:
                kinds = (SEARCH, SEEDS) if spec.tuned(m) else (SEEDS,)
                for kind in kinds:
                    study = _study(url, study_name(s.name, m, kind), create=True,
                                   pruner=spec.pruner if kind == SEARCH else None)
                    if kind == SEARCH:  # seeded anew from the trials it holds: a resumed search asks new points
                        study.sampler = _sampler_for(spec, s, m, len(study.get_trials(deepcopy=False)))
                    for key, value in {"setting": s.overrides, "method": m, "kind": kind}.items():
                        study.set_user_attr(key, value)
                    self.studies[study.study_name] = study

    def trials(self, setting: Setting, method: str, kind: str = SEARCH) -> list:
        return self.studies[study_name(setting.name, method, kind)].get_trials(deepcopy=False)

    def fail_running(self) -> int:
        """Mark every trial left running (by a killed tuning) failed, so it is asked again."""
        from optuna.trial import TrialState
        n = 0
        for study in self.studies.values():
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
        return n

    # -- what is left to do
    def _seed_done(self, setting, method, source, seed, flight) -> bool:
        if any(j.kind == SEEDS and j.setting is setting and j.method == method and j.source == source
               and j.seed == seed for j in flight):
            return True
        own = [t for t in self.trials(setting, method, SEEDS)
               if t.user_attrs.get("source") == source and t.user_attrs.get("seed") == seed]
        if any(_done(t) for t in own):
            return True
        failed = [t for t in own if not _done(t) and t.user_attrs.get("error")]
        if len(failed) >= self.MAX_SEED_FAILURES:
            raise RunError(f"{study_name(setting.name, method, SEEDS)}: seed {seed} failed {len(failed)} times "
                           f"({failed[-1].user_attrs['error']}); fix the cause, then --resume")
        return False

    def search_left(self, setting, method, flight) -> int:
        trials = self.trials(setting, method)
        failed = [t for t in trials if t.user_attrs.get("error") and not _done(t)]
        if len(failed) > max(self.MAX_SEED_FAILURES, self.spec.trials):
            raise RunError(f"{study_name(setting.name, method)}: {len(failed)} trials failed (the last: "
                           f"{failed[-1].user_attrs['error']}); fix the cause, then --resume")
        running = sum(j.kind == SEARCH and j.setting is setting and j.method == method for j in flight)
        return self.spec.trials - sum(map(_done, trials)) - running

    def references_done(self, setting) -> bool:
        return all(self._seed_done(setting, m, None, seed, [])
                   for m in self.spec.methods if not self.spec.tuned(m) for seed in self.spec.seeds)

    def next_job(self, flight: list[Job]) -> Job | None:
        """References first (their spread over seeds is the noise), then a search trial of the
        study with the fewest trials done, then the re-scoring of finished studies."""
        spec = self.spec
        for s in spec.settings:
            for m in spec.methods:
                if not spec.tuned(m):
                    for seed in spec.seeds:
                        if not self._seed_done(s, m, None, seed, flight):
                            return Job(s, m, SEEDS, seed)
        open_ = [(spec.trials - self.search_left(s, m, flight), i, s, m)
                 for i, (s, m) in enumerate((s, m) for s in spec.settings for m in spec.methods if spec.tuned(m))]
        open_ = [o for o in open_ if o[0] < spec.trials]
        if open_:
            _, _, s, m = min(open_, key=lambda o: o[:2])
            return Job(s, m, SEARCH, spec.seeds[0])
        for s in spec.settings:
            if not self.references_done(s):
                continue
            for m in spec.methods:
                if not spec.tuned(m) or any(j.kind == SEARCH and j.setting is s and j.method == m for j in flight):
                    continue
                candidates = self.candidates(s, m)
                for t in candidates if len(candidates) > 1 else []:
                    for seed in spec.seeds[1:]:
                        if not self._seed_done(s, m, t.number, seed, flight):
                            return Job(s, m, SEEDS, seed, dict(t.params), t.number)
        return None

    def start(self, job: Job) -> tuple[int, dict]:
        """Ask the job's study for a trial; return its number and the params it runs with."""
        study = self.studies[job.study]
        trial = study.ask()
        if job.kind == SEARCH:
            job.knobs = {k.name: k.suggest(trial) for k in self.spec.space[job.method]}
        for key, value in {"seed": job.seed, "source": job.source, "knobs": job.knobs}.items():
            trial.set_user_attr(key, value)
        P = validate({**self.spec.base_raw, **job.setting.overrides, **job.knobs, "methods": [job.method],
                      "seeds": [job.seed]}, f"{self.spec.source}, {job.study} trial {trial.number}")
        return trial.number, P

    def fail(self, job: Job, number: int, error: str) -> None:
        """A trial whose task died with its worker: failed, so it is asked again."""
        from optuna.trial import TrialState
        study = self.studies[job.study]
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        if study._storage.get_trial(trial_id).state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial_id, "error", error)
            study._storage.set_trial_state_values(trial_id, TrialState.FAIL)

    # -- the choice
    def noise(self, setting) -> float | None:
        """The spread of one run's validation accuracy over seeds in ``setting``: the pooled
        standard deviation of the reference methods' seeds (None without a reference)."""
        variances = []
        for m in self.spec.methods:
            if self.spec.tuned(m):
                continue
            values = [t.value for t in self.trials(setting, m, SEEDS) if t.value is not None
                      and t.user_attrs.get("source") is None]
            if len(values) > 1:
                mean = sum(values) / len(values)
                variances.append(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return math.sqrt(sum(variances) / len(variances)) if variances else None

    def candidates(self, setting, method) -> list:
        """The search trials that may be the best: the best complete one, and those whose
        validation accuracy lies within noise of it (1.96 sqrt(2) sd: the 95% range of the
        difference of two single-seed runs), at most ``rescore`` of them, best first."""
        from optuna.trial import TrialState
        done = sorted((t for t in self.trials(setting, method) if t.state == TrialState.COMPLETE),
                      key=lambda t: (-t.value, t.number))
        if not done:
            return []
        sd = self.noise(setting)
        if sd is None:
            return done[:self.spec.rescore]
        return [t for t in done if t.value >= done[0].value - 1.96 * math.sqrt(2) * sd][:self.spec.rescore]

    def seed_values(self, setting, method, source) -> dict[int, float]:
        return {t.user_attrs["seed"]: (t.value if t.value is not None else math.nan)
                for t in self.trials(setting, method, SEEDS) if _done(t) and t.user_attrs.get("source") == source}

    def choice(self, setting, method) -> dict:
        """The values a method is tested at, its validation accuracy, and how they were chosen."""
        from optuna.trial import TrialState
        spec = self.spec
        if not spec.tuned(method):
            values = self.seed_values(setting, method, None)
            return {"values": {}, "val_acc": _mean(values.values()), "val_seeds": len(values),
                    "chosen": f"no search: its {len(values)} seeds on the validation split are the reference"}
        trials = self.trials(setting, method)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise RunError(f"{study_name(setting.name, method)}: no trial completed; nothing to choose")
        counts = {"trials": sum(map(_done, trials)), "complete": len(complete),
                  "pruned": sum(t.state == TrialState.PRUNED for t in trials)}
        candidates = self.candidates(setting, method)
        sd = self.noise(setting)
        if len(candidates) == 1:
            best = candidates[0]
            rest = [t.value for t in complete if t is not best]
            gap = f"; the next is {best.value - max(rest):.2f} points below" if rest else ""
            why = (f"the best of {counts['trials']} trials{gap}, beyond noise (1.96 sqrt(2) x {sd:.2f}, "
                   "the reference's sd over seeds)" if sd is not None else f"the best of {counts['trials']} trials")
            return {"values": dict(best.params), "val_acc": best.value, "val_seeds": 1, "trial": best.number,
                    "chosen": why, **counts}
        scored = []
        for t in candidates:
            values = {spec.seeds[0]: t.value, **self.seed_values(setting, method, t.number)}
            scored.append((_mean(values.values()), -t.number, t, len(values)))
        mean, _, best, n = max(scored, key=lambda x: (x[0] if not math.isnan(x[0]) else -math.inf, x[1]))
        noise = f"within noise of the best (1.96 sqrt(2) x {sd:.2f}, the reference's sd over seeds)" \
            if sd is not None else f"the best {len(candidates)}"
        return {"values": dict(best.params), "val_acc": mean, "val_seeds": n, "trial": best.number,
                "val_acc_trial": best.value, "rescored": [t.number for t in candidates],
                "chosen": f"re-scored over seeds {', '.join(map(str, spec.seeds))}: trials "
                          f"{', '.join(str(t.number) for t in candidates)}, {noise}; the best mean", **counts}

    # -- records
    def frame(self):
        """``trials.csv``: one row per trial and evaluation, validation accuracy only."""
        import pandas as pd
        rows = []
        knobs = list(dict.fromkeys(k.name for ks in self.spec.space.values() for k in ks))
        for s in self.spec.settings:
            for m in self.spec.methods:
                for kind in (SEARCH, SEEDS) if self.spec.tuned(m) else (SEEDS,):
                    for t in self.trials(s, m, kind):
                        values = t.params if kind == SEARCH else t.user_attrs.get("knobs", {})
                        last = t.value if t.value is not None else (
                            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
                        rows.append({"setting": s.name, "method": m,
                                     "kind": kind if kind == SEARCH else
                                     ("reference" if t.user_attrs.get("source") is None else "rescore"),
                                     "trial": t.number, "source_trial": t.user_attrs.get("source"),
                                     "seed": t.user_attrs.get("seed"), "state": t.state.name.lower(),
                                     **{k: values.get(k) for k in knobs},
                                     "val_acc": last, "epochs": t.user_attrs.get("epochs"),
                                     "seconds": t.user_attrs.get("seconds"),
                                     "started": t.datetime_start.isoformat(timespec="seconds")
                                     if t.datetime_start else None,
                                     "ended": t.datetime_complete.isoformat(timespec="seconds")
                                     if t.datetime_complete else None,
                                     "error": t.user_attrs.get("error")})
        return pd.DataFrame(rows)


def _sampler_for(spec: TuneSpec, setting: Setting, method: str, held: int = 0):
    """TPE (constant liar: trials running in parallel are not asked twice), seeded per study from
    ``sampler_seed``, the setting, the method and the number of trials the study already ``held``
    when this client started, so every study is reproducible alone. Without ``held`` a resumed
    study's sampler would start its random stream again and ask its first start-up points a
    second time."""
    import optuna
    import zlib
    seed = (spec.sampler_seed * 1_000_003 + zlib.crc32(f"{setting.name}/{method}".encode()) + 7_919 * held) % 2**31
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


# ---- the whole tuning ----------------------------------------------------------------------------

def _words(setting: Setting) -> str:
    from .quality import short_name
    return short_name(setting.P)


def _line(job: Job, number: int, result: dict) -> str:
    what = f"trial {number}" if job.kind == SEARCH else \
        (f"seed {job.seed}" if job.source is None else f"trial {job.source} on seed {job.seed}")
    knobs = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in job.knobs.items())
    value = f"val {result['value']:.2f} %" if result.get("value") is not None else "no value"
    return (f"{_words(job.setting)} · {job.method} {what}{f' ({knobs})' if knobs else ''}: {result['state']}"
            f" after {result['epochs']} epochs, {value}, {result['seconds']:.0f} s"
            + (f" ({result['error']})" if result.get("error") else ""))


def _drive(client, tuning: Tuning, log, deadline: float | None = None) -> bool:
    """Keep every worker busy with the next job until none is left; past ``deadline``
    (``time.monotonic()``) start none and wait for the running ones. True when it stopped
    with jobs left."""
    from distributed import wait
    from .sweep import past
    workers = client.scheduler_info()["workers"].values()
    slots = max(1, sum(int(w.get("resources", {}).get("run", 0)) for w in workers))
    flight: dict = {}
    done = 0
    said = False
    while True:
        if past(deadline) and not said:
            said = True
            log(f"timeout: no new trial starts; waiting for the {len(flight)} running")
        while len(flight) < slots and not past(deadline):
            job = tuning.next_job([j for j, _ in flight.values()])
            if job is None:
                break
            number, P = tuning.start(job)
            future = client.submit(trial_task, tuning.url, job.study, number, P, job.method, job.seed,
                                   tuning.spec.pruner if job.kind == SEARCH else None, resources=RESOURCES,
                                   pure=False, key=f"trial-{job.study}-{number}-{time.time_ns()}".replace("/", "-"))
            flight[future] = (job, number)
        if not flight:
            return past(deadline) and tuning.next_job([]) is not None
        try:
            finished, _ = wait(list(flight), return_when="FIRST_COMPLETED", timeout=_until(deadline))
        except TimeoutError:  # the deadline passed while they run: say so, then wait on
            continue
        for future in finished:
            job, number = flight.pop(future)
            if future.status == "error":
                error = _error_line(future.exception())
                tuning.fail(job, number, error)
                result = {"state": "fail", "value": None, "epochs": 0, "seconds": 0.0, "error": error}
            else:
                result = future.result()
            done += 1
            log(f"[{done}] {_line(job, number, result)}")
        if tuning.dir is not None:
            write_atomic(tuning.dir / "trials.csv", tuning.frame().to_csv(index=False))


def _until(deadline: float | None) -> float | None:
    """Seconds to the deadline (at least a second), so that waiting wakes to say it passed."""
    return None if deadline is None or time.monotonic() >= deadline else max(1.0, deadline - time.monotonic())


def test_sweep(spec: TuneSpec, choices: dict) -> dict:
    """The test as a sweep file's content: per setting and method a run at the chosen values on
    the full training set (``val_subset`` 0), scored once on the test set: one run over the test
    seeds that are also the tuning's ``seeds``, and one run per further test seed (``seeds=3``,
    ...), so that raising ``test_seeds`` on ``--resume`` adds runs and keeps the finished ones."""
    common = [s for s in spec.test_seeds if s in spec.seeds]
    extra = [s for s in spec.test_seeds if s not in spec.seeds]
    runs = []
    for group in ([None] if common else []) + [[s] for s in extra]:
        for s in spec.settings:
            for m in spec.methods:
                runs.append({**s.overrides, "methods": [m], **choices[s.name][m]["values"],
                             **({"seeds": group} if group else {})})
    return {"base": portable(Path(spec.base)), "val_subset": 0, "seeds": common or extra[:1], "runs": runs}


def apply_reuse(spec: TuneSpec, url: str, log=print) -> int:
    """Copy the reused methods' studies (``reuse``) from the earlier tuning's journal into this
    tuning's storage, each only if the storage does not hold it yet; return how many were copied."""
    import optuna
    if not spec.reuse:
        return 0
    source = open_storage(str(_locate(Path(spec.reuse["from"])) / "study.journal"))
    target = open_storage(url)
    held = set(optuna.get_all_study_names(target))
    copied = 0
    for s in spec.settings:
        for m in spec.reuse["methods"]:
            for kind in (SEARCH, SEEDS) if spec.tuned(m) else (SEEDS,):
                name = study_name(s.name, m, kind)
                if name not in held:
                    optuna.copy_study(from_study_name=name, from_storage=source, to_storage=target)
                    copied += 1
    if copied:
        log(f"reuse: {copied} studies of {', '.join(spec.reuse['methods'])} copied from {spec.reuse['from']}")
    return copied


def reuse_test_runs(spec: TuneSpec, test_dir: Path, log=print) -> list[str]:
    """Copy the earlier tuning's finished test runs of the reused methods into ``test_dir`` where
    this test runs the same (same folder name: same setting, values and seeds); return their names."""
    import shutil
    if not spec.reuse:
        return []
    earlier = _locate(Path(spec.reuse["from"])) / "test"
    sweep = yaml.safe_load((test_dir.parent / "test.yaml").read_text())
    copied = []
    for own in sweep["runs"]:
        if own["methods"][0] not in spec.reuse["methods"]:
            continue
        name = run_name(own)
        manifest = earlier / name / "manifest.json"
        if (test_dir / name).exists() or not manifest.is_file() or \
                json.loads(manifest.read_text()).get("status") != "finished":
            continue
        shutil.copytree(earlier / name, test_dir / name, ignore=shutil.ignore_patterns("*.pt", "*.html"))
        copied.append(name)
    if copied:
        log(f"reuse: {len(copied)} finished test run(s) copied from {spec.reuse['from']}/test")
    return copied


def ensure(tune_dir: str | Path, tune_file: str | Path) -> Path:
    """The tuning folder ``tune_dir`` (relative: under the project root), running ``tune_file``
    into it first when it holds no tuning yet (no 05 inside: the caller is the reading).
    What notebook 05 does when opened on a tuning that has not run."""
    folder = book.resolve(str(tune_dir))
    if not (folder / "tune.json").exists():
        run_tune(tune_file, outputs=folder.parent, name=folder.name, analysis=False)
    return folder


def run_tune(tune_file: str | Path, workers: int | None = None, scheduler: str | None = None,
             storage: str | None = None, resume: bool = False, outputs: str | Path = "outputs",
             name: str | None = None, dashboard: str = ":8787", analysis: bool = True, log=print,
             timeout: float | None = None) -> dict:
    """Tune, choose, test and record (see the module's docstring); return ``tune.json``'s content.

    ``timeout`` (seconds): after it no trial or test run starts; the running ones finish, and the
    tuning ends 'stopped' (``--resume`` goes on), as Optuna's ``optimize(timeout=...)`` does.

    Raises ``ParamsError`` (a bad tune file) or ``RunError`` (a folder or storage in the way, or a
    study whose trials keep failing) before anything runs, or when it cannot go on."""
    from .extras import require
    require("tune", "tuning")  # before anything is created: one line naming the extra, not an ImportError
    import optuna
    from .runner import execute, notebooks_dir, render_html
    from .sweep import _PlainDumper, connected, deadline_after, past, run_sweep
    deadline = deadline_after(timeout)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    tune_file = _locate(Path(tune_file))
    spec = load_tune(tune_file)
    tune_dir = Path(outputs) / (name or tune_file.stem)
    record_path = tune_dir / "tune.json"
    if record_path.exists() and not resume:
        raise RunError(f"{tune_dir} already holds a tuning; continue it with: python -m kdlib tune {tune_file} "
                       f"--resume (finished trials are kept), or delete {tune_dir}")
    if record_path.exists():
        before = yaml.safe_load((tune_dir / "tune.yaml").read_text())
        now_spec = spec.as_dict()
        before.setdefault("test_seeds", before.get("seeds"))  # a tuning recorded before test_seeds existed
        changed = [k for k in set(now_spec) | set(before) if k not in RESUMABLE and before.get(k) != now_spec.get(k)]
        if changed:
            raise RunError(f"{tune_file}: {', '.join(sorted(changed))} differ from the tuning in {tune_dir}; only "
                           "trials and test_seeds may change on --resume: restore them, or tune into a new folder "
                           f"(delete {tune_dir})")
        done = json.loads(record_path.read_text())
        if (done.get("status") == "finished" and all(before.get(k) == now_spec[k] for k in ("trials", "test_seeds"))
                and (not analysis or (tune_dir / ANALYSIS).exists())):
            log(f"{tune_dir}: finished earlier with {spec.trials} trials per tuned method; nothing to do "
                "(raise trials in the tune file to search further)")
            return done
    url = storage_url(tune_dir, storage)
    check_storage(url)
    if "://" not in url and repair_journal(Path(url)):
        log(f"{portable(Path(url))}: a partial last line (left by a killed process) cut off")
    tune_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(tune_dir / "tune.yaml", yaml.dump(spec.as_dict(), Dumper=_PlainDumper, sort_keys=False))
    before = json.loads(record_path.read_text()) if record_path.exists() else {}
    earlier = before.get("earlier", []) + ([ended_attempt(before)] if "started" in before else [])
    data = {"tune": portable(tune_file), "base": portable(Path(spec.base)),
            "storage": portable(Path(url)) if "://" not in url else url.split("://")[0] + "://…",
            "cluster": "given scheduler" if scheduler else "embedded LocalCluster", "status": "running",
            "started": now(), **({"earlier": earlier} if earlier else {})}

    def write():
        write_atomic(record_path, json.dumps(data, indent=1))

    write()
    apply_reuse(spec, url, log)
    tuning = Tuning(spec, url, tune_dir)
    stale = tuning.fail_running()
    if stale:
        log(f"{stale} trial(s) left running by an earlier start marked failed; they are asked again")
    with connected(workers, scheduler, len(spec.settings) * len(spec.methods), dashboard) as client:
        info = client.scheduler_info()["workers"].values()
        log(f"dashboard: {client.dashboard_link}; {len(info)} workers; {len(spec.settings)} setting(s) x "
            f"{len(spec.methods)} methods, {spec.trials} trials per tuned method")
        if _drive(client, tuning, log, deadline):
            return _stopped(data, write, tuning, log, "its search and re-scoring")
        choices = {s.name: {m: tuning.choice(s, m) for m in spec.methods} for s in spec.settings}
        _write_best(tune_dir / "best.yaml", spec, choices)
        write_atomic(tune_dir / "trials.csv", tuning.frame().to_csv(index=False))
        data["studies"] = _study_summary(tuning)
        write()
        sweep_file = tune_dir / "test.yaml"
        write_atomic(sweep_file, "# the test of the chosen values (best.yaml), written by kdlib tune\n"
                              + yaml.dump(test_sweep(spec, choices), Dumper=_PlainDumper, sort_keys=False))
        log(f"test: {len(spec.settings) * len(spec.methods)} methods and settings x {len(spec.test_seeds)} seeds on "
            "the full training set, scored on the test set")
        if past(deadline):
            return _stopped(data, write, tuning, log, "its test")
        reuse_test_runs(spec, tune_dir / "test", log)
        result = run_sweep(sweep_file, scheduler=client.scheduler.address, outputs=tune_dir, name="test",
                           resume=(tune_dir / "test" / "sweep.json").exists(), analysis=analysis, log=log,
                           deadline=deadline)
    if result["status"] == "stopped":
        return _stopped(data, write, tuning, log, "its test runs")
    data.update(status=result["status"], test=result["status"], ended=now())
    write()
    if analysis and result["status"] == "finished":
        execute(notebooks_dir(), ANALYSIS, tune_dir, {"tune_dir": portable(tune_dir)}, {"tune_dir"})
        log(f"analysis: {portable(render_html(tune_dir / ANALYSIS))}")
    return data


def _stopped(data: dict, write, tuning: Tuning, log, left: str) -> dict:
    """The tuning stopped by its timeout: recorded as 'stopped', ``trials.csv`` current."""
    frame = tuning.frame()
    if tuning.dir is not None and not frame.empty:
        write_atomic(tuning.dir / "trials.csv", frame.to_csv(index=False))
    data.update(status="stopped", ended=now())
    write()
    log(f"stopped by the timeout before the end of {left}: finished trials and runs are kept; "
        "continue with --resume")
    return data


def _write_best(path: Path, spec: TuneSpec, choices: dict) -> None:
    from .sweep import _PlainDumper
    out = {}
    for s in spec.settings:
        out[s.name] = {"setting": s.overrides, "in words": _words(s), "methods": {}}
        for m in spec.methods:
            c = choices[s.name][m]
            out[s.name]["methods"][m] = {"values": {k: (round(v, 6) if isinstance(v, float) else v)
                                                    for k, v in c["values"].items()},
                                         "val_acc": round(c["val_acc"], 3), **{k: v for k, v in c.items()
                                                                               if k not in ("values", "val_acc")}}
    write_atomic(path, "# each method's chosen values per setting, by validation accuracy (never the test set)\n"
                    + yaml.dump(out, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True))


def _study_summary(tuning: Tuning) -> dict:
    """Per study: trials complete, pruned and failed; training seconds; wall seconds from its
    first trial's start to its last one's end."""
    from datetime import datetime
    frame = tuning.frame()
    out = {}
    for (setting, method, kind), g in frame.groupby(["setting", "method", "kind"], sort=False):
        start = g["started"].dropna().min()
        end = g["ended"].dropna().max()
        wall = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() \
            if isinstance(start, str) and isinstance(end, str) else None
        out[f"{setting}/{method}/{kind}"] = {**{s: int((g["state"] == s).sum()) for s in ("complete", "pruned", "fail")},
                                             "train_seconds": round(float(g["seconds"].fillna(0).sum()), 1),
                                             "wall_seconds": wall}
    return out
