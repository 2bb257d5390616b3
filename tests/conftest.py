"""Shared test helpers and the isolation every test gets."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from kdlib.train.data import DEBIAN_FASHION_MNIST, load_dataset
from kdlib.book.params import student_identity, teacher_identity, validate


def pytest_configure(config):
    """Under pytest-xdist, each worker's own torch work uses its share of the cores (one of two
    with two workers): the tests that train in the worker's process then do not run two
    threads each on two cores and crowd each other out. What a test starts (a run, a cluster)
    still sees every core, as it would on its own."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(max(1, torch.get_num_threads() // count))


# The longest test files (whole runs, sweeps, a tuning, the site in Chromium), longest first.
LONGEST_FIRST = ["test_tune.py", "test_runner.py", "test_sweep.py", "test_site.py", "test_cache.py", "test_train.py",
                 "test_bench.py", "test_transfer.py"]


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the rest in their order: ``make test`` hands whole files to
    its workers in this order (``--dist loadfile --no-loadscope-reorder``), so the short files
    fill in at the end instead of one long file running alone after the others are done."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order kept


@pytest.fixture(scope="session", autouse=True)
def project_root(tmp_path_factory):
    """No test reads or writes the repository's checkpoints/, data/ or outputs/: relative
    params paths (and the notebooks' kernels, which inherit the environment) resolve
    under a temporary folder. Session-wide, so module fixtures see it too."""
    root = tmp_path_factory.mktemp("project")
    old = os.environ.get("KDBOOK_ROOT")
    os.environ["KDBOOK_ROOT"] = str(root)
    yield root
    if old is None:
        os.environ.pop("KDBOOK_ROOT", None)
    else:
        os.environ["KDBOOK_ROOT"] = old


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test leaves the thread count and the environment as it found them."""
    threads, env = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("KDBOOK_CHROMIUM", "/usr/bin/chromium")  # Debian's chromium (apt-get install chromium)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def chromium_missing() -> str | None:
    """Why no browser test can run here (naming the fix), or None."""
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM}: apt-get install chromium (or set KDBOOK_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright missing: pip install -e '.[test]'"
    return None


@contextmanager
def chromium():
    """Debian's chromium driven by Playwright, for the tests of what a reader sees; a skip
    naming the fix where it or Playwright is missing."""
    why = chromium_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b
SMOKE_SIZE = ["-p", "train_subset=500", "-p", "test_subset=250"]


def fashion_mnist_subset(tmp_path_factory, train_subset: int, test_subset: int):
    """A real Fashion-MNIST subset from Debian's package (staged into a temporary folder,
    never downloaded), or a skip naming the fix."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_dataset("FashionMNIST", tmp_path_factory.mktemp("fmnist"), train_subset=train_subset,
                        test_subset=test_subset, download=False)


def teacher_id(name: str, **params) -> dict:
    """A teacher's identity under the given params (defaults for the rest)."""
    return teacher_identity(validate(params), name)


def student_id(method: str, seed: int = 0, **params) -> dict:
    """A student's identity under the given params, with made-up teacher hashes."""
    P = validate(params)
    return student_identity(P, method, seed, {n: f"sha-{n}" for n in P["teachers"]})
@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The whole book through ``python -m kdlib run params/smoke.yaml`` on a small real
    Fashion-MNIST subset (SMOKE_SIZE: 500/250 images; the file's 2 teacher and student
    epochs, 3 teachers, 3 methods, seeds 0 and 1), in a project root of its own
    (``KDBOOK_ROOT``), run once for every test that reads a whole book's record:
    ``(run folder, project root, what the terminal showed: stdout and stderr as one stream)``."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    project = tmp_path_factory.mktemp("project")
    env = dict(os.environ, KDBOOK_ROOT=str(project),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "kdlib", "run", "params/smoke.yaml",
                           "--outputs", str(project / "outputs"), *SMOKE_SIZE], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return project / "outputs" / "smoke", project, proc.stdout


# ---------------------------------------------------------------- small made-up records
def tiny_notebook(path: Path, title: str, images: list[bytes]) -> Path:
    """An executed notebook as papermill leaves one, made up: a heading with some maths, and
    one code cell showing each of ``images`` (PNG bytes) as its output."""
    import base64

    import nbformat
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {title}\n\nThe paired difference $d_s = a_s - b_s$ over seeds.")]
    for k, png in enumerate(images):
        cell = nbformat.v4.new_code_cell("display(figure)", execution_count=k + 1)
        cell.outputs = [nbformat.v4.new_output("display_data", data={
            "image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"})]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def png(seed: int) -> bytes:
    """A small PNG whose bytes depend on ``seed``."""
    from matplotlib.figure import Figure
    import io
    fig = Figure(figsize=(2, 1.5))
    fig.subplots().plot([0, 1, 2], [seed, seed + 1, seed % 3])
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=40)
    return out.getvalue()


def write_run(run: Path, overrides: dict, acc: dict, notebooks: bool = False) -> Path:
    """A finished run's record as ``kdlib.book.steps`` writes it, made up: ``acc`` = {method: {seed:
    accuracy}}; each method's predictions right on the first round(accuracy) of 100 labels;
    results.csv and comparison.csv from ``kdlib.analysis.stats``; with ``notebooks``, its three small executed
    notebooks (the second shows the run's figure, also written beside them)."""
    import json

    import numpy as np
    import yaml

    from kdlib.analysis.stats import comparison_frame, results_frame
    P = validate(dict(overrides))
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(yaml.safe_dump(P))
    (run / "manifest.json").write_text(json.dumps({
        "status": "finished", "params_file": "params/fashionmnist.yaml", "overrides": [],
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "device": {"device": "cpu", "processor": "a test CPU", "threads": 2},
        "created": "2025-01-01T10:00:00+00:00", "ended": "2025-01-01T10:05:00+00:00", "seconds": 300.0}))
    teachers = {"teachers": [{"name": t, "test_acc": 90.0 + i - 30.0 * (t in (P["teacher_class_swap"] or {})),
                              "params": 1000 * (i + 1)} for i, t in enumerate(P["teachers"])]}
    (run / "teachers.json").write_text(json.dumps(teachers))
    labels = np.arange(100) % 10
    metrics, preds = {}, {"labels": labels}
    for method, by_seed in acc.items():
        metrics[method] = {"method": method, "eval_split": "test", "student_params": 1234, "teachers": P["teachers"],
                           "runs": [{"seed": s, "test_acc": a, "history": [],
                                     "fidelity": {"centroid_fidelity": 0.1, "mean_individual_fidelity": 0.2,
                                                  "centroid_agreement": 90.0}} for s, a in by_seed.items()]}
        (run / f"metrics_{method}.json").write_text(json.dumps(metrics[method]))
        for s, a in by_seed.items():
            preds[f"{method}/seed{s}"] = np.where(np.arange(100) < round(a), labels, (labels + 1) % 10)
    np.savez(run / "predictions.npz", **preds)
    results_frame(teachers, metrics).to_csv(run / "results.csv", index=False)
    comparison_frame(metrics, preds).to_csv(run / "comparison.csv", index=False)
    if notebooks:
        figure = png(len(run.name))
        (run / "comparison_camkd_vs_vanilla.png").write_bytes(figure)
        tiny_notebook(run / "01_train_teachers.ipynb", "01 · Teachers", [png(1)])
        tiny_notebook(run / "02_distill_students.ipynb", "02 · Students", [figure, png(2)])
        tiny_notebook(run / "03_fidelity_analysis.ipynb", "03 · Fidelity", [png(3)])
    return run


def write_sweep(folder: Path, runs: list[tuple[dict, dict]], notebooks: bool = False,
                sweep_file: str = "params/sweeps/made-up.yaml") -> Path:
    """A finished sweep folder, made up: ``runs`` = [(overrides, acc)] (``write_run``), each
    run named as ``kdlib.fanout.sweep`` names it; ``sweep.yaml``, ``sweep.json``; with ``notebooks``,
    its runs' notebooks and what 04 writes (summary and difference CSVs, the forest plot, a
    small 04 notebook showing it)."""
    import json

    import yaml

    from kdlib.records.names import run_name
    order = []
    for overrides, acc in runs:
        name = run_name(overrides)
        write_run(folder / name, overrides, acc, notebooks)
        order.append({"name": name, "overrides": overrides})
    (folder / "sweep.yaml").write_text(yaml.safe_dump({"sweep": sweep_file, "base": "params/fashionmnist.yaml",
                                                       "runs": order}, sort_keys=False))
    (folder / "sweep.json").write_text(json.dumps({
        "sweep": sweep_file, "base": "params/fashionmnist.yaml", "status": "finished",
        "cluster": "embedded LocalCluster, 2 workers", "started": "2025-01-01T10:00:00+00:00",
        "runs": {r["name"]: {"status": "finished", "seconds": 120.0} for r in order}}))
    if notebooks:
        from kdlib.analysis import plots, sweep_results as sweep_analysis
        res = sweep_analysis.load(folder)
        sweep_analysis.setting_table(res).to_csv(folder / "sweep_summary.csv", index=False)
        sweep_analysis.differences(res).to_csv(folder / "sweep_differences.csv", index=False)
        plots.save(plots.plot_forest(res), folder / "sweep_forest.png")
        tiny_notebook(folder / "04_sweep_analysis.ipynb", "04 · Sweep analysis",
                      [(folder / "sweep_forest.png").read_bytes()])
    return folder


def write_tuning(folder: Path, acc: dict, values: dict, setting: dict | None = None) -> Path:
    """A finished tuning folder as ``kdlib tune`` leaves one, made up: ``acc`` = {method: {seed:
    test accuracy}} of its test sweep (``write_sweep``, one run per method at its chosen
    ``values`` = {method: {knob: value}}), ``tune.yaml``, ``tune.json``, ``best.yaml``, a
    ``trials.csv`` of three search trials per tuned method and the reference's seeds, the
    forest plot, and a small executed 05."""
    import json

    import pandas as pd
    import yaml

    from kdlib.analysis import plots, sweep_results as sweep_analysis
    setting = setting if setting is not None else {"student_width": 0.25}
    name = ",".join(f"{k}={v}" for k, v in setting.items()) or "base"
    seeds = sorted({s for by_seed in acc.values() for s in by_seed})
    knobs = {"vanilla": ["temperature", "alpha"], "camkd": ["temperature", "alpha", "beta"],
             "ebkd": ["temperature", "alpha"], "label_smoothing": ["label_smoothing"]}
    space = {m: {k: {"low": 0.1, "high": 10.0, "log": True} for k in knobs[m]} for m in acc if m in knobs}
    write_sweep(folder / "test", [({**setting, "methods": [m], **values.get(m, {}), "seeds": seeds}, {m: by_seed})
                                  for m, by_seed in acc.items()], notebooks=True,
                sweep_file=f"outputs/{folder.name}/test.yaml")
    folder.joinpath("tune.yaml").write_text(yaml.safe_dump({
        "tune": f"params/tune/{folder.name}.yaml", "base": "params/fashionmnist_tune.yaml", "settings": [setting],
        "methods": list(acc), "trials": 3, "space": space, "seeds": seeds, "sampler_seed": 0,
        "pruner": {"startup_trials": 5, "warmup_epochs": 2}, "rescore": 3}, sort_keys=False))
    folder.joinpath("tune.json").write_text(json.dumps({
        "tune": f"params/tune/{folder.name}.yaml", "base": "params/fashionmnist_tune.yaml",
        "storage": f"outputs/{folder.name}/study.journal", "cluster": "embedded LocalCluster",
        "status": "finished", "test": "finished", "started": "2025-01-01T10:00:00+00:00",
        "ended": "2025-01-01T20:00:00+00:00"}))
    folder.joinpath("best.yaml").write_text(yaml.safe_dump({name: {"setting": setting, "in words": "small student",
        "methods": {m: {"values": values.get(m, {}), "val_acc": 85.0, "chosen": "best trial" if m in space else
                        "no search: its seeds", "val_seeds": 1 if m in space else len(seeds)} for m in acc}}},
        sort_keys=False))
    rows = []
    for m in acc:
        for t in range(3 if m in space else len(seeds)):
            rows.append({"setting": name, "method": m, "kind": "search" if m in space else "reference", "trial": t,
                         "seed": None if m in space else seeds[t], "state": "pruned" if t == 2 and m in space
                         else "complete", **{k: 1.0 + t for k in knobs.get(m, [])}, "val_acc": 84.0 + t,
                         "epochs": 15, "seconds": 600.0, "started": f"2025-01-01T1{t}:00:00",
                         "ended": f"2025-01-01T1{t}:10:00"})
    pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
    plots.save(plots.plot_forest(sweep_analysis.load(folder / "test"), title="each method at its best"),
               folder / "tune_forest.png")
    tiny_notebook(folder / "05_tune.ipynb", "05 · Each method at its best", [(folder / "tune_forest.png").read_bytes()])
    return folder
