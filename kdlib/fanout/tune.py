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
studies' trials agrees with their last epoch's, ``kdlib.analysis.tune_results.pruner_fidelity``), ``rescore``
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
seed, scored once on the test set: a sweep (``kdlib.fanout.sweep``) in ``NAME/test/`` with its
records and 04. Last, ``trials.csv``, ``best.yaml`` and the executed ``05_tune.ipynb``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from ..records.files import write_atomic
from ..book.runner import RunError, now
from ..records.names import run_name, short_name
from ..records.paths import display_path, locate, resolve
from ..records.storage import SEARCH, SEEDS, open_storage, study_name
from ..records.files import PlainDumper, ended_attempt
from .cluster import RESOURCES, connected, deadline_after, error_line, past
from .search import Job, Tuning, trial_task
from .spec import PRUNER, RESUMABLE, Setting, TuneSpec, load_tune  # noqa: F401 (PRUNER: the default, read by tests and docs)
from ..records.extras import require
from ..book.runner import execute, notebooks_dir, render_html
from .sweep import run_sweep

ANALYSIS = "05_tune.ipynb"  # the notebook that reads a tuning

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
            raise RunError(f"--storage {url}: cannot open it ({error_line(err)}); give a reachable database URL "
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


# ---- the whole tuning ----------------------------------------------------------------------------

def _words(setting: Setting) -> str:
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
                error = error_line(future.exception())
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
    return {"base": display_path(Path(spec.base)), "val_subset": 0, "seeds": common or extra[:1], "runs": runs}


def apply_reuse(spec: TuneSpec, url: str, log=print) -> int:
    """Copy the reused methods' studies (``reuse``) from the earlier tuning's journal into this
    tuning's storage, each only if the storage does not hold it yet; return how many were copied."""
    import optuna
    if not spec.reuse:
        return 0
    source = open_storage(str(locate(Path(spec.reuse["from"])) / "study.journal"))
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
        studies = "study" if copied == 1 else "studies"
        log(f"reuse: {copied} {studies} of {', '.join(spec.reuse['methods'])} copied from {spec.reuse['from']}")
    return copied


def reuse_test_runs(spec: TuneSpec, test_dir: Path, log=print) -> list[str]:
    """Copy the earlier tuning's finished test runs of the reused methods into ``test_dir`` where
    this test runs the same (same folder name: same setting, values and seeds); return their names."""
    import shutil
    if not spec.reuse:
        return []
    earlier = locate(Path(spec.reuse["from"])) / "test"
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
    folder = resolve(str(tune_dir))
    if not (folder / "tune.json").exists():
        run_tune(tune_file, outputs=folder.parent, name=folder.name, analysis=False)
    return folder


def check_tune(tune_file: str | Path, storage: str | None = None, resume: bool = False,
               outputs: str | Path = "outputs", name: str | None = None) -> str:
    """Every check ``run_tune`` makes before it runs a trial (the tune file and every value of its
    search space, a tuning folder in the way or a resume that changed it, the reused tuning), but
    the storage, which it names; nothing is created. Returns what would run, in one line."""
    tune_file = locate(Path(tune_file))
    spec = load_tune(tune_file)
    tune_dir = Path(outputs) / (name or tune_file.stem)
    done = _finished_earlier(spec, tune_file, tune_dir, resume, True, log=lambda *a: None)
    if done is not None:
        return f"{display_path(tune_dir)}: finished earlier; nothing to do"
    tuned = [m for m in spec.methods if spec.tuned(m)]
    return (f"would {'resume' if (tune_dir / 'tune.json').exists() else 'run'} {display_path(tune_dir)}: "
            f"{len(spec.settings)} setting(s), {spec.trials} trials each of {', '.join(tuned) or 'no method'}, then "
            f"a test over {len(spec.test_seeds)} seeds; storage {storage or display_path(tune_dir / 'study.journal')}")


def run_tune(tune_file: str | Path, workers: int | None = None, scheduler: str | None = None,
             storage: str | None = None, resume: bool = False, outputs: str | Path = "outputs",
             name: str | None = None, dashboard: str = ":8787", analysis: bool = True, log=print,
             timeout: float | None = None) -> dict:
    """Tune, choose, test and record (see the module's docstring); return ``tune.json``'s content.

    ``timeout`` (seconds): after it no trial or test run starts; the running ones finish, and the
    tuning ends 'stopped' (``--resume`` goes on), as Optuna's ``optimize(timeout=...)`` does.

    Raises ``ParamsError`` (a bad tune file) or ``RunError`` (a folder or storage in the way, or a
    study whose trials keep failing) before anything runs, or when it cannot go on."""
    require("tune", "tuning")  # before anything is created: one line naming the extra, not an ImportError
    import optuna
    deadline = deadline_after(timeout)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print
    tune_file = locate(Path(tune_file))
    spec = load_tune(tune_file)
    tune_dir = Path(outputs) / (name or tune_file.stem)
    done = _finished_earlier(spec, tune_file, tune_dir, resume, analysis, log)
    if done is not None:
        return done
    url = storage_url(tune_dir, storage)
    check_storage(url)
    if "://" not in url and repair_journal(Path(url)):
        log(f"{display_path(Path(url))}: a partial last line (left by a killed process) cut off")
    data, write = _open_record(spec, tune_file, tune_dir, url, scheduler)
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
        sweep_file = _choose(tuning, data, write, log)
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
        execute(notebooks_dir(), ANALYSIS, tune_dir, {"tune_dir": display_path(tune_dir)}, {"tune_dir"})
        log(f"analysis: {display_path(render_html(tune_dir / ANALYSIS))}")
    return data


def _finished_earlier(spec: TuneSpec, tune_file: Path, tune_dir: Path, resume: bool, analysis: bool, log) -> dict | None:
    """Refuse a folder that holds a tuning unless resumed, and a resume whose tune file changed
    more than ``RESUMABLE`` allows; return the record of a tuning finished as asked (nothing to do)."""
    record_path = tune_dir / "tune.json"
    if not record_path.exists():
        return None
    if not resume:
        raise RunError(f"{tune_dir} already holds a tuning; continue it with: python -m kdlib tune {tune_file} "
                       f"--resume (finished trials are kept), pick another --name, or delete {tune_dir}")
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
    return None


def _open_record(spec: TuneSpec, tune_file: Path, tune_dir: Path, url: str, scheduler: str | None):
    """``tune.yaml`` and a 'running' ``tune.json`` (an earlier attempt kept under ``earlier``);
    returns the record's data and the function that writes it."""
    tune_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(tune_dir / "tune.yaml", yaml.dump(spec.as_dict(), Dumper=PlainDumper, sort_keys=False))
    record_path = tune_dir / "tune.json"
    before = json.loads(record_path.read_text()) if record_path.exists() else {}
    earlier = before.get("earlier", []) + ([ended_attempt(before)] if "started" in before else [])
    data = {"tune": display_path(tune_file), "base": display_path(Path(spec.base)),
            "storage": display_path(Path(url)) if "://" not in url else url.split("://")[0] + "://…",
            "cluster": "given scheduler" if scheduler else "embedded LocalCluster", "status": "running",
            "started": now(), **({"earlier": earlier} if earlier else {})}

    def write():
        write_atomic(record_path, json.dumps(data, indent=1))

    write()
    return data, write


def _choose(tuning: Tuning, data: dict, write, log) -> Path:
    """Each method's chosen values (``best.yaml``), the trials and the studies' counts recorded,
    and the test as a sweep file (``test.yaml``), whose path is returned."""
    spec, tune_dir = tuning.spec, tuning.dir
    choices = {s.name: {m: tuning.choice(s, m) for m in spec.methods} for s in spec.settings}
    _write_best(tune_dir / "best.yaml", spec, choices)
    write_atomic(tune_dir / "trials.csv", tuning.frame().to_csv(index=False))
    data["studies"] = _study_summary(tuning)
    write()
    sweep_file = tune_dir / "test.yaml"
    write_atomic(sweep_file, "# the test of the chosen values (best.yaml), written by kdlib tune\n"
                          + yaml.dump(test_sweep(spec, choices), Dumper=PlainDumper, sort_keys=False))
    log(f"test: {len(spec.settings) * len(spec.methods)} methods and settings x {len(spec.test_seeds)} seeds on "
        "the full training set, scored on the test set")
    return sweep_file


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
                    + yaml.dump(out, Dumper=PlainDumper, sort_keys=False, allow_unicode=True))


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
