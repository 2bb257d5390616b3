"""kdlib.bench.command: structure of the result and the CLI's JSON (tiny sizes, no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlib.bench import command as bench
from kdlib.train.data import DataNotFoundError, load_dataset
from kdlib.train.distillers import Scratch, build_distiller
from kdlib.train.models import build_model
from kdlib.train.teachers import freeze
from kdlib.train.assemble import teacher_bank
from kdlib.train.loop import TrainConfig, fit, iterate

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"samples", "test_samples", "teachers", "device", "threads", "precision", "methods", "seconds", "ratios",
        "cache_build_s", "cache_bytes", "view_cache_build_s", "view_cache_bytes", "models",
        "matmul_gflop_per_s", "method_mflop_per_step", "ratio_bounds", "step_rounds", "step_ms", "step_ratios"}
MODEL_KEYS = {"mflop_per_step", "step_s", "gflop_per_s", "eval_s_per_image"}
RATIO_KEYS = {"vanilla/scratch", "camkd/scratch", "camkd_official/scratch", "seed_style/vanilla",
              "vanilla_live/vanilla", "camkd_live/camkd", "vanilla_crop/scratch_crop", "camkd_crop/scratch_crop",
              "aver/scratch", "ebkd/scratch", "aekd/scratch", "label_smoothing/scratch"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")      # Debian's Fashion-MNIST is staged here, never downloaded


@pytest.fixture(scope="module")
def tiny_data(data_root):
    try:
        return load_dataset("FashionMNIST", data_root, train_subset=256, test_subset=100, download=False)
    except DataNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not available offline: {err}")


@pytest.fixture(scope="module")
def result(tiny_data, data_root):
    return bench.run_benchmark(samples=128, teachers=2, repeats=1, test_samples=100, warmup=1,
                               data_root=data_root, device="cpu", download=False, step_rounds=2)


def test_result_structure(result):
    assert set(result) == KEYS
    assert result["samples"] == 128 and result["teachers"] == 2
    assert result["device"] == "cpu" and result["precision"] == "fp32"
    assert isinstance(result["threads"], int) and result["threads"] >= 1
    assert list(result["seconds"]) == bench.METHODS
    assert all(isinstance(v, float) and v > 0 for v in result["seconds"].values())
    assert set(result["ratios"]) == RATIO_KEYS
    # each ratio is its two rows' seconds (how much dearer live teachers are is counted, not timed:
    # test_steps_taken_in_turn)
    assert all(result["ratios"][k] == round(result["seconds"][a] / result["seconds"][b], 3)
               for k, (a, b) in bench.RATIOS.items())
    assert result["cache_build_s"] > 0
    assert isinstance(result["cache_bytes"], int) and result["cache_bytes"] > 0
    # the view cache holds 2 teachers' float32 logits on 25 views of each of the 128 images
    assert result["view_cache_bytes"] == 2 * 25 * 128 * 10 * 4 and result["view_cache_build_s"] > 0
    json.dumps(result)  # serialisable as is


def test_steps_taken_in_turn(tiny_data):
    """interleaved_steps runs one step of each method per round; step_ratios are the
    ratios of the median step times; a step with live teachers does more work than one
    served by the cache: exactly the teachers' forward passes (FLOPs counted, not timed:
    under load a timed ratio is noise); the result's lines say the same."""
    cfg = TrainConfig(epochs=1, batch_size=64, seed=0)
    sample = tiny_data.train.images[:1].float()
    models = [freeze(build_model(n)) for n in ("teacher_cnn1", "teacher_cnn2")]
    names = ["teacher_cnn1", "teacher_cnn2"]
    cached = teacher_bank(models, names, tiny_data, cfg, cache=True, log=lambda *a: None)
    live = teacher_bank(models, names, tiny_data, cfg, cache=False)
    runs = {}
    for method, bank in (("scratch", None), ("vanilla", cached), ("vanilla_live", live)):
        torch.manual_seed(0)
        d = build_distiller(method.split("_")[0], build_model("student"), bank, sample)
        runs[method] = (d, bench.prepare(d, cfg), cfg)
    times = bench.interleaved_steps(runs, tiny_data, cfg, rounds=5)
    assert {m: len(t) for m, t in times.items()} == {"scratch": 5, "vanilla": 5, "vanilla_live": 5}
    ratios = bench.step_ratios(times)
    med = {m: float(np.median(t)) for m, t in times.items()}
    assert ratios == {"vanilla/scratch": round(med["vanilla"] / med["scratch"], 3),
                      "vanilla_live/scratch": round(med["vanilla_live"] / med["scratch"], 3)}
    from torch.utils.flop_counter import FlopCounterMode
    x = next(iterate(tiny_data.train, tiny_data, cfg.batch_size, channels_last=cfg.channels_last))[0]
    with FlopCounterMode(display=False) as teachers_forward, torch.no_grad():
        [m(x, return_features=True) for m in models]
    extra = bench.step_flops(runs["vanilla_live"][0], tiny_data, cfg) - bench.step_flops(runs["vanilla"][0], tiny_data, cfg)
    assert extra == teachers_forward.get_total_flops() > 0
    line = bench.steps_line({"teachers": 2, "step_rounds": 5, "step_ms": {m: 1e3 * v for m, v in med.items()},
                             "step_ratios": ratios})
    assert line.startswith("M=2: single steps taken in turn (5 rounds")
    assert f"vanilla/scratch {ratios['vanilla/scratch']:.2f}" in line


def test_table_and_markdown(result):
    table = bench.format_table(result)
    md = bench.format_markdown(result)
    for method in bench.METHODS:
        assert method in table and f"| `{method}` |" in md
    assert "random init" in table and "random init" in md
    assert "machine:" in table and "Machine:" in md
    assert result["step_rounds"] == 2 and set(result["step_ms"]) == set(bench.FLOP_METHODS)
    assert set(result["step_ratios"]) == {f"{m}/scratch" for m in bench.FLOP_METHODS[1:]}
    assert "single steps taken in turn (2 rounds" in table and "single steps taken in turn" in md
    assert md.splitlines()[1] == "|---|---|---:|---:|"


def test_bad_arguments():
    with pytest.raises(ValueError, match="teachers"):
        bench.run_benchmark(samples=256, teachers=1)
    with pytest.raises(ValueError, match="repeats"):
        bench.run_benchmark(samples=256, repeats=0)


def test_train_epoch_is_fits_loop(tiny_data, monkeypatch):
    """What the benchmark times (train_epoch) is what fit runs: every epoch of fit is one
    train_epoch call, and the recorded loss and accuracy are that call's sums over its
    samples; max_batches stops after that many batches."""
    import kdlib.train.loop as train
    calls, real = [], train.train_epoch

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(train, "train_epoch", recording)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, device="cpu")
    history = fit(Scratch(build_model("student")), tiny_data, cfg, log=lambda *a: None)
    assert len(calls) == len(history) == 2
    for (sums, correct, n, _, _), record in zip(calls, history):
        assert n == 256 and record["train_loss"] == pytest.approx(sums["ce"] / n)
        assert record["train_acc"] == pytest.approx(100 * correct / n)
    distiller = Scratch(build_model("student"))
    sums, correct, n, stats, lr = real(distiller, bench.prepare(distiller, cfg), tiny_data, cfg, 0, 2, max_batches=1)
    assert n == cfg.batch_size and set(sums) == {"ce"} and 0 <= correct <= n and stats == {}


def test_cli_json_with_named_methods(tiny_data, data_root):
    """``--methods`` times only the rows named, plus scratch (every ratio's reference);
    without a crop row no view cache is built; stdout holds exactly one JSON object."""
    env = dict(os.environ, KDBOOK_PROGRESS="off")
    proc = subprocess.run([sys.executable, "-m", "kdlib.bench.command", "--samples", "128", "--teachers", "2",
                           "--methods", "camkd", "vanilla", "--step-rounds", "2",
                           "--repeats", "1", "--warmup", "1", "--device", "cpu", "--data-root", str(data_root),
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == KEYS - {"view_cache_build_s", "view_cache_bytes"}
    assert list(out["seconds"]) == out["methods"] == ["scratch", "vanilla", "camkd"]
    assert set(out["ratios"]) == {"vanilla/scratch", "camkd/scratch"}
    assert set(out["step_ms"]) == {"scratch", "vanilla", "camkd"}
    assert all(v > 0 for v in out["seconds"].values())
    assert "random init" in proc.stderr and "view cache" not in proc.stderr
    table = bench.format_table(out)
    assert "camkd_crop" not in table and "view cache" not in table and "camkd/scratch" in table
    md = bench.speed_markdown([out])
    assert "--methods scratch vanilla camkd" in md and "| `camkd_crop` |" not in md
    assert "--readme docs/speed.md`" in md  # the file the block is written into, and its block when not the full table
    assert "--readme docs/speed.md --block speed-baselines`" in bench.speed_markdown([out], block="speed-baselines")


@pytest.mark.parametrize("args, says", [
    (["--teachers", "2", "--book"], "--book needs --teachers 3"),
    (["--methods", "camkd", "--book"], "--book needs the book's methods timed: add vanilla"),
    (["--methods", "nonesuch"], "unknown bench method 'nonesuch'")])
def test_cli_refuses_bad_combinations_before_timing_anything(args, says, capsys, monkeypatch):
    """The command line's own checks (exit status 2, the reason on stderr), run in-process:
    the JSON test above runs ``python -m kdlib bench`` as a process."""
    timed = []
    monkeypatch.setattr(bench, "run_benchmark", lambda *a, **k: timed.append(1))
    with pytest.raises(SystemExit) as stop:
        bench.main(args)
    assert stop.value.code == 2 and says in capsys.readouterr().err and not timed


def test_speed_markdown_has_a_column_pair_per_teacher_count(result):
    other = dict(result, teachers=5, seconds={k: 2 * v for k, v in result["seconds"].items()})
    md = bench.speed_markdown([result, other], repeats=3, load=(0.5, 0, 0))
    assert "s / epoch, M=2 | × scratch | s / epoch, M=5 | × scratch" in md
    row = next(line for line in md.splitlines() if line.startswith("| `camkd` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ratio = result["seconds"]["camkd"] / result["seconds"]["scratch"]
    assert cells[2:] == [f"{result['seconds']['camkd']:.2f}", f"{ratio:.2f}",
                         f"{2 * result['seconds']['camkd']:.2f}", f"{ratio:.2f}"]
    assert ("--teachers 2 5 --samples 128 --repeats 3 --step-rounds 2 --readme" in md
            and "Load average when it started: 0.50" in md)
    assert "M=2: single steps taken in turn (2 rounds" in md
    assert "| `student` |" in md and "% of peak" in md and "M=5: MFLOP per training step" in md
    assert "--book" not in md and "estimate of `make book`" not in md
    book = {"total_s": 600.0, "total_reusing_s": 300.0, "teachers_found": ["teacher_cnn1"]}
    md = bench.speed_markdown([dict(result, book=book), other])
    assert "--book --readme" in md and "10.0 min with the teachers trained, 5.0 min loading" in md


def test_model_flops_match_a_hand_count(result):
    """The student's training step, counted by hand: forward 2*MACs per layer, backward
    twice that, except the first conv's input gradient (the images need none)."""
    assert list(result["models"]) == ["student", "teacher_cnn1", "teacher_cnn2"]
    assert all(set(r) == MODEL_KEYS and all(v > 0 for v in r.values()) for r in result["models"].values())
    macs = {"conv1": 28 * 28 * 32 * 9, "conv2": 14 * 14 * 64 * 32 * 9, "fc1": 3136 * 60, "fc2": 60 * 10}
    forward = 2 * sum(macs.values())
    step = 128 * (3 * forward - 2 * macs["conv1"])
    assert result["models"]["student"]["mflop_per_step"] == pytest.approx(step / 1e6, abs=0.05)
    assert result["models"]["teacher_cnn1"]["mflop_per_step"] > 4 * result["models"]["student"]["mflop_per_step"]


def test_method_flops_match_a_hand_count(result):
    """CAMKD's extra work per step with teacher_cnn1 and teacher_cnn2 (both hint maps
    64x7x7, like the student's): one fused 1x1 regressor 64 -> 128 channels (forward,
    and backward to its input and weights: 3 x 2 MACs), and the two teachers' heads
    (3136 -> 68 -> 10 and 3136 -> 520 -> 10) run forward only on the mapped feature.
    Vanilla's loss adds no matrix product to the student's step."""
    mf, student = result["method_mflop_per_step"], result["models"]["student"]["mflop_per_step"]
    assert list(mf) == bench.FLOP_METHODS
    assert mf["scratch"] == pytest.approx(student, abs=0.05) and mf["vanilla"] == mf["scratch"]
    regressor = 6 * 128 * 49 * 64 * 128
    heads = 2 * 128 * (3136 * 68 + 68 * 10 + 3136 * 520 + 520 * 10)
    assert mf["camkd"] - mf["scratch"] == pytest.approx((regressor + heads) / 1e6, abs=0.1)
    assert mf["camkd_official"] > mf["scratch"]
    assert result["matmul_gflop_per_s"] > 0
    steps = 1   # 128 samples, batch 128
    # from the FLOPs as rounded to 0.1 MFLOP: the third decimal of a bound may differ
    assert result["ratio_bounds"] == pytest.approx(bench.ratio_bounds(
        {m: v * 1e6 for m, v in mf.items()}, result["seconds"], steps, result["matmul_gflop_per_s"]), abs=2e-3)


def test_ratio_bounds_arithmetic():
    # scratch 0.5 s per step; camkd 10 GFLOP more per step at 20 GFLOP/s: at least 0.5 s more
    bounds = bench.ratio_bounds({"scratch": 3e9, "vanilla": 3e9, "camkd": 13e9}, {"scratch": 5.0}, 10, 20.0)
    assert bounds == {"vanilla/scratch": 1.0, "camkd/scratch": 2.0}


def _fake_result():
    """A result with round numbers: every step 0.1 s, every evaluated image 0.1 ms."""
    names = ["student", "teacher_cnn1", "teacher_cnn2", "teacher_resnet"]
    return {"samples": 1000, "test_samples": 500, "cache_build_s": 3.0,
            "seconds": {"scratch": 0.8, "vanilla": 1.6, "camkd": 2.4},   # over ceil(1000/128) = 8 steps
            "models": {n: {"step_s": 0.1, "eval_s_per_image": 1e-4} for n in names}}


def test_book_estimate_arithmetic():
    P = bench.validate({}, "defaults")   # fashionmnist.yaml's values: 3 teachers x 20 epochs, 3 methods x 3 seeds x 15
    book = bench.book_estimate(_fake_result(), P)
    assert book["steps_per_epoch"] == 469 and (book["train_images"], book["test_images"]) == (60_000, 10_000)
    parts = book["parts_s"]
    teacher = 20 * (469 * 0.1 + 10_000 * 1e-4)           # 958 s each
    assert [parts[f"{t}: 20 epochs"] for t in P["teachers"]] == pytest.approx([teacher] * 3)
    assert parts["teacher cache"] == pytest.approx(70_000 * 3.0 / 1500)
    for method, per_step in (("scratch", 0.1), ("vanilla", 0.2), ("camkd", 0.3)):
        assert parts[f"{method}: 1 seeds x 15 epochs"] == pytest.approx(15 * (469 * per_step + 1.0))
    assert book["total_s"] == pytest.approx(3 * teacher + 140 + 15 * (469 * 0.6 + 3.0), abs=0.2)
    # the shipped reference teachers match these settings: make book loads them, so they cost nothing
    assert book["teachers_found"] == P["teachers"]
    assert book["total_reusing_s"] == pytest.approx(book["total_s"] - 3 * teacher, abs=0.2)
    assert "total reusing the teachers found" in bench.format_book(book)
    other = bench.book_estimate(_fake_result(), dict(P, teacher_epochs=3))  # no such teachers anywhere
    assert other["teachers_found"] == [] and other["total_reusing_s"] == other["total_s"]
    three = bench.book_estimate(_fake_result(), dict(P, seeds=[0, 1, 2]))
    assert three["parts_s"]["camkd: 3 seeds x 15 epochs"] == pytest.approx(3 * parts["camkd: 1 seeds x 15 epochs"])
