"""kdlib tune: every bad tune file refused in one line, the pruner stopping a hopeless trial,
trials never scored on the test set, the choice, and a tiny study end to end through a
LocalCluster, killed mid-search and resumed, its test runs and 05 under nbval."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kdlib.book import steps as book
from kdlib.fanout import search, tune
from kdlib.analysis import tune_results as tune_analysis
from kdlib.__main__ import main
from kdlib.train.data import DEBIAN_FASHION_MNIST
from kdlib.book.params import ParamsError
from kdlib.book.runner import RunError
from kdlib.records.names import run_name
from kdlib.fanout.tune import Tuning, load_tune, repair_journal, run_tune, trial_task
from kdlib.records.storage import study_name

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "tune" / "smoke-tune.yaml"
needs_data = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
VANILLA = {"temperature": {"low": 1, "high": 8, "log": True}, "alpha": {"low": 0.1, "high": 10, "log": True}}


def tune_file(tmp_path, **changes) -> Path:
    raw = {"base": "params/smoke_tune.yaml", "methods": ["scratch", "vanilla"], "trials": 3,
           "space": {"vanilla": dict(VANILLA)}}
    raw.update(changes)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BAD = [
    ({"space": {"vanilla": {"temprature": {"low": 1, "high": 8}}}}, "space: vanilla: temprature: not a params key"),
    ({"space": {"scratch": {"alpha": {"low": 0.1, "high": 1}}}}, "space: scratch: alpha: scratch does not use alpha"),
    ({"space": {"vanilla": {"temperature": {"low": 8, "high": 1}}}}, "low 8 is above high 1"),
    ({"space": {"vanilla": {"alpha": {"low": 0, "high": 1, "log": True}}}}, "a log scale needs low > 0"),
    ({"space": {"vanilla": {"temperature": []}}}, "space: vanilla: temperature: an empty list of choices"),
    ({"space": {"vanilla": {"temperature": {"low": 0, "high": 4}}}}, "temperature: 0.0 is not allowed"),
    ({"space": {"vanilla": {"val_subset": [0, 100]}}}, "space: vanilla: val_subset: cannot be tuned"),
    ({"trials": 0}, "trials: 0 is not allowed"),
    ({"methods": ["scratch", "vanila"]}, "methods: 'vanila' is not a method"),
    ({"base": "params/smoke.yaml"}, "has no val_subset"),
    ({"settings": [{"val_subset": 0}]}, "sets val_subset to 0, which would tune on the test set"),
    ({"space": {"camkd": {"beta": [0, 10]}}}, "space: 'camkd' is not in methods"),
    ({"trails": 3}, "unknown key 'trails'"),
]


@pytest.mark.parametrize("changes, words", BAD, ids=[w[:40] for _, w in BAD])
def test_bad_tune_file_refused_in_one_line_naming_file_and_key(tmp_path, capsys, changes, words):
    path = tune_file(tmp_path, **changes)
    with pytest.raises(ParamsError) as err:
        load_tune(path)
    message = str(err.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message
    assert main(["tune", str(path), "--outputs", str(tmp_path / "out")]) == 2  # the command says it the same way
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()  # refused before anything was created


def test_storage_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(RunError, match=r"storage .*study.journal: cannot write it"):
        run_tune(tune_file(tmp_path), outputs=blocker)


def test_a_partial_last_journal_line_is_cut_so_the_next_one_stays_whole(tmp_path):
    path = tmp_path / "study.journal"
    path.write_bytes(b'{"op_code": 0}\n{"op_co')
    assert repair_journal(path) and path.read_bytes() == b'{"op_code": 0}\n'
    assert not repair_journal(path)


@pytest.fixture(scope="module")
def poisoned_test_split():
    """The test split's labels all shifted by one class: a model scored on it gets about 0 %."""
    from kdlib.train import data as kdata
    real = book.load_dataset

    def load(*args, **kwargs):
        ds = real(*args, **kwargs)
        ds.test = kdata.Split(ds.test.images, (ds.test.labels + 1) % ds.num_classes)
        return ds

    mp = pytest.MonkeyPatch()
    mp.setattr(book, "load_dataset", load)
    yield
    mp.undo()
    search._PREPARED.clear()  # no later test gets the poisoned split from the cache


@needs_data
def test_median_pruner_stops_a_hopeless_trial_and_spares_a_good_one(tmp_path, poisoned_test_split):
    """Three finished trials at 30 % after every epoch; a trial that learns nothing (lr 1e-7)
    is stopped as soon as it has run its warm-up epoch, one that learns runs its four epochs.
    Both are scored on the validation split: the test split's labels are wrong here, so a
    score read from it would be near 0."""
    import optuna
    from optuna.distributions import FloatDistribution
    eps = {"label_smoothing": FloatDistribution(0.01, 0.5, log=True)}
    spec = load_tune(tune_file(tmp_path, methods=["label_smoothing"], space={"label_smoothing": {
        "label_smoothing": {"low": 0.01, "high": 0.5, "log": True}}}, pruner={"startup_trials": 3, "warmup_epochs": 1}))
    url = str(tmp_path / "study.journal")
    setting = spec.settings[0]
    study = Tuning(spec, url).studies[study_name(setting.name, "label_smoothing")]
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(params={"label_smoothing": 0.1}, distributions=eps, value=30.0,
                                                  intermediate_values={e: 30.0 for e in (1, 2, 3, 4)}))
    results = {}
    for name, lr in (("hopeless", 1e-7), ("good", 1e-3)):
        trial = study.ask(eps)
        P = dict(setting.P, methods=["label_smoothing"], student_epochs=4, lr=lr,
                 label_smoothing=trial.params["label_smoothing"], threads=1)
        results[name] = trial_task(url, study.study_name, trial.number, P, "label_smoothing", 0, spec.pruner)
    assert results["hopeless"]["state"] == "pruned" and results["hopeless"]["epochs"] == 1
    assert results["good"]["state"] == "complete" and results["good"]["epochs"] == 4
    assert results["good"]["value"] > 40  # the held-out training images, not the (poisoned) test split
    stored = {t.number: t for t in study.get_trials()}
    assert stored[3].state.name == "PRUNED" and stored[4].value == results["good"]["value"]


@needs_data
def test_a_trial_run_again_after_its_worker_died_reports_its_epochs_quietly(tmp_path):
    """Dask runs a trial's task again on another worker when its worker dies mid-trial: the
    trial, still running in the journal, has its first epochs reported already. The second run
    reports them again without a warning per epoch; Optuna keeps the first values, and the
    trial ends complete with the second run's accuracy."""
    import warnings
    from optuna.distributions import FloatDistribution
    spec = load_tune(tune_file(tmp_path, methods=["label_smoothing"], space={"label_smoothing": {
        "label_smoothing": {"low": 0.01, "high": 0.5, "log": True}}}))
    url = str(tmp_path / "study.journal")
    setting = spec.settings[0]
    study = Tuning(spec, url).studies[study_name(setting.name, "label_smoothing")]
    trial = study.ask({"label_smoothing": FloatDistribution(0.01, 0.5, log=True)})
    trial.report(12.5, 1)  # what the dead worker reported
    P = dict(setting.P, methods=["label_smoothing"], student_epochs=2, label_smoothing=trial.params["label_smoothing"],
             threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = trial_task(url, study.study_name, trial.number, P, "label_smoothing", 0, None)
    stored = study.get_trials()[0]
    assert result["state"] == "complete" and result["epochs"] == 2
    assert stored.intermediate_values[1] == 12.5 and stored.value == result["value"]


def test_choice_rescores_only_trials_within_noise_and_picks_the_best_mean(tmp_path):
    """Made-up trials: the reference's seeds (sd 1) put the noise band at 1.96 sqrt 2 = 2.77
    points; trials 0 (90.0) and 1 (88.0) are within it, 2 (85.0) is not. Re-scored, trial 1
    has the better mean over seeds and is chosen."""
    import optuna
    from optuna.distributions import FloatDistribution
    spec = load_tune(tune_file(tmp_path, seeds=[0, 1, 2]))
    url = str(tmp_path / "study.journal")
    tuning = Tuning(spec, url)
    s = spec.settings[0]
    dist = {"temperature": FloatDistribution(1, 8, log=True), "alpha": FloatDistribution(0.1, 10, log=True)}
    search = tuning.studies[study_name(s.name, "vanilla")]
    for value, t in ((90.0, 2.0), (88.0, 3.0), (85.0, 5.0)):
        search.add_trial(optuna.trial.create_trial(params={"temperature": t, "alpha": 1.0}, distributions=dist,
                                                   value=value))

    def evaluation(method, value, seed, source=None):
        tuning.studies[study_name(s.name, method, "seeds")].add_trial(optuna.trial.create_trial(
            value=value, user_attrs={"seed": seed, "source": source, "knobs": {}}))

    for seed, value in enumerate((86.0, 87.0, 88.0)):
        evaluation("scratch", value, seed)
    assert math.isclose(tuning.noise(s), 1.0)
    assert [t.number for t in tuning.candidates(s, "vanilla")] == [0, 1]
    job = tuning.next_job([])
    assert (job.kind, job.source, job.seed) == ("seeds", 0, 1)  # re-scoring starts with the best trial
    for seed, (v0, v1) in zip((1, 2), ((84.0, 89.0), (85.0, 89.0))):
        evaluation("vanilla", v0, seed, source=0)
        evaluation("vanilla", v1, seed, source=1)
    assert tuning.next_job([]) is None
    choice = tuning.choice(s, "vanilla")
    assert choice["trial"] == 1 and choice["values"]["temperature"] == 3.0
    assert math.isclose(choice["val_acc"], (88.0 + 89.0 + 89.0) / 3) and choice["val_seeds"] == 3
    assert choice["rescored"] == [0, 1] and choice["complete"] == 3


def _states(tune_dir: Path) -> dict:
    """(study, trial number) -> (state, value) of every trial in a tuning's journal, read afresh."""
    import optuna
    from optuna.storages.journal import JournalFileBackend
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tune_dir / "study.journal")))
    return {(name, t.number): (t.state.name, t.value) for name in optuna.get_all_study_names(storage)
            for t in optuna.load_study(study_name=name, storage=storage).trials}


def _search_rows(tune_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(tune_dir / "trials.csv")
    return frame[frame["kind"] == "search"]


@pytest.mark.slow
@needs_data
def test_tiny_tuning_killed_mid_search_resumes_then_tests_and_reads_in_05(tmp_path):
    """``kdlib tune params/tune/smoke-tune.yaml`` on a two-worker LocalCluster, SIGKILLed (with
    its workers) as soon as a search trial has finished, then ``--resume``d: no finished trial
    is lost or run again, the killed ones are failed and asked again, vanilla ends with exactly
    its 3 trials; the test sweep has every method on both seeds; resumed once more it leaves the
    finished tuning untouched; 05 runs under nbval on the result."""
    project = tmp_path / "project"
    env = dict(os.environ, KDBOOK_ROOT=str(project), KDBOOK_PROGRESS="off",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "kdlib", "tune", str(SMOKE), "--outputs", str(project / "outputs"),
               "--workers", "2"]
    tune_dir = project / "outputs" / "smoke-tune"
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:
        # killed while a search trial has finished and another trial is under way (not between two)
        if ((tune_dir / "trials.csv").exists() and (_search_rows(tune_dir)["state"] == "complete").any()
                and any(state == "RUNNING" for state, _ in _states(tune_dir).values())):
            break
        time.sleep(0.2)
    assert first.poll() is None, "the tuning ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    time.sleep(1)  # the workers' processes go with their group
    states = _states(tune_dir)
    before = {k: v for k, v in states.items() if v[0] in ("COMPLETE", "PRUNED")}
    killed = [k for k, v in states.items() if v[0] == "RUNNING"]
    assert before and killed

    second = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    after = _states(tune_dir)
    assert all(after[key] == state for key, state in before.items())  # nothing finished was lost or re-run
    search = _search_rows(tune_dir)
    assert set(search["method"]) == {"vanilla"}
    for method, rows in search.groupby("method"):
        assert rows["state"].isin(["complete", "pruned"]).sum() == 3  # the budget, exactly
    assert all(after[key][0] == "FAIL" for key in killed)  # the killed trials, failed and asked again
    assert (pd.read_csv(tune_dir / "trials.csv")["state"] == "fail").any()
    assert not any("test" in c for c in pd.read_csv(tune_dir / "trials.csv").columns)
    best = yaml.safe_load((tune_dir / "best.yaml").read_text())
    assert set(best["base"]["methods"]) == {"scratch", "vanilla"}
    # its test sweep's setting is named as the tuning names it, in 05's forest plot too, not 'base'
    assert tune_analysis.load(tune_dir).test.names == {(): best["base"]["in words"]} != {(): "base"}
    record = json.loads((tune_dir / "test" / "sweep.json").read_text())
    assert record["status"] == "finished" and len(record["runs"]) == 2
    vanilla_run = next(n for n in record["runs"] if "methods=vanilla" in n)
    P = yaml.safe_load((tune_dir / "test" / vanilla_run / "params.yaml").read_text())
    assert P["val_subset"] == 0 and P["seeds"] == [0, 1]  # the test: every image, every seed
    assert P["temperature"] == pytest.approx(best["base"]["methods"]["vanilla"]["values"]["temperature"], rel=1e-5)
    assert (tune_dir / "05_tune.ipynb").is_file() and (tune_dir / "test" / "04_sweep_analysis.ipynb").is_file()

    # a finished tuning resumed again (make studies runs every study) is left as it is
    kept = {p: p.read_bytes() for p in (tune_dir / "tune.json", tune_dir / "study.journal", tune_dir / "05_tune.ipynb")}
    third = subprocess.run(command + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "nothing to do" in third.stdout, third.stdout[-2000:] + third.stderr[-2000:]
    assert all(p.read_bytes() == content for p, content in kept.items())

    # more test seeds on --resume: one run per method for the new seed, the finished runs left as they were
    finished = {p: p.read_bytes() for p in (tune_dir / "test").glob("*/manifest.json")}
    more = tmp_path / "smoke-tune.yaml"
    more.write_text(SMOKE.read_text() + "test_seeds: [0, 1, 2]\n")
    fourth = subprocess.run([sys.executable, "-m", "kdlib", "tune", str(more), "--outputs", str(project / "outputs"),
                             "--workers", "2", "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert fourth.returncode == 0, fourth.stdout[-2000:] + fourth.stderr[-2000:]
    record = json.loads((tune_dir / "test" / "sweep.json").read_text())
    assert record["status"] == "finished" and len(record["runs"]) == 4
    added = [n for n in record["runs"] if n.endswith(",seeds=2") or n == "methods=scratch,seeds=2"]
    assert len(added) == 2
    assert yaml.safe_load((tune_dir / "test" / added[0] / "params.yaml").read_text())["seeds"] == [2]
    assert all(p.read_bytes() == content for p, content in finished.items())
    test = tune_analysis.test_frame(tune_analysis.load(tune_dir))
    assert set(test["seeds"]) == {3}  # the runs of seeds 0 and 1 and the run of seed 2 pool into one

    nbval = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "notebooks/05_tune.ipynb",
                            "-p", "no:cacheprovider", "-q"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert nbval.returncode == 0, nbval.stdout[-3000:]


def test_importances_of_trials_that_all_scored_the_same_are_empty_not_an_error(tmp_path):
    """fANOVA has no variance to attribute when every complete trial scored the same (it raises
    'zero total variance'); the reading then shows no importance instead of failing."""
    import optuna
    from optuna.distributions import FloatDistribution
    from kdlib.analysis.tune_results import TuneResults, importances
    url = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="base/vanilla", storage=tune.open_storage(url), direction="maximize")
    dist = {"temperature": FloatDistribution(1, 8), "alpha": FloatDistribution(0.1, 10)}
    for t, a in ((2.0, 1.0), (5.0, 3.0), (7.0, 0.5)):
        study.add_trial(optuna.trial.create_trial(params={"temperature": t, "alpha": a}, distributions=dist, value=50.0))
    frame = pd.DataFrame({"setting": "base", "method": "vanilla", "kind": "search", "state": "complete",
                          "val_acc": [50.0, 50.0, 50.0]})
    res = TuneResults(tmp_path, {"space": {"vanilla": {"temperature": {}, "alpha": {}}}}, frame, {}, None)
    assert importances(res, "base", "vanilla") == {}
    frame.loc[0, "val_acc"] = 60.0  # once they differ, fANOVA attributes it
    study.add_trial(optuna.trial.create_trial(params={"temperature": 3.0, "alpha": 1.0}, distributions=dist, value=60.0))
    found = importances(res, "base", "vanilla")
    assert set(found) == {"temperature", "alpha"} and math.isclose(sum(found.values()), 1.0)


def test_unfinished_studies_are_named_with_how_far_they_got(tmp_path):
    """The README's block 'each method at its best' while no study has finished its test: each
    study named with its stage, from its records (searching, re-scoring, testing, not started)."""
    from kdlib.analysis import tune_results as tune_analysis
    spec = {"base": "params/fashionmnist_tune.yaml", "settings": [{"student_width": 0.25}],
            "methods": ["scratch", "vanilla"], "trials": 3, "seeds": [0, 1, 2], "space": {"vanilla": VANILLA}}
    row = {"setting": "student_width=0.25", "method": "vanilla", "kind": "search", "trial": 0, "seed": 0,
           "state": "complete", "temperature": 1.0, "alpha": 0.5, "val_acc": 88.0, "epochs": 15, "seconds": 60.0}
    stages = {"a-search": [row], "b-rescore": [row, dict(row, kind="rescore", seed=1)],
              "c-test": [row, dict(row, kind="rescore", seed=1)]}
    for name, rows in stages.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "tune.yaml").write_text(yaml.safe_dump(spec))
        pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
    (tmp_path / "c-test" / "best.yaml").write_text(yaml.safe_dump({"student_width=0.25": {"methods": {}}}))
    (tmp_path / "c-test" / "test").mkdir()  # its test sweep: one run of two finished (a run holds every seed)
    (tmp_path / "c-test" / "test" / "sweep.json").write_text(json.dumps({"status": "running", "runs": {
        "methods=scratch": {"status": "finished"}, "methods=vanilla,temperature=1": {"status": "running"}}}))
    (tmp_path / "f-chosen").mkdir()  # stopped after the choice, before its test's first run
    for name in ("tune.yaml", "trials.csv", "best.yaml"):
        (tmp_path / "f-chosen" / name).write_bytes((tmp_path / "c-test" / name).read_bytes())
    (tmp_path / "f-chosen" / "tune.json").write_text(json.dumps({"status": "stopped"}))
    (tmp_path / "e-started").mkdir()  # started, no trial finished: tune.yaml, no trials.csv yet
    (tmp_path / "e-started" / "tune.yaml").write_text(yaml.safe_dump(spec))
    text = tune_analysis.block([tmp_path / n for n in (*stages, "d-none", "e-started", "f-chosen")])
    assert "no study has finished its test yet" in text and "Until then the tables below" in text
    assert "Test accuracy at the final epoch" not in text  # the footnote of tables not there yet
    alone = tune_analysis.block([tmp_path / "a-search"], own_page=True)  # a study's own page: no tables below
    assert alone == ("No answer yet: `a-search` (searching, 1 of 3 trials); the test on the held-out test set "
                     "follows the search."), alone
    for words in ("`a-search` (searching, 1 of 3 trials)", "`b-rescore` (re-scoring its best trials over seeds, 1 run done)",
                  "`c-test` (testing the chosen values, 1 of 2 runs finished)", "`d-none` (not started)",
                  "`e-started` (searching)",
                  "`f-chosen` (stopped with its values chosen, before its test; `make studies` resumes it)"):
        assert words in text, text
    # before best.yaml names its settings, the search table names them in the same words, from the tune file
    searching = tune_analysis.load(tmp_path / "a-search")
    assert tune_analysis.counts(searching)["setting"].tolist() == ["small student"]
    spec["settings"] = [{}, {"teacher_class_swap": {"teacher_resnet": [[0, 6]]}}]
    (tmp_path / "a-search" / "tune.yaml").write_text(yaml.safe_dump(spec))
    searching = tune_analysis.load(tmp_path / "a-search")
    assert [searching.words(s) for s in ("base", run_name({"teacher_class_swap": {"teacher_resnet": [[0, 6]]}}), "student_width=0.25")] \
        == ["shipped", "swapped resnet", "student_width=0.25"]  # the last one is no longer in the tune file


def _chosen_at(tmp_path, space: dict, values: dict):
    """A TuneResults whose one setting chose ``values`` = {method: {knob: value}} in ``space``."""
    from kdlib.analysis.tune_results import TuneResults
    best = {"base": {"setting": {}, "in words": "base", "methods": {
        m: {"values": v, "val_acc": 85.0, "chosen": "best"} for m, v in values.items()}}}
    frame = pd.DataFrame({"setting": ["base"], "method": ["vanilla"], "kind": ["search"], "state": ["complete"],
                          "val_acc": [85.0]})
    return TuneResults(tmp_path, {"space": space, "methods": list(values)}, frame, best, None)


@pytest.mark.parametrize("log, value, side", [
    (True, 1.23, "low"),    # log(1.23) / log(8) = 0.0996: the lowest tenth on the log scale
    (True, 1.25, None),     # 0.107
    (True, 1.6, None),      # 0.226 on the log scale; on a linear one (1.6 - 1) / 7 = 0.086 would be the edge
    (False, 1.6, "low"),
    (True, 6.6, "high"),    # log(6.6) / log(8) = 0.907
    (False, 6.6, None),     # (6.6 - 1) / 7 = 0.8
    (False, 7.4, "high"),   # 0.914
])
def test_a_chosen_value_in_the_outer_tenth_of_its_range_is_at_its_edge(tmp_path, log, value, side):
    from kdlib.analysis.tune_results import edges
    res = _chosen_at(tmp_path, {"vanilla": {"temperature": {"low": 1, "high": 8, "log": log}, "beta": [0, 10]}},
                     {"vanilla": {"temperature": value, "beta": 0}})
    found = edges(res, "base", "vanilla")
    assert found == ([{"knob": "temperature", "value": value, "low": 1.0, "high": 8.0, "side": side}] if side else [])


def test_the_reading_names_chosen_values_at_the_edge_of_their_range_or_says_none_are(tmp_path):
    from kdlib.analysis import tune_results as tune_analysis
    space = {"vanilla": dict(VANILLA), "label_smoothing": {"label_smoothing": {"low": 0.01, "high": 0.5, "log": True}}}
    test = pd.DataFrame({"setting": ["base"] * 3, "method": ["vanilla", "label_smoothing", "scratch"],
                         **{f"{f} vs {a}": [math.nan] * 3 for f in ("mean_diff", "ci_low", "ci_high", "p_value")
                            for a in ("scratch", "label_smoothing")}})
    edge = _chosen_at(tmp_path, space, {"vanilla": {"temperature": 1.05, "alpha": 0.111},
                                        "label_smoothing": {"label_smoothing": 0.1}, "scratch": {}})
    line = [s for s in tune_analysis.reading(edge, test) if "edge of their searched range" in s]
    assert line == ["- **Chosen values at the edge of their searched range**: vanilla in base: T 1.05 (lowest "
                    "tenth of 1 to 8), alpha 0.111 (lowest tenth of 0.1 to 10). The best may lie beyond the range, "
                    "where no trial went."]
    assert tune_analysis.chosen(edge)["at the edge of its range"].tolist() == [
        "T 1.05 (lowest tenth of 1 to 8); alpha 0.111 (lowest tenth of 0.1 to 10)", "—", ""]
    inside = _chosen_at(tmp_path, space, {"vanilla": {"temperature": 3.0, "alpha": 1.0},
                                          "label_smoothing": {"label_smoothing": 0.1}, "scratch": {}})
    assert "none; every chosen value lies inside its range." in tune_analysis.reading(inside, test)[-1]


def test_a_study_of_the_same_student_searched_over_other_ranges_gets_a_column_of_its_own(tmp_path):
    """Two finished studies of one setting ('small student') stay apart in the answer: the one
    whose every range holds the first's and goes further is 'searched wider', with the ranges
    it widened on its line; one searched otherwise is named by its folder."""
    from conftest import write_tuning
    acc = {m: {0: 80.0 + d, 1: 82.0 + d, 2: 81.0 + d} for m, d in (("vanilla", 0.2), ("scratch", 0.0))}
    first, wide, other = (write_tuning(tmp_path / n, acc, {"vanilla": {"temperature": 1.5, "alpha": 0.5}})
                          for n in ("first", "wide", "other"))
    for folder, temperature in ((wide, {"low": 0.05, "high": 10.0, "log": True}),
                                (other, {"low": 0.5, "high": 5.0, "log": True})):
        spec = yaml.safe_load((folder / "tune.yaml").read_text())
        spec["space"]["vanilla"]["temperature"] = temperature
        (folder / "tune.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    text = tune_analysis.block([first, wide, other])
    assert "\n| test accuracy % | small student | small student, searched wider | small student, `other` |\n" in text
    lines = {line.split(",")[0]: line for line in text.splitlines() if line.startswith("- `")}
    assert ", ranges widened to T 0.05 to 10, on " in lines["- `wide`"]
    assert "widened" not in lines["- `first`"] + lines["- `other`"]
    assert "**small student, `other`**" in lines["- `other`"]
    chosen = [line for line in text.splitlines() if line.startswith("- **small student") and ": vanilla T" in line]
    assert [line.split("**")[1] for line in chosen] == ["small student", "small student, searched wider",
                                                        "small student, `other`"]
    # one study alone keeps its setting's words
    assert "\n| test accuracy % | small student |\n" in tune_analysis.block([wide])


def test_the_reading_gives_each_knobs_chosen_values_beside_the_base_params_untuned_one(tmp_path):
    """The base params file (with kdlib.book.params' defaults) says what each knob is without tuning."""
    from kdlib.analysis import tune_results as tune_analysis
    base = tmp_path / "base.yaml"
    base.write_text("temperature: 4.0\nalpha: 0.7\nval_subset: 5000\n")  # label smoothing: its default, 0.1
    res = _chosen_at(tmp_path, {}, {"vanilla": {"temperature": 1.05371, "alpha": 0.11079},
                                    "camkd": {"temperature": 2.0, "alpha": 1.5, "beta": 0},
                                    "label_smoothing": {"label_smoothing": 0.296366}, "scratch": {}})
    res.spec["base"] = str(base)  # absolute: the project root joined with it is the file itself
    test = pd.DataFrame({"setting": ["base"], "method": ["vanilla"]})
    line = tune_analysis._chosen_line(res, "base", tune_analysis._base_params(res))
    assert line == ("**base**: CAMKD T 2, alpha 1.5, its feature term off (beta 0); vanilla T 1.05, alpha 0.111; "
                    "label smoothing eps 0.296 (the base params' untuned defaults, for comparison: T 4, alpha 0.7, beta 100, eps 0.1).")
    assert f"- {line}" in tune_analysis.reading(res, test.assign(**{f"{f} vs {a}": math.nan for f in
                                                                   ("mean_diff", "ci_low", "ci_high", "p_value",
                                                                    "seeds") for a in tune_analysis.ANCHORS}))


def test_the_knob_plot_marks_the_searched_range_and_rings_the_choice(tmp_path):
    from kdlib.analysis import tune_results as tune_analysis
    res = _chosen_at(tmp_path, {"vanilla": dict(VANILLA), "ebkd": {"temperature": {"low": 0.5, "high": 4}}},
                     {"vanilla": {"temperature": 1.05, "alpha": 0.111}, "ebkd": {"temperature": 2.0, "alpha": 1.0}})
    res.trials = pd.DataFrame({"setting": "base", "method": ["vanilla", "vanilla", "ebkd"], "kind": "search",
                               "state": "complete", "temperature": [1.05, 3.0, 2.0], "val_acc": [85.0, 84.0, 83.0]})
    fig = tune_analysis.plot_knob(res, "base", "temperature")
    ax = fig.axes[0]
    assert sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == "range") == [0.5, 1.0, 4.0, 8.0]
    assert ax.get_xscale() == "log"  # one method searched it on a log scale
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig).draw()
    low, high = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert shown == ["0.5", "1", "2", "5"]  # plain numbers at 1, 2, 5, not matplotlib's 2x10^0


def test_the_knob_plot_of_a_setting_with_a_long_name_fits_its_figure(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from kdlib.analysis import tune_results as tune_analysis
    res = _chosen_at(tmp_path, {"vanilla": dict(VANILLA)}, {"vanilla": {"temperature": 1.05, "alpha": 0.111}})
    res.trials = pd.DataFrame({"setting": "base", "method": "vanilla", "kind": "search", "state": "complete",
                               "temperature": [1.05, 3.0], "alpha": [0.111, 2.0], "val_acc": [85.0, 84.0]})
    res.words = lambda setting: "small student + swapped resnet"  # the book's longest setting
    for knob in ("temperature", "alpha"):
        fig = tune_analysis.plot_knob(res, "base", knob)
        FigureCanvasAgg(fig).draw()
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches, what is drawn
        width, height = fig.get_size_inches()
        assert drawn.x0 >= 0 and drawn.y0 >= 0 and drawn.x1 <= width and drawn.y1 <= height, (knob, drawn)
        assert "small student + swapped resnet" in fig.axes[0].get_title()


def test_a_studys_wall_time_counts_the_time_something_ran_not_the_pauses_between_its_starts(tmp_path):
    """Two workers side by side for an hour, a pause of a day, then one trial of 30 minutes and a
    30-minute test run: 2 h of wall time, 3 h of training. A failed trial (its 'ended' is when
    a resume marked it failed) and a trial asked long before its worker ran it do not stretch it."""
    import json
    from kdlib.analysis import tune_results as tune_analysis
    rows = [("search", "complete", 3600.0, "2026-01-01T10:00:00", "2026-01-01T11:00:00"),
            ("search", "pruned", 3600.0, "2026-01-01T10:00:00", "2026-01-01T11:00:00"),
            ("search", "fail", None, "2026-01-01T10:30:00", "2026-01-02T10:00:00"),
            ("search", "complete", 1800.0, "2026-01-01T12:00:00", "2026-01-02T10:30:00")]  # asked, then a day later ran
    trials = pd.DataFrame([{"setting": "base", "method": "vanilla", "kind": k, "state": st, "seconds": sec,
                            "started": a, "ended": b, "epochs": 15} for k, st, sec, a, b in rows])
    (tmp_path / "test" / "run").mkdir(parents=True)
    (tmp_path / "test" / "run" / "manifest.json").write_text(json.dumps(
        {"status": "finished", "created": "2026-01-02T10:30:00+00:00", "ended": "2026-01-02T11:00:00+00:00",
         "seconds": 1800.0}))
    (tmp_path / "tune.json").write_text(json.dumps({"status": "finished", "earlier": [{}, {}]}))
    res = tune_analysis.TuneResults(tmp_path, {"space": {"vanilla": VANILLA}, "methods": ["vanilla"]}, trials, {}, None)
    assert tune_analysis.timing(res) == pytest.approx({"wall hours": 2.0, "training hours": 3.0, "starts": 3})
    assert tune_analysis.timing_line(res) == ("Its time: 2.0 h of wall time while a trial or test run was running, "
                                              "3.0 h of training summed over them, over 3 starts.")
    assert tune_analysis.counts(res).iloc[0]["wall hours"] == 1.5  # its trials only, the test run not


@pytest.mark.parametrize("text, seconds", [("5400", 5400), ("90m", 5400), ("2h", 7200), ("1h30m", 5400),
                                           ("45s", 45), ("0.5h", 1800), ("1h0m30s", 3630)])
def test_a_timeout_is_read_in_seconds_minutes_or_hours(text, seconds):
    from kdlib.__main__ import duration
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["2x", "", "h", "1.5.2m", "-3"])
def test_a_timeout_that_is_no_duration_is_refused_in_one_line(text, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["tune", str(SMOKE), "--timeout", text])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument --timeout: {text!r} is not a duration: give seconds, or e.g. 90m, 2h, 1h30m" in err


FAKE = {"seconds": 1.0}


def _fake_trial(url, name, number, P, method, seed, pruner):
    """A trial of FAKE["seconds"] that scores 80 + its number (no training)."""
    time.sleep(FAKE["seconds"])
    search._study(url, name).tell(number, 80.0 + number)
    return {"state": "complete", "value": 80.0 + number, "epochs": 1, "seconds": 1.0, "worker": None, "error": None}


def test_past_its_timeout_a_tuning_starts_no_trial_lets_the_running_finish_and_resumes(tmp_path, monkeypatch):
    """With a deadline 1.5 s away and trials of 3 s, the two workers' first trials start and
    finish (complete, not failed), no other starts, and _drive says it stopped with work left;
    without one it then runs the rest: the references' seeds and exactly the search's budget."""
    from distributed import Client, LocalCluster
    from optuna.trial import TrialState
    monkeypatch.setattr(tune, "trial_task", _fake_trial)
    spec = load_tune(tune_file(tmp_path))
    tuning = Tuning(spec, str(tmp_path / "study.journal"), tmp_path)
    lines = []
    with LocalCluster(processes=False, n_workers=2, threads_per_worker=1, resources={"run": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        monkeypatch.setitem(FAKE, "seconds", 3.0)  # restored after the test
        assert tune._drive(client, tuning, lines.append, deadline=time.monotonic() + 1.5) is True
        trials = [t for s in tuning.studies.values() for t in s.get_trials(deepcopy=False)]
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 2  # the two started, none more, none failed
        assert any(line.startswith("timeout: no new trial starts") for line in lines)
        FAKE["seconds"] = 0.2
        assert tune._drive(client, tuning, lines.append) is False
    trials = [t for s in tuning.studies.values() for t in s.get_trials(deepcopy=False)]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len(tuning.trials(spec.settings[0], "vanilla")) == 3  # the budget, exactly
    assert tuning.next_job([]) is None


def test_a_tuning_out_of_time_before_it_starts_stops_with_status_3_and_says_how_to_go_on(tmp_path, capsys):
    code = main(["tune", str(tune_file(tmp_path)), "--outputs", str(tmp_path / "out"), "--workers", "1",
                 "--timeout", "0"])
    assert code == 3
    record = json.loads((tmp_path / "out" / "t" / "tune.json").read_text())
    assert record["status"] == "stopped" and not (tmp_path / "out" / "t" / "trials.csv").exists()
    assert "stopped by the timeout before the end of its search and re-scoring" in capsys.readouterr().out


def test_a_resumed_search_asks_new_points_not_its_first_ones_again(tmp_path):
    """The sampler is seeded from the trials its study holds: a search resumed after three trials
    does not start its random stream again (it did, and asked trials 0, 1, 2's values again). The
    same history still gives the same points (reproducible)."""
    spec = load_tune(tune_file(tmp_path, methods=["vanilla"], trials=6))

    def ask(tuning, n):
        asked = []
        for _ in range(n):
            job = tuning.next_job([])
            number, P = tuning.start(job)
            tuning.studies[job.study].tell(number, 80.0 + number)
            asked.append((round(P["temperature"], 9), round(P["alpha"], 9)))
        return asked

    first = ask(Tuning(spec, str(tmp_path / "a.journal")), 3)
    resumed = ask(Tuning(spec, str(tmp_path / "a.journal")), 3)
    assert len(set(first + resumed)) == 6
    again = ask(Tuning(spec, str(tmp_path / "b.journal")), 3) + ask(Tuning(spec, str(tmp_path / "b.journal")), 3)
    assert again == first + resumed


def test_the_search_table_and_the_answer_count_distinct_points_when_trials_repeated_values(tmp_path):
    from kdlib.analysis import tune_results as tune_analysis
    from kdlib.analysis.tune_results import TuneResults
    rows = [{"setting": "base", "method": "vanilla", "kind": "search", "trial": i, "state": state,
             "temperature": t, "alpha": 0.5, "val_acc": 85.0, "epochs": 15, "seconds": 60.0,
             "started": "2026-01-01T10:00:00", "ended": "2026-01-01T10:01:00"}
            for i, (state, t) in enumerate([("complete", 1.5), ("fail", 2.0), ("complete", 2.0), ("pruned", 1.5)])]
    spec = {"trials": 3, "methods": ["vanilla"], "space": {"vanilla": VANILLA}}
    res = TuneResults(tmp_path, spec, pd.DataFrame(rows), {}, None)
    assert tune_analysis.counts(res)["distinct points"].tolist() == [2]  # trial 3 asked trial 0's values; 1 failed
    assert tune_analysis._distinct(res).startswith(" (2 distinct points:")
    res.trials.loc[3, "temperature"] = 3.0
    assert tune_analysis._distinct(res) == ""


# ---- the pruner's fidelity, more test seeds, reused studies ----------------------------------------

def _journal_with_curves(path: Path, curves: dict) -> str:
    """A journal holding study 'base/vanilla' with one complete trial per curve (epoch -> value),
    and a fixed-value study 'base/vanilla/seeds' whose trial must be left out of the measure."""
    import optuna
    from optuna.distributions import FloatDistribution
    url = str(path)
    storage = tune.open_storage(url)
    dist = {"alpha": FloatDistribution(0.1, 10)}
    study = optuna.create_study(study_name="base/vanilla", storage=storage, direction="maximize")
    for i, curve in enumerate(curves.values()):
        study.add_trial(optuna.trial.create_trial(params={"alpha": 0.1 + i}, distributions=dist,
                                                  value=curve[max(curve)], intermediate_values=curve))
    seeds = optuna.create_study(study_name="base/vanilla/seeds", storage=storage, direction="maximize")
    seeds.add_trial(optuna.trial.create_trial(value=1.0, intermediate_values={1: 99.0, 2: 1.0}))
    return url


def test_pruner_fidelity_is_spearmans_rank_correlation_of_each_epoch_with_the_last(tmp_path):
    """Four trials over three epochs, built so that epoch 1 ranks them in reverse of the last
    (rho -1), epoch 2 in the same order but for one swap (rho 0.8 by 1 - 6 sum d^2 / (n (n^2 - 1))
    with d^2 = 2), and the last with itself 1; computed here by hand, not by scipy."""
    curves = {"a": {1: 40.0, 2: 10.0, 3: 10.0}, "b": {1: 30.0, 2: 30.0, 3: 20.0},
              "c": {1: 20.0, 2: 20.0, 3: 30.0}, "d": {1: 10.0, 2: 40.0, 3: 40.0}}
    url = _journal_with_curves(tmp_path / "study.journal", curves)
    frame = tune_analysis.epoch_curves(url)
    assert set(frame["method"]) == {"vanilla"} and len(frame) == 12  # the seeds study left out
    fid = tune_analysis.pruner_fidelity(frame).set_index("epoch")
    n = 4
    assert fid.loc[1, "rho"] == pytest.approx(-1.0)
    assert fid.loc[2, "rho"] == pytest.approx(1 - 6 * 2 / (n * (n ** 2 - 1)))
    assert fid.loc[3, "rho"] == pytest.approx(1.0) and (fid["trials"] == 4).all()
    assert tune_analysis.trusted_epoch(fid.reset_index()) == 2
    assert tune_analysis.trusted_epoch(fid.reset_index(), threshold=0.9) is None


def test_the_trusted_epoch_waits_for_every_method_and_ignores_unmeasured_ones():
    rows = [("a", "vanilla", 1, 0.9), ("a", "vanilla", 2, 0.5), ("a", "vanilla", 3, 0.85), ("a", "vanilla", 4, 1.0),
            ("a", "camkd", 1, 0.95), ("a", "camkd", 2, 0.95), ("a", "camkd", 3, 0.7), ("a", "camkd", 4, 1.0),
            ("b", "ebkd", 1, math.nan), ("b", "ebkd", 2, math.nan), ("b", "ebkd", 3, math.nan), ("b", "ebkd", 4, 1.0)]
    fid = pd.DataFrame(rows, columns=["setting", "method", "epoch", "rho"])
    assert tune_analysis.trusted_epoch(fid) is None  # epoch 3 fails camkd, and 4 is the last
    fid.loc[7, "rho"] = 0.9
    fid.loc[(fid["method"] == "camkd") & (fid["epoch"] == 3), "rho"] = 0.8  # exactly at the threshold: trusted
    assert tune_analysis.trusted_epoch(fid) == 3


def test_more_test_seeds_add_one_run_per_seed_and_keep_the_runs_of_the_tunings_seeds(tmp_path):
    spec = load_tune(tune_file(tmp_path, seeds=[0, 1], test_seeds=[0, 1, 2, 3]))
    choices = {"base": {"scratch": {"values": {}}, "vanilla": {"values": {"temperature": 2.0, "alpha": 0.5}}}}
    sweep = tune.test_sweep(spec, choices)
    assert sweep["seeds"] == [0, 1]
    names = [run_name(r) for r in sweep["runs"]]
    assert names == ["methods=scratch", "methods=vanilla,temperature=2,alpha=0.5",
                     "methods=scratch,seeds=2", "methods=vanilla,temperature=2,alpha=0.5,seeds=2",
                     "methods=scratch,seeds=3", "methods=vanilla,temperature=2,alpha=0.5,seeds=3"]
    assert tune.test_sweep(load_tune(tune_file(tmp_path, seeds=[0, 1])), choices)["runs"] == sweep["runs"][:2]


@pytest.mark.parametrize("reuse, words", [
    ({"from": "nowhere", "methods": ["scratch"]}, "reuse: from: nowhere holds no tuning"),
    ({"from": "EARLIER", "methods": ["ebkd"]}, "reuse: methods: 'ebkd' is not a method of both tunings"),
    ({"from": "EARLIER", "methods": ["vanilla"], "space": 1}, "reuse: give {from:"),
])
def test_a_bad_reuse_is_refused_in_one_line(tmp_path, reuse, words):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "study.journal").write_text("")
    (earlier / "tune.yaml").write_text(yaml.safe_dump(load_tune(tune_file(tmp_path)).as_dict()))
    reuse = {k: (str(earlier) if v == "EARLIER" else v) for k, v in reuse.items()}
    with pytest.raises(ParamsError, match=words.replace("{", r"\{").replace("(", r"\(")):
        load_tune(tune_file(tmp_path, reuse=reuse))


def test_a_method_searched_over_other_ranges_cannot_be_reused(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "study.journal").write_text("")
    (earlier / "tune.yaml").write_text(yaml.safe_dump(load_tune(tune_file(tmp_path)).as_dict()))
    wider = {"vanilla": dict(VANILLA, alpha={"low": 0.01, "high": 10, "log": True})}
    with pytest.raises(ParamsError, match="reuse: vanilla was searched over .* search it again"):
        load_tune(tune_file(tmp_path, space=wider, reuse={"from": str(earlier), "methods": ["vanilla"]}))
    spec = load_tune(tune_file(tmp_path, space=wider, reuse={"from": str(earlier), "methods": ["scratch"]}))
    assert spec.reuse["methods"] == ["scratch"] and spec.as_dict()["reuse"]["methods"] == ["scratch"]


def test_reused_studies_are_copied_once_with_their_trials_and_finished_test_runs(tmp_path):
    """The earlier tuning's scratch references and vanilla search come over trial for trial
    (values, states, seeds), once: a second start copies nothing; of its test runs only the
    finished ones of reused methods are copied."""
    import optuna
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    first = load_tune(tune_file(tmp_path, seeds=[0, 1]))
    (earlier / "tune.yaml").write_text(yaml.safe_dump(first.as_dict()))
    old = Tuning(first, str(earlier / "study.journal"))
    for seed, value in ((0, 80.0), (1, 81.0)):
        study = old.studies["base/scratch/seeds"]
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"seed": seed, "source": None}))
    for name, status in (("methods=scratch", "finished"), ("methods=scratch,seeds=2", "running")):
        (earlier / "test" / name).mkdir(parents=True)
        (earlier / "test" / name / "manifest.json").write_text(json.dumps({"status": status}))
    spec = load_tune(tune_file(tmp_path, seeds=[0, 1], test_seeds=[0, 1, 2],
                               reuse={"from": str(earlier), "methods": ["scratch"]}))
    url = str(tmp_path / "new" / "study.journal")
    (tmp_path / "new").mkdir()
    said = []
    assert tune.apply_reuse(spec, url, log=said.append) == 1
    assert said == [f"reuse: 1 study of scratch copied from {earlier}"]
    assert tune.apply_reuse(spec, url, log=said.append) == 0 and len(said) == 1
    new = Tuning(spec, url)
    assert new.seed_values(spec.settings[0], "scratch", None) == {0: 80.0, 1: 81.0}
    assert new.references_done(spec.settings[0]) and new.trials(spec.settings[0], "vanilla") == []
    choices = {"base": {"scratch": {"values": {}}, "vanilla": {"values": {"temperature": 2.0, "alpha": 0.5}}}}
    (tmp_path / "new" / "test.yaml").write_text(yaml.safe_dump(tune.test_sweep(spec, choices)))
    copied = tune.reuse_test_runs(spec, tmp_path / "new" / "test", log=lambda *a: None)
    assert copied == ["methods=scratch"] and (tmp_path / "new" / "test" / "methods=scratch" / "manifest.json").is_file()


def test_pooled_fidelity_is_the_weighted_mean_of_fishers_z_over_studies():
    fid = pd.DataFrame([("a", "vanilla", 2, 8, 0.5), ("b", "vanilla", 2, 13, 0.9), ("c", "vanilla", 2, 3, -1.0),
                        ("d", "vanilla", 2, 9, math.nan)], columns=["setting", "method", "epoch", "trials", "rho"])
    pooled = tune_analysis.pooled_fidelity(fid)
    z = (5 * math.atanh(0.5) + 10 * math.atanh(0.9)) / 15  # 3 trials weigh nothing, NaN is no measurement
    assert len(pooled) == 1 and pooled.loc[0, "rho"] == pytest.approx(math.tanh(z))
    assert pooled.loc[0, "studies"] == 2 and pooled.loc[0, "trials"] == 21


def test_an_unfinished_study_is_answered_by_the_one_it_replaces_and_says_so(tmp_path):
    """Until the study searched again has finished its test, its column is read from the study it
    replaces: the sentence says 'so far', the study's line says whom it stands in for, and the one
    that will replace it is named with how far it got (here: stopped, resumed by make studies)."""
    from conftest import write_tuning
    acc = {m: {0: 80.0 + d, 1: 82.0 + d, 2: 81.0 + d} for m, d in (("vanilla", 0.05), ("scratch", 0.0))}
    old = write_tuning(tmp_path / "old", acc, {"vanilla": {"temperature": 1.5, "alpha": 0.5}})
    new = tmp_path / "new"
    new.mkdir()
    (new / "tune.yaml").write_text((old / "tune.yaml").read_text())
    trials = pd.read_csv(old / "trials.csv")
    trials[trials["kind"] == "search"].head(1).to_csv(new / "trials.csv", index=False)
    (new / "tune.json").write_text(json.dumps({"status": "stopped"}))
    text = tune_analysis.block([new], earlier={new: old})
    assert text.startswith("**The answer so far** (1 of 1 settings read from an earlier study")
    assert "standing in for `new` until its test has finished" in text
    assert "searched again and tested over more seeds: `new` (stopped while searching, 1 of 3 trials; `make studies` " \
           "resumes it)" in text
    assert tune_analysis.block([new]).startswith("The tuned comparison is running")  # nothing to stand in
    # vanilla − scratch: +0.05 on every seed, an interval of width 0 above 0: ahead comes before level
    assert "1 of the 1 method-and-setting pairs with teachers are ahead of scratch" in text and "(1 ahead of 1)" in text


def test_the_answers_picture_gives_each_setting_its_seeds_and_each_difference_its_word():
    row = dict(anchor="scratch", p_value=0.01)
    diffs = pd.DataFrame([dict(row, setting="shipped", method="camkd", mean_diff=-0.13, ci_low=-0.21, ci_high=-0.05,
                               seeds=10, word="behind"),
                          dict(row, setting="shipped", method="label_smoothing", mean_diff=0.02, ci_low=-0.1,
                               ci_high=0.12, seeds=10, word="level"),
                          dict(row, setting="small student", method="camkd", mean_diff=0.3, ci_low=-0.4, ci_high=1.0,
                               seeds=3, word="undecided")])
    fig = tune_analysis.plot_answer(diffs)
    axes = fig.axes
    assert [ax.get_title(loc="left") for ax in axes] == ["shipped · 10 seeds", "small student · 3 seeds"]
    def words(ax):  # each method's word, matched by its row on the y axis
        names = {round(t.get_position()[1]): t.get_text() for t in ax.get_yticklabels()}
        return {names[round(t.xy[1])]: t.get_text() for t in ax.texts}
    assert words(axes[0]) == {"CAMKD": "behind", "label smoothing": "level"}
    assert words(axes[1]) == {"CAMKD": "undecided"}
    band = axes[0].patches[0]  # the shaded 'level' band spans ±0.2
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((-0.2, 0.2))
