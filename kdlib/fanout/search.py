"""A tuning's search: its Optuna studies (TPE and the median pruner, one per setting and method, and
one of fixed-value runs), one trial as a worker runs it, and the client's scheduler (``Tuning``):
which job runs next, and which values each method is tested at.

The driver (``kdlib.fanout.tune``) asks ``Tuning.next_job`` whenever a worker is free, starts the
job's trial (``Tuning.start``) and submits ``trial_task`` to the cluster; the worker reports each
epoch and tells Optuna how the trial ended.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..book import steps as book
from ..book.params import validate
from ..book.runner import RunError
from ..records.storage import SEARCH, SEEDS, open_storage, study_name
from ..train.distillers import METHODS
from .cluster import error_line, worker_slot
from .spec import Setting, TuneSpec
from ..train.assemble import teacher_bank
from ..train.checkpoint import sha256_file
from ..book.params import own_student, teacher_names
from .sweep import teacher_key
from ..train.assemble import train_student
from ..train.loop import NonFiniteLossError


def trial_of(study, number: int):
    """The ``optuna.Trial`` of trial ``number`` of ``study``, for a process that did not ask for it
    (the worker reports the epochs of a trial the client asked; the client fails a trial whose
    worker died). No public call serves: Optuna hands a Trial only to the ``study.ask()`` that made
    it, so its id is looked up here, the one place that reads Optuna's private storage API."""
    import optuna
    return optuna.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


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


# ---- one trial, on a worker ----------------------------------------------------------------------

_PREPARED: dict = {}


def _prepared(P: dict, device, teachers: bool = True):
    """``(student data, teacher bank)`` for ``P`` (the bank None where ``teachers`` is false: a
    method that never sees one), each kept for the next trial of this process that needs the
    same: one data load and one teacher pass serve every trial of a setting on this worker."""
    data_key = json.dumps([str(device)] + [P[k] for k in ("dataset", "data_root", "train_subset", "test_subset",
                                                          "val_subset", "labelled_subset", "image_size",
                                                          "data_mean", "data_std")])
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
        names = teacher_names(P)
        models = [book.teacher_model(P, n, data, tcfg, quiet)[0] for n in names]
        sha = {n: sha256_file(book.teacher_checkpoint(P, n)) for n in names}
        cfg0 = book._config(P, P["student_epochs"], 0, device)
        bank = teacher_bank(models, names, sdata, cfg0, P["hint_layer"], cache=P["cache_teachers"],
                            log=quiet, view_files=book.view_cache_files(P, sha, sdata))
        _PREPARED["bank"] = (bank_key, bank)
    return sdata, _PREPARED["bank"][1]


def evaluate(P: dict, method: str, seed: int, on_epoch=None) -> list[dict]:
    """Train ``method``'s student with ``P`` and ``seed`` on the validation split's training part;
    return its history, whose ``test_acc`` is accuracy on the held-out validation images."""
    device = book.device_of(P)
    data, bank = _prepared(P, device, METHODS[method].learns_from_teachers)
    cfg = book._config(P, P["student_epochs"], seed, device)
    _, history = train_student(method, bank, data, cfg, temperature=P["temperature"], alpha=P["alpha"],
                               beta=P["beta"], hint_layer=P["hint_layer"], log=lambda *a: None,
                               camkd_form=P["camkd_form"], label_smoothing=P["label_smoothing"],
                               width=P["student_width"], on_epoch=on_epoch,
                               build=book.model_builder(P, None, data) if own_student(P) else None)
    return history


def trial_task(url: str, name: str, number: int, P: dict, method: str, seed: int, pruner: dict | None) -> dict:
    """Run trial ``number`` of study ``name`` and tell Optuna how it ended: complete (its last
    validation accuracy), pruned (the median pruner stopped it, or its loss became
    non-finite), or failed (an error, recorded). With ``pruner`` None (an evaluation at fixed
    values) nothing is pruned. Returns ``{state, value, epochs, seconds, worker, error}``."""
    import optuna
    from optuna.trial import TrialState
    address, threads = worker_slot()
    os.environ["KDBOOK_PROGRESS"] = "off"
    study = _study(url, name, pruner=pruner)
    trial = trial_of(study, number)
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
        state, error = TrialState.PRUNED, error_line(err)
    except Exception as err:  # recorded, and the trial asked again
        state, error = TrialState.FAIL, error_line(err)
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
                study.tell(t.number, state=TrialState.FAIL)
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
        return self._next_reference(flight) or self._next_search(flight) or self._next_rescore(flight)

    def _next_reference(self, flight) -> Job | None:
        """A seed of a method with no search (scratch) not yet run in some setting."""
        for s in self.spec.settings:
            for m in self.spec.methods:
                if self.spec.tuned(m):
                    continue
                for seed in self.spec.seeds:
                    if not self._seed_done(s, m, None, seed, flight):
                        return Job(s, m, SEEDS, seed)
        return None

    def _next_search(self, flight) -> Job | None:
        """A new trial of the search with the fewest trials done (running ones counted), the first
        in the tune file's order among equals, while one still has trials left."""
        open_studies = [(s, m) for s in self.spec.settings for m in self.spec.methods
                        if self.spec.tuned(m) and self.search_left(s, m, flight) > 0]
        if not open_studies:
            return None
        s, m = min(open_studies, key=lambda sm: self.spec.trials - self.search_left(*sm, flight))  # min keeps order
        return Job(s, m, SEARCH, self.spec.seeds[0])

    def _next_rescore(self, flight) -> Job | None:
        """Once a setting's references have run, a seed not yet run of a trial within noise of its
        study's best (``candidates``), for every finished search."""
        for s in self.spec.settings:
            if not self.references_done(s):
                continue
            for m in self.spec.methods:
                searching = any(j.kind == SEARCH and j.setting is s and j.method == m for j in flight)
                if not self.spec.tuned(m) or searching:
                    continue
                candidates = self.candidates(s, m)
                for t in candidates if len(candidates) > 1 else []:
                    for seed in self.spec.seeds[1:]:
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
        if any(t.number == number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))):
            trial_of(study, number).set_user_attr("error", error)
            study.tell(number, state=TrialState.FAIL)

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
