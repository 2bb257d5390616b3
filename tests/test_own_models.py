"""Your own teachers, student and images: the params example and the Python example of
docs/own-models.md run as written on a small ImageFolder made here (three classes of coloured
16x16 images); own modules behave as the built-in ones through hooks; bad inputs are one line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from kdlib.book import steps
from kdlib.book.params import ParamsError, teacher_identity, validate
from kdlib.book.runner import check_run
from kdlib.train.data import ImageFolderError, normalize
from kdlib.train.distillers import build_distiller
from kdlib.train.models import build_model
from kdlib.train.own import HookedNet, ModelSpecError, build_own, check_model
from kdlib.train.teachers import LiveTeachers

from test_image_folder import make_folder

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "own-models.md"
COLOURS = {"red": (210, 40, 40), "green": (40, 210, 40), "blue": (40, 40, 210)}


def doc_block(title: str) -> str:
    """The fenced block of docs/own-models.md titled ``title``."""
    found = re.search(rf'```\w+ title="{re.escape(title)}"\n(.*?)```', DOC.read_text(), re.S)
    assert found, f"no block titled {title} in {DOC}"
    return found.group(1)


def _train_briefly(model: nn.Module, folder: Path, steps_: int = 60) -> nn.Module:
    """A teacher trained elsewhere: plain torch, a few Adam steps on the training images."""
    from kdlib.train.data import load_image_folder
    data = load_image_folder(folder, image_size=16)
    x = normalize(data.train.images, data.mean, data.std)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps_):
        idx = torch.randint(0, len(x), (32,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), data.train.labels[idx]).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("own"))


def make_project(root: Path) -> Path:
    """A user's folder: images/, mynets.py and own.yaml from the docs, big.pt and other.pt trained here."""
    make_folder(root / "images", n_train=24, n_test=8, classes=COLOURS)
    (root / "mynets.py").write_text(doc_block("mynets.py"))
    (root / "own.yaml").write_text(doc_block("own.yaml"))
    sys.path.insert(0, str(root))
    try:
        import mynets
        for name, width in (("big", 16), ("other", 8)):
            torch.manual_seed(width)
            model = _train_briefly(mynets.Big(width=width, num_classes=3), root / "images")
            torch.save(model.state_dict(), root / f"{name}.pt")
    finally:
        sys.path.remove(str(root))
    return root


@pytest.fixture()
def at(project, monkeypatch):
    monkeypatch.setenv("KDBOOK_ROOT", str(project))
    monkeypatch.chdir(project)
    return project


def env_for(project: Path) -> dict:
    return dict(os.environ, KDBOOK_ROOT=str(project), KDBOOK_PROGRESS="off",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


# ---------------------------------------------------------------- own modules behave as the built-in ones

def test_hooks_give_what_the_staged_interface_gives():
    """A built-in teacher wrapped as an own module with hint 'stages.1' (its last conv stage):
    the hook's feature is features[-2], and the head run from it gives its logits."""
    torch.manual_seed(0)
    model = build_model("teacher_cnn1").eval()
    hooked = HookedNet(model, "stages.1", (1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        h_logits, h_feat = hooked.hint_forward(x)
        torch.testing.assert_close(h_feat, feats[-2])
        torch.testing.assert_close(h_logits, logits)
        torch.testing.assert_close(hooked.forward_from(feats[-2]), model.forward_from(feats[-2]))


def test_camkd_on_hooked_models_is_camkd_on_the_built_in_ones():
    """The same teachers and student, once as they are and once wrapped as own modules with
    hints at their last conv stage: CAMKD's losses and gradients agree (kdbook and official)."""
    names = ["teacher_cnn1", "teacher_resnet"]
    torch.manual_seed(0)
    teachers = [build_model(n).eval() for n in names]
    student = build_model("student")
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for form in ("kdbook", "official"):
        out = []
        for wrap in (False, True):
            t = [HookedNet(m, "stages.1", (1, 28, 28)) if wrap else m for m in teachers]
            s = HookedNet(student, "stages.1", (1, 28, 28)) if wrap else student
            torch.manual_seed(1)  # the same regressors' initial weights
            dist = build_distiller("camkd", s, LiveTeachers(t, names), x[:1], beta=10.0, camkd_form=form).train()
            dist.zero_grad()
            _, losses = dist.forward_train(x, y, None, epoch=1)
            sum(losses.values()).backward()
            grads = [p.grad.clone() for p in student.parameters()]
            out.append(({k: v.item() for k, v in losses.items()}, grads))
        assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
        for a, b in zip(out[0][1], out[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_camkd_without_hints_needs_beta_zero():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

        def forward(self, x):
            return self.body(x)

    teachers = LiveTeachers([HookedNet(Plain(), None, (1, 28, 28)) for _ in range(2)], ["a", "b"])
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="has none: give each own model a hint"):
        build_distiller("camkd", HookedNet(Plain(), None, (1, 28, 28)), teachers, x[:1], beta=100.0)
    dist = build_distiller("camkd", HookedNet(Plain(), None, (1, 28, 28)), teachers, x[:1], beta=0.0)
    _, losses = dist.forward_train(x, y, None, epoch=3)
    assert losses["feat"].item() == 0 and losses["kd"].item() > 0 and not list(dist.extra_parameters())


def test_a_hint_inside_a_skip_connection_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.inner = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.head(h + self.inner(h))

    torch.manual_seed(0)
    with pytest.raises(ModelSpecError, match="skip connection") as err:
        check_model(HookedNet(Residual(), "inner", (1, 8, 8), "teachers[0] (res)"), 1, 8, 3, "teachers[0] (res)")
    assert "\n" not in str(err.value)
    check_model(HookedNet(Residual(), "conv", (1, 8, 8)), 1, 8, 3, "ok")  # its whole input stage is fine


# ---------------------------------------------------------------- the params example, as documented

@pytest.mark.slow
def test_the_params_example_runs_the_book_on_own_images_and_models(project):
    """docs/own-models.md's own.yaml through ``kdlib run``: big (given as a checkpoint) is used
    as is and scored; mine and teacher_cnn1 are trained; camkd, vanilla and scratch students
    with CAMKD's feature term through the hints; the records name no folder of this machine."""
    env = env_for(project)
    dry = subprocess.run([sys.executable, "-m", "kdlib", "run", "own.yaml", "--dry-run"], cwd=project, env=env,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "would run the book" in dry.stdout, dry.stdout + dry.stderr
    before = (project / "big.pt").read_bytes()
    done = subprocess.run([sys.executable, "-m", "kdlib", "run", "own.yaml", "--outputs", "outputs"], cwd=project,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = project / "outputs" / "own"
    teachers = {t["name"]: t for t in json.loads((run / "teachers.json").read_text())["teachers"]}
    assert list(teachers) == ["teacher_cnn1", "big", "mine"]
    assert teachers["big"]["given"] and teachers["big"]["history"] == [] and teachers["big"]["checkpoint"] == "big.pt"
    assert (project / "big.pt").read_bytes() == before  # used as is
    assert teachers["big"]["test_acc"] > 60  # trained above: it knows the colours
    assert len(teachers["mine"]["history"]) == 3 and len(teachers["teacher_cnn1"]["history"]) == 3
    assert (project / "checkpoints" / "teachers" / "ImageFolder").is_dir()
    camkd = json.loads((run / "metrics_camkd.json").read_text())
    history = camkd["runs"][0]["history"]
    assert camkd["teachers"] == ["teacher_cnn1", "big", "mine"] and camkd["eval_size"] == 24
    assert history[0]["loss_feat"] == 0 and history[-1]["loss_feat"] > 0  # the feature term, through hooks
    assert camkd["runs"][0]["extra_params"] > 0  # the regressors, sized from a dry batch
    assert set(json.loads((run / "manifest.json").read_text())["notebooks"]) >= {"01_train_teachers.ipynb"}
    params = yaml.safe_load((run / "params.yaml").read_text())
    assert params["code_dir"] == "." and params["data_root"] == "images"
    for record in run.glob("*.json"):
        assert str(project) not in record.read_text(), record.name


def test_the_python_example_runs_as_documented(project):
    (project / "distill_mine.py").write_text(doc_block("distill_mine.py"))
    done = subprocess.run([sys.executable, "distill_mine.py"], cwd=project, env=env_for(project),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["camkd", "vanilla", "scratch"]
    accuracies = [float(re.search(r"([\d.]+)% test accuracy", line).group(1)) for line in lines]
    assert all(0 <= a <= 100 for a in accuracies)


def test_distill_returns_the_trained_copy_and_the_teachers_scores(project):
    from kdlib import distill
    sys.path.insert(0, str(project))
    try:
        import mynets
    finally:
        sys.path.remove(str(project))
    from kdlib.train.data import load_image_folder
    data = load_image_folder(project / "images", image_size=16)
    big = mynets.Big(width=16, num_classes=3)
    big.load_state_dict(torch.load(project / "big.pt", weights_only=True))
    student = mynets.Small(num_classes=3)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    result = distill([big, big], student, (data.train.images, data.train.labels), (data.test.images, data.test.labels),
                     method="vanilla", epochs=2, batch_size=32, log=lambda *a: None)
    assert isinstance(result.student, mynets.Small) and result.student is not student
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in start.items())  # the one given is untouched
    assert len(result.history) == 2 and result.fidelity["centroid_agreement"] >= 0
    assert set(result.teacher_acc) == {"teacher0", "teacher1"}
    with pytest.raises(ValueError, match="hint") as err:
        distill([big, big], student, (data.train.images, data.train.labels), (data.test.images, data.test.labels),
                method="camkd", epochs=1, log=lambda *a: None)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- bad input: one line each, before anything trains

def own_yaml(project: Path, **changes) -> dict:
    P = yaml.safe_load((project / "own.yaml").read_text())
    for key, value in changes.items():
        if re.fullmatch(r"teacher_\d", key):
            P["teachers"][int(key.split("_")[1])].update(value)
        else:
            P[key] = value
    return P


BAD = {
    "no module": ({"teacher_1": {"model": "nonets:Big"}}, ["own-bad.yaml", "teachers[1] (big)", "'nonets'",
                                                           "does not import"]),
    "no callable": ({"teacher_1": {"model": "mynets:Bigg"}}, ["teachers[1] (big)", "'Bigg'", "did you mean Big"]),
    "not a module": ({"teacher_1": {"model": "builtins:dict", "kwargs": {"obj": 1}}},
                     ["teachers[1] (big)", "returned a dict", "nn.Module"]),
    "classes": ({"teacher_2": {"kwargs": {"width": 8, "num_classes": 5}}},
                ["teachers[2] (mine)", "returns 5 classes", "the data has 3"]),
    "checkpoint keys": ({"teacher_1": {"model": "mynets:Small", "kwargs": {}}},
                        ["teachers[1] (big)", "big.pt", "missing keys", "unexpected keys"]),
    "hint path": ({"teacher_2": {"hint": "featurs"}}, ["teachers[2] (mine)", "'featurs'", "closest: features"]),
    "hint missing": ({"student": {"model": "mynets:Small"}}, ["student", "beta 100", "hint", "beta: 0"]),
    "no test folder": ({"data_root": "images-train-only"}, ["data_root", "no test/ folder"]),
    "memory": ({"image_size": 512, "data_memory_mb": 20}, ["data_memory_mb", "image_size", "train_subset",
                                                           "96 images", "72 MiB"]),
    "mean per channel": ({"data_mean": [0.5]}, ["data_mean", "[0.5]", "3 channels"]),
    "unknown test class": ({"data_root": "images-extra-class"}, ["data_root", "test/purple/", "not a training class"]),
    "key in an own teacher": ({"teacher_2": {"hints": "features"}}, ["teachers", "unknown key 'hints'", "'hint'"]),
    "noise on a given teacher": ({"teacher_label_noise": {"big": 0.2}}, ["teacher_label_noise", "big",
                                                                           "given as a checkpoint"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_own_input_is_one_line_naming_file_key_and_value(at, case):
    changes, words = BAD[case]
    import shutil
    if not (at / "images-train-only").exists():
        shutil.copytree(at / "images" / "train", at / "images-train-only" / "train")
        shutil.copytree(at / "images", at / "images-extra-class")
        shutil.copytree(at / "images" / "test" / "red", at / "images-extra-class" / "test" / "purple")
    P = own_yaml(at, **changes)
    (at / "own-bad.yaml").write_text(yaml.safe_dump(P))
    with pytest.raises(ParamsError) as err:
        check_run("own-bad.yaml")
    message = str(err.value)
    assert "\n" not in message and message.startswith("own-bad.yaml"), message
    for word in words:
        assert word in message, (word, message)


def test_an_unreadable_image_is_named_before_anything_trains(at, tmp_path):
    import shutil
    folder = at / "images-broken"
    if not folder.exists():
        shutil.copytree(at / "images", folder)
        (folder / "train" / "red" / "zz-broken.png").write_bytes(b"not a png")
    P = validate(own_yaml(at, data_root="images-broken", run_dir=str(tmp_path / "run"),
                          teacher_dir=str(tmp_path / "teachers")), "own.yaml")
    P["code_dir"] = "."
    with pytest.raises(ImageFolderError, match="zz-broken.png") as err:
        steps.train_teachers(P, log=lambda *a: None)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "teachers").exists()  # nothing trained


def test_own_teachers_identity_holds_model_kwargs_and_the_images(at):
    P = validate({**own_yaml(at), "code_dir": "."}, "own.yaml")
    ident = teacher_identity(P, "mine")
    assert ident["model"] == "mynets:Big" and ident["kwargs"] == {"width": 8} and len(ident["data"]) == 16
    other = validate({**own_yaml(at, teacher_2={"kwargs": {"width": 12}}), "code_dir": "."}, "own.yaml")
    assert steps.teacher_checkpoint(other, "mine") != steps.teacher_checkpoint(P, "mine")
    assert steps.teacher_checkpoint(P, "big") == at / "big.pt"  # given: used where it is
    built_in = validate({}, "defaults")
    assert "kwargs" not in teacher_identity(built_in, "teacher_cnn1") and "data" not in teacher_identity(
        built_in, "teacher_cnn1")


def test_build_own_passes_classes_and_channels_only_where_the_callable_takes_them(at):
    sys.path.insert(0, str(at))
    try:
        model = build_own({"model": "mynets:Big", "kwargs": {"width": 4}}, 3, 3, 16, at, "t")
        assert model.net.head[-1].out_features == 3 and model.net.features[0].in_channels == 3
        with pytest.raises(ModelSpecError, match="called with"):
            build_own({"model": "mynets:Big", "kwargs": {"colour": 4}}, 3, 3, 16, at, "t")
    finally:
        sys.path.remove(str(at))


def _built_on_a_worker(P: dict) -> dict:
    """What a sweep's or a tuning's worker does first with own models: build and check each."""
    steps.check_models(P, "own.yaml")
    model = steps.model_builder(P, "mine")()
    return {"module": type(model.net).__module__, "classes": model.net.head[-1].out_features}


def test_a_dask_worker_imports_own_models_from_the_params_files_folder(at, tmp_path, monkeypatch):
    """A LocalCluster worker process (as sweeps and tunings start them) builds the own models of
    own.yaml: it imports mynets from code_dir (the project root here), not from its working
    folder, which holds no mynets.py."""
    from distributed import Client, LocalCluster
    P = validate({**own_yaml(at), "code_dir": "."}, "own.yaml")
    monkeypatch.chdir(tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        assert client.submit(_built_on_a_worker, P).result(timeout=120) == {"module": "mynets", "classes": 3}


def test_a_tuning_over_own_models_checks_out(at):
    """A tune file whose base names own models and an ImageFolder passes every check of
    ``kdlib tune --dry-run`` (its trials then run through the same steps as the sweep above)."""
    base = {**own_yaml(at), "val_subset": 12, "methods": ["vanilla", "scratch"]}
    (at / "own-tune-base.yaml").write_text(yaml.safe_dump(base))
    (at / "own-tune.yaml").write_text(yaml.safe_dump({
        "base": "own-tune-base.yaml", "methods": ["scratch", "vanilla"], "trials": 2, "seeds": [0],
        "space": {"vanilla": {"temperature": {"low": 1, "high": 8, "log": True}}}}))
    done = subprocess.run([sys.executable, "-m", "kdlib", "tune", "own-tune.yaml", "--dry-run"], cwd=at,
                          env=env_for(at), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would" in done.stdout


def test_distill_takes_a_dataset_as_it_takes_tensors(project):
    """Float images (taken as normalised) given as tensors and as a TensorDataset train the same student."""
    from torch.utils.data import TensorDataset

    from kdlib import distill
    from kdlib.train.data import load_image_folder
    data = load_image_folder(project / "images", image_size=16)
    x_train = normalize(data.train.images, data.mean, data.std)
    x_test = normalize(data.test.images, data.mean, data.std)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    runs = [distill({"t": teacher}, student, train, test, method="vanilla", epochs=2, batch_size=16,
                    log=lambda *a: None)
            for train, test in (((x_train, data.train.labels), (x_test, data.test.labels)),
                                (TensorDataset(x_train, data.train.labels), TensorDataset(x_test, data.test.labels)))]
    assert runs[0].history[-1]["test_acc"] == runs[1].history[-1]["test_acc"]
    torch.testing.assert_close(runs[0].student[1].weight, runs[1].student[1].weight)
    with pytest.raises(TypeError, match="ToTensor"):
        distill({"t": teacher}, student, [("not a tensor", 0)] * 2, (x_test, data.test.labels), method="scratch")
