"""Params validation: every bad input is refused before anything runs, in one line."""
from pathlib import Path

import pytest
import yaml

from kdlib.book import steps as book
from kdlib.__main__ import main
from kdlib.book.params import SCHEMA, ParamsError, load_params, parse_override, validate
from kdlib.book.runner import NOTEBOOKS, declared_parameters, notebooks_dir

ROOT = Path(__file__).resolve().parent.parent

BAD = [  # (yaml text, words the one-line error must contain)
    ("temprature: 4.0", ["temprature", "did you mean 'temperature'"]),
    ("batch_size: big", ["batch_size", "'big'", "expected int"]),
    ("temperature: 0", ["temperature", "0", "> 0"]),
    ("alpha: -0.5", ["alpha", "-0.5", ">= 0"]),
    ("beta: -1", ["beta", "-1", ">= 0"]),
    ("student_epochs: 0", ["student_epochs", ">= 1"]),
    ("teacher_epochs: 2.5", ["teacher_epochs", "2.5", "expected int"]),
    ("batch_size: 0", ["batch_size", ">= 1"]),
    ("dataset: FashionMnist", ["dataset", "'FashionMnist'", "FashionMNIST, MNIST, CIFAR10"]),
    ("teachers: [teacher_cnn9, teacher_cnn1]", ["teachers", "'teacher_cnn9'", "teacher_resnet"]),
    ("methods: [camkd, fancy]", ["methods", "'fancy'", "scratch"]),
    ("hint_layer: -1", ["hint_layer", "-1", "conv feature maps"]),
    ("hint_layer: -7", ["hint_layer", "-7"]),
    ("teachers: [teacher_cnn1]\nmethods: [camkd]", ["teachers", "camkd needs at least 2 teachers"]),
    ("seeds: []", ["seeds", "non-empty"]),
    ("seeds: [0, 0]", ["seeds", "distinct"]),
    ("lr_schedule: step", ["lr_schedule", "cosine, constant"]),
    ("precision: fp16", ["precision", "fp32, bf16"]),
    ("teachers: teacher_cnn1", ["teachers", "expected list"]),
    ("lr: .nan", ["lr", "nan", "finite"]),
    ("weight_decay: .inf", ["weight_decay", "inf", "finite"]),
    ("train_subset: 1000000", ["train_subset", "1000000", "60000 images"]),
    ("dataset: CIFAR10\ntrain_subset: 55000", ["train_subset", "55000", "CIFAR10", "50000"]),
    ("test_subset: 10001", ["test_subset", "10001", "10000 images"]),
    ("val_subset: 60000", ["val_subset", "60000", "smaller than", "60000 images"]),
    ("lr: [0.1", ["not valid YAML"]),
    ("- just\n- a list", ["expected a mapping"]),
    ("batch_size: true", ["batch_size", "True", "expected int"]),
    ("seeds: [-1]", ["seeds", "[-1]", "non-negative"]),
    ("seeds: [1.5]", ["seeds", "[1.5]", "integers"]),
    ("teachers: [teacher_cnn1, teacher_cnn1]", ["teachers", "list each name once"]),
    ("camkd_form: other", ["camkd_form", "'other'", "kdbook, official"]),
]


@pytest.mark.parametrize("text,words", BAD, ids=[b[0].split(":")[0] for b in BAD])
def test_bad_params_file_refused_before_anything_runs(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    outputs = tmp_path / "outputs"
    code = main(["run", str(path), "--outputs", str(outputs)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    for word in words:
        assert word in err, (word, err)
    assert not outputs.exists(), "a refused run must not leave a run folder"


def test_bad_override_refused(tmp_path, capsys):
    code = main(["run", str(ROOT / "params/smoke.yaml"), "-p", "alpha=-1", "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "-p alpha=-1" in err and "alpha" in err and not (tmp_path / "o").exists()


def test_missing_params_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--outputs", str(tmp_path / "o")]) == 2
    assert "no such params file" in capsys.readouterr().err


def test_overrides_parse_yaml_values():
    assert parse_override("seeds=[0,1]") == ("seeds", [0, 1])
    assert parse_override("lr=3e-4") == ("lr", 3e-4)
    assert parse_override("methods=[camkd]") == ("methods", ["camkd"])
    with pytest.raises(ParamsError):
        parse_override("alpha")


def test_defaults_filled_and_ints_accepted_for_floats():
    P = validate({"alpha": 1})
    assert P["alpha"] == 1.0 and isinstance(P["alpha"], float)
    assert set(P) == set(SCHEMA)


@pytest.mark.parametrize("path", sorted((ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_is_valid_and_declared_by_a_notebook(path):
    load_params(path)
    declared = set().union(*(declared_parameters(notebooks_dir() / nb) for nb in NOTEBOOKS))
    given = yaml.safe_load(path.read_text())
    assert set(given) <= declared, set(given) - declared


def test_every_schema_key_is_declared_by_some_notebook():
    declared = set().union(*(declared_parameters(notebooks_dir() / nb) for nb in NOTEBOOKS))
    assert set(SCHEMA) == declared


def test_notebook_parameters_checked_by_first_kdlib_call():
    with pytest.raises(ParamsError, match=r"02 parameters: temperature: -1.0 is not allowed"):
        book.notebook_params({"temperature": -1.0, "unrelated_variable": 3}, "02 parameters")


def test_one_teacher_without_camkd_passes_the_teachers_notebook(tmp_path):
    """01 declares no methods: a one-teacher run of vanilla KD must not fail there on camkd's rule."""
    P = book.notebook_params({"teachers": ["teacher_cnn1"], "run_dir": str(tmp_path)}, "01 parameters")
    assert P["teachers"] == ["teacher_cnn1"] and P["lr"] == 1e-3
    with pytest.raises(ParamsError, match="camkd needs at least 2 teachers"):  # where students are declared
        book.notebook_params({"teachers": ["teacher_cnn1"], "methods": ["camkd"], "run_dir": str(tmp_path)}, "02")


def test_fashionmnist_params_are_the_seed_defaults():
    P = load_params(ROOT / "params/fashionmnist.yaml")
    assert P["teachers"] == ["teacher_cnn1", "teacher_cnn2", "teacher_resnet"]
    assert (P["teacher_epochs"], P["student_epochs"], P["batch_size"], P["lr"]) == (20, 15, 128, 1e-3)
    assert (P["temperature"], P["alpha"], P["beta"], P["hint_layer"]) == (4.0, 0.7, 100.0, -2)
    assert len(P["seeds"]) >= 3 and set(P["methods"]) == {"camkd", "vanilla", "scratch"}


@pytest.mark.parametrize("path", sorted((ROOT / "params" / "sweeps").glob("*.yaml")) +
                         sorted((ROOT / "params" / "tune").glob("*.yaml")), ids=lambda p: p.parent.name + "/" + p.name)
def test_every_sweep_and_tune_file_expands_to_valid_runs(path):
    """Each committed sweep file expands to named runs whose params validate, each tune file
    to its settings and search spaces: a typo in one is found here, not hours into a run."""
    if path.parent.name == "sweeps":
        from kdlib.fanout.sweep import expand
        base, runs = expand(path)
        assert runs and len({r.name for r in runs}) == len(runs)
        assert (ROOT / base).is_file() or Path(base).is_file()
    else:
        from kdlib.fanout.tune import load_tune
        spec = load_tune(path)
        assert spec.settings and spec.trials >= 1
