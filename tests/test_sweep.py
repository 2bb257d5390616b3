"""Sweeps: expansion and validation, the analysis maths, teachers trained once, and
whole sweeps on Dask (an embedded LocalCluster, and a scheduler with workers started as
separate processes) on tiny real Fashion-MNIST subsets, with a failing run and a killed worker."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
import yaml
from scipy import stats as st

from kdlib.book import steps as book
from kdlib.publish import pages as report
from kdlib.fanout import sweep, tune
from kdlib.analysis import sweep_results as sweep_analysis
from kdlib.__main__ import main
from kdlib.train.data import DEBIAN_FASHION_MNIST
from kdlib.book.params import validate

ROOT = Path(__file__).resolve().parent.parent
TINY = {"base": str(ROOT / "params/smoke.yaml"), "train_subset": 300, "test_subset": 100,
        "teachers": ["teacher_cnn1", "teacher_resnet"], "teacher_epochs": 1, "student_epochs": 1, "seeds": [0]}


def write_sweep(folder: Path, name: str = "s", **keys) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, **keys}, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """KDBOOK_ROOT (data, teacher_dir) in a temporary folder; real Fashion-MNIST required."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return tmp_path


# ---------------------------------------------------------------- expansion, validation
def test_grid_and_runs_expand_to_named_validated_runs(tmp_path):
    path = write_sweep(tmp_path, grid={"beta": [10, 33.3], "teachers": [["teacher_cnn1", "teacher_resnet"],
                                                                        ["teacher_vgg", "teacher_resnet"]]},
                       runs=[{"methods": ["scratch"]}])
    base, runs = sweep.expand(path)
    assert base == TINY["base"]
    assert [r.name for r in runs] == ["beta=10,teachers=teacher_cnn1+teacher_resnet",
                                      "beta=10,teachers=teacher_vgg+teacher_resnet",
                                      "beta=33.3,teachers=teacher_cnn1+teacher_resnet",
                                      "beta=33.3,teachers=teacher_vgg+teacher_resnet", "methods=scratch"]
    assert runs[2].P["beta"] == 33.3 and runs[2].P["teachers"] == ["teacher_cnn1", "teacher_resnet"]
    assert runs[4].P["methods"] == ["scratch"] and runs[4].P["beta"] == 100.0  # the base's value
    assert all(r.P["train_subset"] == 300 and r.P["student_epochs"] == 1 for r in runs)  # fixed keys
    assert sweep.run_name({"lr": 1e-4, "augment": "crop flip", "compile": True}) == \
        "lr=0.0001,augment=crop_flip,compile=true"


def test_runs_only_sweep_has_exactly_its_runs_submitted_in_file_order(tmp_path):
    """Without a grid there is no extra 'base' run; the run tasks carry priorities that
    fall in the file's order (Dask starts the highest first), the teachers' above all."""
    path = write_sweep(tmp_path, runs=[{"student_epochs": 3}, {"beta": 10}, {"methods": ["scratch"]}])
    base, runs = sweep.expand(path)
    assert [r.name for r in runs] == ["student_epochs=3", "beta=10", "methods=scratch"]

    class Client:  # records what _submit asks of Dask
        def __init__(self):
            self.calls = []

        def submit(self, fn, *args, **kw):
            self.calls.append((fn.__name__, kw["priority"]))
            return fn.__name__

    client = Client()
    sweep._submit(client, base, runs, tmp_path / "sw")
    assert client.calls[0][0] == "teacher_task"  # one teacher set for all three
    priorities = [p for name, p in client.calls if name == "run_task"]
    assert len(priorities) == 3 and priorities == sorted(priorities, reverse=True)
    assert client.calls[0][1] > priorities[0]


def test_by_run_table_has_one_row_per_setting_with_paired_differences(tmp_path):
    """kdlib.publish.pages --by-run (the README's Regimes block): settings in the file's order, named
    after their runs, a setting split into one run per seed pooled into one row; accuracy
    CIs and the paired differences against scipy."""
    labels = np.arange(100) % 10
    acc = {"beta=5": {"camkd": [80.0, 84.0, 83.0], "vanilla": [79.0, 81.0, 82.0], "scratch": [70.0, 75.0, 71.0]},
           "beta=1": {"camkd": [60.0, 61.0, 62.0], "vanilla": [60.0, 62.0, 64.0], "scratch": [61.0, 61.0, 61.0]}}
    runs = []
    for setting, by_method in acc.items():
        beta = float(setting.split("=")[1])
        # beta=5: one run per seed (as regimes.yaml does for its long setting);
        # beta=1: one run per group of methods, all seeds each (methods=camkd, methods=vanilla+scratch)
        parts = [(f"{setting},seeds={s}", [s], list(by_method)) for s in range(3)] if beta == 5 else \
            [(f"{setting},methods={'+'.join(m)}", [0, 1, 2], m) for m in (["camkd"], ["vanilla", "scratch"])]
        for name, seeds, methods in parts:
            runs.append({"name": name, "overrides": {"beta": beta, "seeds": seeds, "methods": methods}})
            run = tmp_path / name
            run.mkdir()
            (run / "params.yaml").write_text(yaml.safe_dump(validate({"beta": beta, "seeds": seeds,
                                                                       "methods": methods})))
            (run / "manifest.json").write_text(json.dumps({"status": "finished"}))
            preds = {"labels": labels}
            for method, values in ((m, by_method[m]) for m in methods):
                (run / f"metrics_{method}.json").write_text(json.dumps({"method": method, "eval_split": "test", "runs": [
                    {"seed": s, "test_acc": values[s], "fidelity": {"centroid_fidelity": 0.1}} for s in seeds]}))
                for s in seeds:
                    preds[f"{method}/seed{s}"] = np.where(np.arange(100) < round(values[s]), labels, (labels + 1) % 10)
            np.savez(run / "predictions.npz", **preds)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))
    res = sweep_analysis.load(tmp_path)
    table = sweep_analysis.run_table(res).set_index("setting")
    assert list(table.index) == ["beta=5", "beta=1"]  # the file's order, not sorted
    a = acc["beta=5"]
    low, high = st.t.interval(0.95, 2, loc=np.mean(a["scratch"]), scale=st.sem(a["scratch"]))
    nbsp = sweep_analysis.NBSP  # a number and its interval on one line
    assert table.loc["beta=5", "scratch accuracy %"] == f"{np.mean(a['scratch']):.2f}<br>" + f"({low:.2f} to {high:.2f})".replace(" ", nbsp)
    ref = st.ttest_rel(a["vanilla"], a["scratch"])
    ci = ref.confidence_interval()
    # Holm over the pairs the table reads (3 per setting, 6 in all), stepped down by hand
    shown = sorted(st.ttest_rel(acc[s][x], acc[s][y]).pvalue for s in acc
                   for x, y in (("camkd", "vanilla"), ("camkd", "scratch"), ("vanilla", "scratch")))
    rank = shown.index(ref.pvalue)
    holm = max(min(1, (6 - k) * shown[k]) for k in range(rank + 1))
    star = " *" if holm < 0.05 else ""
    assert table.loc["beta=5", "vanilla − scratch"] == (f"{np.mean(a['vanilla']) - np.mean(a['scratch']):+.2f} "
                                                       f"({ci.low:+.2f} to {ci.high:+.2f}){star}").replace(" ", nbsp) \
        .replace(nbsp + "(", "<br>(") + "<br>ahead"  # the interval and the word on lines of their own
    b = acc["beta=1"]
    assert table.loc["beta=1", "CAMKD − vanilla"].startswith(f"{np.mean(b['camkd']) - np.mean(b['vanilla']):+.2f}<br>(")
    assert not table.loc["beta=1", "CAMKD − vanilla"].endswith("*")  # -1, +1, -2... not significant
    text = sweep_analysis.run_markdown(tmp_path)
    assert sweep_analysis.setting_label("augment=crop,seeds=2,beta=5") == "augment=crop,beta=5"
    assert sweep_analysis.setting_label("methods=camkd,beta=1,seeds=0") == "beta=1"
    assert list(table["seeds"]) == [3, 3]
    assert "|  | `beta=5` | `beta=1` |" in text  # one column per setting, in the file's order: it fits the page
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:6] == ["seeds", "CAMKD accuracy %", "vanilla accuracy %", "scratch accuracy %", "vanilla − scratch"]
    assert "| seeds | 3 | 3 |" in text and "- `beta=5`: vanilla vs scratch: " in text
    (tmp_path / "sweep.json").write_text("{}")  # what marks a sweep folder for kdlib.publish.pages
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- regimes:start -->\nold\n<!-- regimes:end -->\nrest\n")
    report.main([str(tmp_path), "--by-run", "--readme", str(readme), "--block", "regimes"])
    assert readme.read_text() == f"intro\n<!-- regimes:start -->\n{text}\n<!-- regimes:end -->\nrest\n"


@pytest.mark.parametrize("keys,words", [
    ({"grid": {"bta": [1, 2]}}, ["run bta=1", "unknown key 'bta'", "did you mean 'beta'"]),
    ({"grid": {"lr": [0.001, float("nan")]}}, ["run lr=nan", "lr", "finite"]),
    ({"runs": [{"train_subset": 1000000}]}, ["run train_subset=1000000", "train_subset", "60000 images"]),
    ({"grid": {"beta": []}}, ["grid must map each key to a non-empty list"]),
    ({"grid": {"threads": [1, 2]}}, ["'threads' cannot be set in a sweep", "--workers"]),
    ({"runs": [{"beta": 10}, {"beta": 10.0}]}, ["both get the folder name 'beta=10'"]),
])
def test_bad_sweep_refused_before_any_folder_exists(tmp_path, capsys, keys, words):
    path = write_sweep(tmp_path, **keys)
    outputs = tmp_path / "outputs"
    assert main(["sweep", str(path), "--outputs", str(outputs)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    for word in words:
        assert word in err, (word, err)
    assert not outputs.exists()


@pytest.mark.parametrize("module, record, runner", [(sweep, "sweep.json", "run_sweep"), (tune, "tune.json", "run_tune")])
def test_ensure_runs_the_file_only_into_a_folder_without_a_record(tmp_path, monkeypatch, module, record, runner):
    """What 04 and 05 do when opened: a relative folder is found under the project root; with no
    record in it the file runs into that folder (outputs = its parent, name = its name) without
    the notebook inside (the caller is that notebook); with a record nothing runs."""
    monkeypatch.setenv("KDBOOK_ROOT", str(tmp_path))
    calls = []
    monkeypatch.setattr(module, runner, lambda f, **kw: calls.append((f, kw)))
    folder = module.ensure("outputs/x", "params/some.yaml")
    assert folder == tmp_path / "outputs" / "x"
    assert calls == [("params/some.yaml", {"outputs": tmp_path / "outputs", "name": "x", "analysis": False})]
    folder.mkdir(parents=True)
    (folder / record).write_text("{}")
    assert module.ensure(str(folder), "params/some.yaml") == folder and len(calls) == 1


def test_teacher_key_groups_runs_by_teacher_settings(tmp_path):
    path = write_sweep(tmp_path, grid={"beta": [10, 100], "teacher_epochs": [1, 2]})
    keys = {r.name: sweep.teacher_key(r.P) for r in sweep.expand(path)[1]}
    assert keys["beta=10,teacher_epochs=1"] == keys["beta=100,teacher_epochs=1"]  # students' keys: same teachers
    assert keys["beta=10,teacher_epochs=1"] != keys["beta=10,teacher_epochs=2"]
    assert [Path(p).name.split("-")[0] for p in keys["beta=10,teacher_epochs=1"]] == TINY["teachers"]


# ---------------------------------------------------------------- analysis maths
def fake_sweep(folder: Path, acc: dict, unfinished: str | None = None) -> None:
    """A sweep folder of finished records: acc[(beta, seed)] = {method: accuracy}, one run per
    (beta, seed); predictions right on the first round(acc) of 100 labels."""
    runs = []
    labels = np.arange(100) % 10
    for (beta, seed), by_method in acc.items():
        name = f"beta={beta},seeds={seed}"
        runs.append({"name": name, "overrides": {"beta": beta, "seeds": [seed]}})
        run = folder / name
        run.mkdir(parents=True)
        P = validate({"beta": beta, "seeds": [seed], "methods": list(by_method)})
        (run / "params.yaml").write_text(yaml.safe_dump(P))
        (run / "manifest.json").write_text(json.dumps({"status": "running" if name == unfinished else "finished"}))
        preds = {"labels": labels}
        for method, a in by_method.items():
            (run / f"metrics_{method}.json").write_text(json.dumps({"method": method, "eval_split": "test", "runs": [
                {"seed": seed, "test_acc": a, "fidelity": {"centroid_fidelity": a / 1000}}]}))
            preds[f"{method}/seed{seed}"] = np.where(np.arange(100) < round(a), labels, (labels + 1) % 10)
        np.savez(run / "predictions.npz", **preds)
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))


def test_analysis_pools_seeds_per_setting_and_pairs_them(tmp_path):
    camkd = {0: 80.0, 1: 84.0, 2: 83.0}
    vanilla = {0: 79.0, 1: 81.0, 2: 82.0}
    acc = {(beta, s): {"vanilla": vanilla[s] + beta, "camkd": camkd[s] + beta} for beta in (1, 5) for s in camkd}
    acc[(9, 0)] = {"camkd": 50.0, "vanilla": 50.0}
    fake_sweep(tmp_path, acc, unfinished="beta=9,seeds=0")
    res = sweep_analysis.load(tmp_path)
    assert res.keys == ["beta"] and res.skipped == ["beta=9,seeds=0"]
    table = sweep_analysis.setting_table(res).set_index(["beta", "method", "metric"])
    row = table.loc[(5.0, "camkd", "accuracy")]
    values = [camkd[s] + 5 for s in camkd]
    low, high = st.t.interval(0.95, 2, loc=np.mean(values), scale=st.sem(values))
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(values))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert table.loc[(1.0, "vanilla", "centroid_fidelity")]["mean"] == pytest.approx(np.mean(list(vanilla.values())) / 1000 + 0.001)
    diffs = sweep_analysis.differences(res).set_index(["beta", "pair"])
    d = diffs.loc[(1.0, "camkd - vanilla")]  # camkd listed second in the runs, still camkd - vanilla
    ref = st.ttest_rel([camkd[s] + 1 for s in camkd], [vanilla[s] + 1 for s in camkd])
    assert d["seeds"] == 3 and d["mean_diff"] == pytest.approx(5 / 3)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(tuple(ref.confidence_interval()))
    assert d["p_value"] == pytest.approx(ref.pvalue)
    assert (d["only_a_correct"], d["only_b_correct"]) == (5, 0)  # 1 + 3 + 1 images over the seeds
    assert d["verdict"].startswith("CAMKD vs vanilla: +1.67 points")
    wide = sweep_analysis.wide_table(sweep_analysis.setting_table(res), res.keys)
    assert list(wide.index) == [1.0, 5.0] and list(wide["seeds"]) == [3, 3]
    assert wide.loc[5.0, "CAMKD accuracy %"] == f"{np.mean(values):.2f}<br>" + f"({low:.2f} to {high:.2f})".replace(" ", sweep_analysis.NBSP)
    text = sweep_analysis.markdown(tmp_path)  # the README block kdlib.publish.pages writes
    assert "| beta | seeds | CAMKD accuracy % | CAMKD KL(C‖S) | vanilla accuracy % |" in text
    assert "- beta=1: CAMKD vs vanilla: +1.67 points" in text and "left out): beta=9,seeds=0" in text


# ---------------------------------------------------------------- teachers once
RACER = """
import sys, time
from pathlib import Path
from kdlib.book import steps as book
from kdlib.book.params import validate
P = validate({"train_subset": 300, "test_subset": 100, "teachers": ["teacher_resnet"], "methods": ["vanilla"], "teacher_epochs": 2,
              "teacher_dir": sys.argv[1], "run_dir": sys.argv[2], "threads": 1})
data = book.load_data(P)
Path(sys.argv[2]).mkdir()
while not Path(sys.argv[3]).exists():  # both start training together
    time.sleep(0.01)
book.train_teachers(P, data, log=print)
"""


def test_two_racing_runs_train_one_teacher_setting_once(project):
    script, go = project / "racer.py", project / "go"
    script.write_text(RACER)
    env = dict(os.environ, KDBOOK_PROGRESS="off")
    procs = [subprocess.Popen([sys.executable, str(script), str(project / "teachers"), str(project / f"run{i}"),
                               str(go)], stdout=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    time.sleep(1)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted("reusing finished checkpoint" in out for out in outs) == [False, True], outs
    records = [json.loads((project / f"run{i}" / "teachers.json").read_text())["teachers"][0] for i in (0, 1)]
    assert records[0]["sha256"] == records[1]["sha256"] and records[0]["checkpoint"] == records[1]["checkpoint"]
    P = validate({"train_subset": 300, "test_subset": 100, "teachers": ["teacher_resnet"], "methods": ["vanilla"], "teacher_epochs": 2,
                  "teacher_dir": str(project / "teachers")})
    [key] = sweep.teacher_key(P)                     # the sweep groups by the path training writes
    assert book.display_path(key) == records[0]["checkpoint"]


# ---------------------------------------------------------------- whole sweeps
def executed_cleanly(path: Path) -> str:
    """The printed text of an executed notebook that raised nothing and has its HTML."""
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs), path
    assert path.with_suffix(".html").stat().st_size > 10_000
    return "".join(o.get("text", "") for o in outputs)


@pytest.mark.slow
def test_two_run_sweep_on_a_two_worker_local_cluster(project, capsys):
    """A grid of two runs on a local two-worker cluster, end to end: every run's three
    notebooks, one teacher set trained once for both, 04 executed, the README block, a
    second start refused, --resume skipping finished runs; then 04 under nbval reads it as
    its default sweep (outputs/smoke-beta under the project root). (Seeds pooled over the runs
    of a setting: ``test_analysis_pools_seeds_per_setting_and_pairs_them``.)"""
    path = write_sweep(project, "smoke-beta", methods=["camkd", "vanilla", "scratch"], grid={"beta": [10, 100]})
    outputs = project / "outputs"
    assert main(["sweep", str(path), "--workers", "2", "--outputs", str(outputs)]) == 0
    out = capsys.readouterr().out
    assert "dashboard: http" in out and "[2/2]" in out and "2 of 2 runs finished" in out
    folder = outputs / "smoke-beta"
    record = json.loads((folder / "sweep.json").read_text())
    assert record["status"] == "finished" and len(record["runs"]) == 2
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    for name, run in record["runs"].items():
        assert run["status"] == "finished" and run["worker"].startswith("tcp://") and run["seconds"] > 0
        manifest = json.loads((folder / name / "manifest.json").read_text())
        assert manifest["status"] == "finished" and len(manifest["notebooks"]) == 3
        assert yaml.safe_load((folder / name / "params.yaml").read_text())["threads"] == threads
        assert {(folder / name / f"metrics_{m}.json").is_file() for m in ("camkd", "vanilla", "scratch")} == {True}
    assert len(list((folder / "_teachers").iterdir())) == 1  # one teacher set, trained once for both runs
    hashes = {json.dumps(json.loads((folder / n / "manifest.json").read_text())["teacher_checkpoints"])
              for n in record["runs"]}
    assert len(hashes) == 1
    assert "2 finished runs; keys that vary: beta;" in executed_cleanly(folder / "04_sweep_analysis.ipynb")
    summary = sweep_analysis.setting_table(sweep_analysis.load(folder))
    assert len(summary) == 2 * 3 * 2 and set(summary["n"]) == {1}  # 2 settings x 3 methods x 2 metrics, one seed
    for png in ("sweep_accuracy.png", "sweep_fidelity.png"):
        assert (folder / png).read_bytes()[:4] == b"\x89PNG"
    for text in ((folder / "sweep.json").read_text(), (folder / "sweep.yaml").read_text()):
        assert str(project) not in text and "&id" not in text  # portable, readable
    from kdlib.publish.pages import main as report
    readme = project / "README.md"
    readme.write_text("<!-- tuning:start -->\nold\n<!-- tuning:end -->\n")
    report([str(folder), "--readme", str(readme), "--block", "tuning"])
    assert "| beta | seeds | CAMKD accuracy % |" in readme.read_text() and "old" not in readme.read_text()
    # a second start is refused; --resume skips the finished runs and leaves them alone
    assert main(["sweep", str(path), "--outputs", str(outputs)]) == 1
    assert "--resume" in capsys.readouterr().err
    before = {n: (folder / n / "manifest.json").stat().st_mtime_ns for n in record["runs"]}
    assert main(["sweep", str(path), "--outputs", str(outputs), "--resume"]) == 0
    assert "2 run(s) finished earlier, skipped" in capsys.readouterr().out
    assert before == {n: (folder / n / "manifest.json").stat().st_mtime_ns for n in record["runs"]}
    resumed = json.loads((folder / "sweep.json").read_text())
    assert resumed["earlier"] == [{k: record[k] for k in ("started", "ended", "status")}]  # the first session kept
    (folder / "sweep_forest.png").unlink()
    nbval = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "notebooks/04_sweep_analysis.ipynb",
                            "-p", "no:cacheprovider", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert nbval.returncode == 0, nbval.stdout[-3000:]
    assert (folder / "sweep_forest.png").read_bytes()[:4] == b"\x89PNG"  # drawn again, by the notebook under nbval


@pytest.fixture
def external_cluster(project):
    """``dask scheduler`` and two ``dask worker`` processes (one run, one thread each), torn down after."""
    scheduler_file = project / "scheduler.json"
    env = dict(os.environ, KDBOOK_PROGRESS="off")
    procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(scheduler_file)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for i in (1, 2):
            procs.append(subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                                           "--resources", "run=1", "--name", f"w{i}", "--no-dashboard"],
                                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client
        with Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_sweep_on_a_separate_scheduler_survives_a_failing_run_and_a_killed_worker(project, external_cluster):
    """Against ``--scheduler``: the diverging-lr run fails alone (non-zero exit, named in the
    summary); a worker killed after its run's first epoch checkpoint is replaced and the run
    resumes from that checkpoint; the others finish and 04 is executed."""
    path = write_sweep(project, "ext", teachers=["teacher_cnn1"], methods=["vanilla", "scratch"], student_epochs=2,
                       runs=[{"alpha": 0.5}, {"lr": 1e6}])
    outputs = project / "outputs"
    proc = subprocess.Popen([sys.executable, "-m", "kdlib", "sweep", str(path), "--scheduler", external_cluster,
                             "--outputs", str(outputs)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    folder = outputs / "ext"
    try:
        deadline = time.time() + 400
        while not (folder / "alpha=0.5" / "student_vanilla_seed0.pt").exists():  # written after its first epoch
            assert time.time() < deadline and proc.poll() is None, "the run never checkpointed"
            time.sleep(0.05)
        worker = json.loads((folder / "sweep.json").read_text())["runs"]["alpha=0.5"]["worker"]
        from distributed import Client
        with Client(external_cluster) as client:
            pid = client.run(os.getpid)[worker]
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "sweep failed: 1 of 2 runs finished" in err and "failed: lr=1e+06: teachers: NonFiniteLossError" in err
    record = json.loads((folder / "sweep.json").read_text())
    assert {n: r["status"] for n, r in record["runs"].items()} == {"alpha=0.5": "finished", "lr=1e+06": "failed"}
    assert not (folder / "lr=1e+06").exists()  # its teachers failed: no run was started for it
    manifest = json.loads((folder / "alpha=0.5" / "manifest.json").read_text())
    first, second = manifest["attempts"]
    assert "status" not in first and second["resumed"] and second["status"] == "finished"
    text = executed_cleanly(folder / "alpha=0.5" / "02_distill_students.ipynb")
    assert "resuming from epoch" in text or "reusing finished checkpoint" in text
    assert "left out: lr=1e+06" in executed_cleanly(folder / "04_sweep_analysis.ipynb")


def _fake_run(name: str, sweep_dir: str) -> dict:
    """A run of three seconds that says it started, as run_task does (no training)."""
    from distributed import get_worker
    get_worker().log_event(sweep.STARTED, {"sweep": sweep_dir, "run": name, "worker": "w"})
    time.sleep(3.0)
    return {"status": "finished", "error": None, "worker": "w", "seconds": 3.0}


def test_past_its_timeout_a_sweep_starts_no_run_and_leaves_the_rest_pending(tmp_path):
    """One worker, three runs of 3 s, a deadline 1.5 s away: the first run finishes, the two
    no worker started are cancelled and stay pending in sweep.json (for --resume), and the
    sweep says so; the summary counts only the finished run."""
    from distributed import Client, LocalCluster
    names = ["a", "b", "c"]
    record = sweep.Record(tmp_path, {"sweep": "s.yaml"}, names)
    lines = []
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, resources={"run": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        started = sweep._started(client)
        futures = {n: client.submit(_fake_run, n, str(tmp_path), resources={"run": 1}, pure=False,
                                    priority=3 - i) for i, n in enumerate(names)}
        sweep._watch(client, futures, record, tmp_path, lines.append, deadline=time.monotonic() + 1.5,
                     started=started)
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [runs[n]["status"] for n in names] == ["finished", "pending", "pending"]
    assert "timeout: 2 run(s) not started are left for --resume; waiting for the 1 running" in lines, lines
    assert sweep.summary(dict(record.data, status="stopped")) == \
        "sweep stopped: 1 of 3 runs finished; continue with --resume"


def test_an_attempt_still_running_when_the_next_starts_is_kept_as_interrupted(tmp_path):
    """No record says 'running' for an attempt that was killed: a resumed sweep keeps it as 'interrupted'."""
    from kdlib.fanout.sweep import Record
    (tmp_path / "sweep.json").write_text(json.dumps({"status": "running", "started": "2026-01-01T00:00:00+00:00",
                                                     "ended": None, "runs": {}}))
    record = Record(tmp_path, {"sweep": "s.yaml"}, ["a"])
    assert record.data["earlier"] == [{"started": "2026-01-01T00:00:00+00:00", "ended": None,
                                       "status": "interrupted"}]
    assert record.data["status"] == "running" and record.data["runs"]["a"]["status"] == "pending"
