"""The runner end to end on real Fashion-MNIST (params/smoke.yaml), and its failure modes."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from conftest import ROOT, SMOKE_SIZE
# the browser fixtures: here, so the smoke book's HTML is read on the worker (pytest-xdist) that made it
from conftest import chromium_missing
from test_browser import page  # noqa: F401 (a fixture)
from kdlib.__main__ import main
from kdlib.book.runner import NOTEBOOKS

SMOKE = str(ROOT / "params/smoke.yaml")


@pytest.fixture(scope="module")
def smoke_run(smoke_book):
    """The smoke book's run folder (one run shared by every test of a whole book's record)."""
    return smoke_book[0]


def test_smoke_book_leaves_the_full_record(smoke_run):
    run = smoke_run
    for nb in NOTEBOOKS:
        executed = nbformat.read(run / nb, as_version=4)
        assert not executed.metadata["papermill"].get("exception"), nb
        assert all(o.get("output_type") != "error" for c in executed.cells for o in c.get("outputs", []))
        assert (run / nb).with_suffix(".html").stat().st_size > 10_000
    for name in ["metrics_camkd.json", "metrics_vanilla.json", "metrics_scratch.json", "teachers.json",
                 "results.csv", "comparison.csv", "predictions.npz", "params.yaml"]:
        assert (run / name).is_file(), name
    for png in ["plots_camkd.png", "plots_vanilla.png", "plots_scratch.png", "comparison_camkd_vs_vanilla.png",
                "diversity.png", "teachers.png"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    notebooks_mb = sum((run / nb).stat().st_size for nb in NOTEBOOKS) / 1e6
    assert notebooks_mb < 3, f"executed notebooks take {notebooks_mb:.1f} MB"


def test_manifest_records_the_run(smoke_run):
    manifest = json.loads((smoke_run / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert [manifest["notebooks"][nb]["status"] for nb in NOTEBOOKS] == ["finished"] * 3
    assert manifest["dataset"] == "FashionMNIST" and manifest["versions"]["torch"]
    assert manifest["device"]["device"] in ("cpu", "cuda", "mps")
    hashes = manifest["teacher_checkpoints"]
    assert [h["name"] for h in hashes] == ["teacher_cnn1", "teacher_cnn2", "teacher_resnet"]
    assert all(len(h["sha256"]) == 64 for h in hashes)


def test_metrics_history_and_students_beat_chance(smoke_run):
    for method in ["camkd", "vanilla", "scratch"]:
        metrics = json.loads((smoke_run / f"metrics_{method}.json").read_text())
        assert [r["seed"] for r in metrics["runs"]] == [0, 1]
        for run in metrics["runs"]:
            assert len(run["history"]) == 2 and run["test_acc"] > 30  # chance is 10 %
            assert set(run["fidelity"]) >= {"individual_fidelity", "centroid_fidelity", "top1_agreement"}


def test_finished_run_is_never_overwritten(smoke_run, capsys):
    before = (smoke_run / "manifest.json").read_text()
    assert main(["run", SMOKE, "--outputs", str(smoke_run.parent), *SMOKE_SIZE]) == 1
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--name" in err
    assert (smoke_run / "manifest.json").read_text() == before


def test_resume_skips_finished_notebooks(smoke_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "resumed"
    shutil.copytree(smoke_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["status"] = "failed"  # as if the machine died during 03
    manifest["notebooks"]["03_fidelity_analysis.ipynb"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    first = (run / NOTEBOOKS[0]).stat().st_mtime_ns
    assert main(["run", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "01_train_teachers.ipynb: finished earlier, skipped" in out
    assert (run / NOTEBOOKS[0]).stat().st_mtime_ns == first
    assert json.loads((run / "manifest.json").read_text())["status"] == "finished"


def test_unwritable_outputs_gives_clear_error(tmp_path, capsys):
    blocker = tmp_path / "outputs"
    blocker.write_text("not a folder")  # root ignores permission bits, so block with a file
    assert main(["run", SMOKE, "--outputs", str(blocker)]) == 1
    err = capsys.readouterr().err
    assert "cannot write the run folder" in err and str(blocker) in err


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import kdlib.train.loop as train
from kdlib.train.data import load_dataset
from kdlib.train.assemble import teacher_bank, train_student
from kdlib.train.loop import TrainConfig, set_threads
set_threads(1)
ckpt, data_root, signal = sys.argv[1], sys.argv[2], Path(sys.argv[3])
save = train.atomic_save

def save_then_stall(obj, path):  # epoch 3 trained, its checkpoint never written: killed here
    if obj["epoch"] == 3 and signal.name != "never":
        signal.touch()
        time.sleep(3600)
    save(obj, path)

train.atomic_save = save_then_stall
data = load_dataset("FashionMNIST", data_root, train_subset=500, test_subset=200, download=False)
cfg = TrainConfig(epochs=4, seed=3)
bank = teacher_bank([], [], data, cfg, cache=False, log=lambda *a: None)
_, history = train_student("scratch", bank, data, cfg, checkpoint=ckpt, identity={"kind": "test"}, log=print)
print("FINAL", history[-1]["test_acc"], history[-1]["train_loss"], len(history))
"""


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """A run killed with SIGKILL during epoch 3 (once epoch 2 is checkpointed; the run
    says so through a signal file, no deadline races it) resumes from epoch 2 and ends
    where an uninterrupted run of the same seed ends (CPU, same thread count)."""
    import time
    import torch
    env = dict(os.environ, KDBOOK_PROGRESS="off")
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    data_root, signal = str(tmp_path / "data"), tmp_path / "epoch3"
    run = lambda ckpt, sig: [sys.executable, str(script), str(ckpt), data_root, str(sig)]
    straight = subprocess.run(run(tmp_path / "a.pt", "never"), capture_output=True, text=True, env=env,
                              check=True).stdout
    ckpt = tmp_path / "b.pt"
    proc = subprocess.Popen(run(ckpt, signal), env=env, stdout=subprocess.PIPE, text=True)
    while not signal.exists():
        assert proc.poll() is None, "the training process ended before epoch 3"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    state = torch.load(ckpt, weights_only=True)
    assert not state["finished"] and state["epoch"] == 2
    resumed = subprocess.run(run(ckpt, "never"), capture_output=True, text=True, env=env, check=True).stdout
    assert "resuming from epoch 2 of 4" in resumed
    final = lambda out: [line for line in out.splitlines() if line.startswith("FINAL")][0]
    assert final(resumed) == final(straight)
    assert final(resumed).endswith(" 4")


def test_report_generates_the_readme_table(smoke_run, tmp_path):
    from kdlib.records.files import update_readme
    from kdlib.publish.pages import results_markdown
    import pandas as pd
    block = results_markdown(smoke_run)
    results = pd.read_csv(smoke_run / "results.csv")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in block.splitlines()
            if line.startswith("| Teacher") or line.startswith("| Student")}
    cnn1 = results[results.name == "teacher_cnn1"].iloc[0]
    assert rows["Teacher CNN1"][3] == f"{cnn1.test_acc:.2f}"               # measured, from results.csv
    camkd = results[results.name == "camkd"]
    acc, fid = camkd.test_acc, camkd.centroid_fidelity
    assert rows["Student (CAMKD)"][3] == f"{acc.mean():.2f} ± {acc.std():.2f} (n=2)"
    assert rows["Student (CAMKD)"][4] == f"{fid.mean():.3f} ± {fid.std():.3f}"
    comparison = pd.read_csv(smoke_run / "comparison.csv")
    first = comparison.iloc[0]
    assert f"{first.mean_diff:+.2f} points" in block and "book wall time" in block
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- results:start -->\nold\n<!-- results:end -->\nb\n")
    update_readme(readme, block)
    text = readme.read_text()
    assert "old" not in text and block in text and text.startswith("a\n") and text.endswith("b\n")


def test_failing_notebook_is_named_then_resumed_with_an_override(tmp_path, capsys):
    """A run whose 01 diverges (lr 1e6) fails naming the notebook, the cell and the error,
    says how to resume, keeps the partial notebook and marks the run failed; it then
    resumes with a lower lr given on the command line and finishes, both attempts kept."""
    outputs = tmp_path / "outputs"
    args = ["-p", "train_subset=300", "-p", "test_subset=100", "-p", "teacher_epochs=1", "-p", "student_epochs=1",
            "-p", "teachers=[teacher_cnn1, teacher_resnet]", "-p", "seeds=[0]", "-p", f"teacher_dir={tmp_path / 't'}"]
    assert main(["run", SMOKE, "--name", "r", "--outputs", str(outputs), "-p", "lr=1e6", *args]) == 1
    err = capsys.readouterr().err
    assert "01_train_teachers.ipynb failed at cell" in err and "NonFiniteLossError" in err
    assert "--resume" in err
    manifest = json.loads((outputs / "r" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["notebooks"]["01_train_teachers.ipynb"]["status"] == "failed"
    assert (outputs / "r" / "01_train_teachers.ipynb").exists(), "the partial notebook stays as the record"
    assert main(["run", "--resume", str(outputs / "r"), "-p", "lr=0.001"]) == 0
    manifest = json.loads((outputs / "r" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resume_overrides"] == [["lr=0.001"]]
    assert "lr: 0.001" in (outputs / "r" / "params.yaml").read_text()
    first, second = manifest["attempts"]      # both attempts kept, each with its commit and outcome
    assert (first["status"], first["resumed"], second["status"], second["resumed"]) == \
        ("failed", False, "finished", True)
    assert second["git"] == manifest["git"] and first["seconds"] > 0
    from kdlib.publish.pages import training_minutes
    teachers, students = training_minutes(outputs / "r")
    assert teachers > 0 and students > 0


# ---------------------------------------------------------------- what a batch run shows and records
def stream_text(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "stream")


def test_terminal_shows_each_epoch_once_as_it_happens(smoke_book):
    """The runner's terminal shows every epoch line (model, epoch, loss terms, test accuracy,
    seconds, time left) while its notebook runs, with the notebook's name; the executed
    notebook holds each line once, and no carriage-return bar states. The last epoch's
    line is checked in full (nothing left), the earlier ones by their start (their time
    left depends on the epochs' durations)."""
    from kdlib.train.progress import epoch_line
    run, _, out = smoke_book
    teachers = {t["name"]: t["history"] for t in json.loads((run / "teachers.json").read_text())["teachers"]}
    students = {f"{m} seed {r['seed']}": r["history"] for m in ("camkd", "vanilla", "scratch")
                for r in json.loads((run / f"metrics_{m}.json").read_text())["runs"]}
    assert len(teachers) == 3 and len(students) == 6 and all(len(h) == 2 for h in [*teachers.values(), *students.values()])
    lines = out.splitlines()
    for nb, models in ((NOTEBOOKS[0], teachers), (NOTEBOOKS[1], students)):
        start, end = lines.index(f"{nb}: running"), next(i for i, x in enumerate(lines) if x.startswith(f"{nb}: finished"))
        notebook = stream_text(run / nb)
        assert "\r" not in notebook
        for name, history in models.items():
            last = epoch_line(name, history[-1], len(history), 0)
            assert lines.count(f"{Path(nb).stem} | {last}") == 1, last
            assert start < lines.index(f"{Path(nb).stem} | {last}") < end
            assert notebook.count(last) == 1, last
            for record in history[:-1]:
                head = f"{name}: epoch {record['epoch']}/{len(history)} | "
                shown = [i for i, x in enumerate(lines) if x.startswith(f"{Path(nb).stem} | {head}")]
                assert len(shown) == 1 and start < shown[0] < end, head
                assert notebook.count(head) == 1, head


def test_terminal_holds_only_the_runners_lines(smoke_book):
    """What a batch run prints (stdout and stderr together) is the runner's own lines and
    the notebooks' progress behind their names: no kernel log lines such as ipykernel's
    "[IPKernelApp] WARNING | Kernel is running over TCP without encryption"."""
    _, _, out = smoke_book
    stems = "|".join(Path(nb).stem for nb in NOTEBOOKS)
    runner_line = re.compile(rf"^(({stems})\.ipynb: (running|finished in .+)|({stems}) \| .+|run finished: .+)$")
    strays = [line for line in out.splitlines() if not runner_line.match(line)]
    assert strays == [], strays
    assert out.count(": running") == len(NOTEBOOKS) and out.splitlines()[-1].startswith("run finished: ")


def test_records_name_no_machine_path(smoke_book):
    run, project, _ = smoke_book
    machine = [str(project), str(ROOT), str(Path.home()) + "/", "/tmp/"]
    for path in run.iterdir():
        if path.suffix in (".ipynb", ".html", ".json", ".yaml", ".csv"):
            text = path.read_text()
            assert not [m for m in machine if m in text], path.name
    assert yaml.safe_load((run / "params.yaml").read_text())["run_dir"] == "outputs/smoke"
    manifest = json.loads((run / "manifest.json").read_text())
    for t in manifest["teacher_checkpoints"]:
        assert t["checkpoint"].startswith("checkpoints/teachers/FashionMNIST/") and (project / t["checkpoint"]).is_file()
    for nb in NOTEBOOKS:
        meta = nbformat.read(run / nb, as_version=4).metadata.papermill
        assert (meta.input_path, meta.output_path, meta.parameters["run_dir"]) == \
            (f"notebooks/{nb}", f"outputs/smoke/{nb}", "outputs/smoke")


def first_rich_output(notebook: Path) -> dict:
    """The first table, markdown or figure the notebook shows (printed lines aside)."""
    nb = nbformat.read(notebook, as_version=4)
    return next(o["data"] for c in nb.cells for o in c.get("outputs", []) if o["output_type"] != "stream")


def test_each_notebook_shows_what_happened_first(smoke_book):
    run, _, _ = smoke_book
    first = first_rich_output(run / NOTEBOOKS[0])["text/html"]
    for t in json.loads((run / "teachers.json").read_text())["teachers"]:
        assert t["name"] in first and f"{t['test_acc']:.3f}".rstrip("0") in first  # 250 test images: x.y exactly
    first = first_rich_output(run / NOTEBOOKS[1])["text/html"]
    for m in ("camkd", "vanilla", "scratch"):
        acc = json.loads((run / f"metrics_{m}.json").read_text())["runs"][0]["test_acc"]
        assert m in first and f"{acc:.3f}".rstrip("0") in first
    first = first_rich_output(run / NOTEBOOKS[2])["text/markdown"]
    assert first.startswith("**Highest mean test accuracy:") and "CAMKD vs vanilla:" in first


# ---------------------------------------------------------------- the executed book's HTML
@pytest.mark.slow
@pytest.mark.skipif(bool(chromium_missing()), reason=str(chromium_missing()))
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_html_reads_in_chromium(smoke_book, page, notebook):  # noqa: F811 (page: the fixture)
    """Every figure loads, no error or warning output is shown, 03 gives the verdict,
    and no path of the machine that ran it appears (text or markup)."""
    run, project, _ = smoke_book
    html = run / Path(notebook).with_suffix(".html")
    page.goto(html.as_uri())
    images = page.evaluate("() => [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(images) >= {0: 1, 1: 3, 2: 2}[NOTEBOOKS.index(notebook)]
    assert all(complete and width > 0 for complete, width in images), images
    assert page.locator('[data-mime-type="application/vnd.jupyter.stderr"]').count() == 0
    text = page.inner_text("body")
    assert "Traceback" not in text and "<Figure size" not in text
    first = page.evaluate("""() => document.querySelector(['text/html', 'text/markdown', 'image/png']
        .map(m => `.jp-OutputArea-output[data-mime-type="${m}"]`).join(', ')).getBoundingClientRect().top""")
    assert first < 900, f"what happened (first table, answer or figure) starts at y = {first:.0f} px, below the first screen"
    if notebook == NOTEBOOKS[2]:
        assert "Highest mean test accuracy:" in text and "CAMKD vs vanilla:" in text
    markup = page.content()
    leaked = [p for p in (str(project), str(ROOT), str(Path.home()) + "/", "/tmp/") if p in markup]
    assert not leaked, leaked
