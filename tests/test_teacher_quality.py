"""The regimes where confidence weighting should matter: teachers of unequal quality
(label noise, swapped classes), a narrower student, and the per-image teacher weights
a method uses, split by where each teacher is right and wrong."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kdlib.analysis import plots  # noqa: E402
from kdlib.book import steps as book  # noqa: E402
from kdlib.__main__ import main  # noqa: E402
from kdlib.train.data import noisy_labels, swap_classes, teacher_label_seed, teacher_labels  # noqa: E402
from kdlib.train.distillers import CAMKD, Scratch, Vanilla  # noqa: E402
from kdlib.train.losses import camkd_weights  # noqa: E402
from kdlib.train.metrics import confidently_wrong, weights_by_correctness  # noqa: E402
from kdlib.train.models import CalWeight, StudentNet, build_model, count_parameters, student_sizes  # noqa: E402
from kdlib.book.params import ParamsError, load_params, student_identity, teacher_identity, validate  # noqa: E402
from kdlib.train.teachers import LiveTeachers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "reference_teachers" / "FashionMNIST"


def balanced_labels(per_class: int = 600, classes: int = 10) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(per_class * classes,
                                                                             generator=torch.Generator().manual_seed(3))]


# ---------------------------------------------------------------- teachers' labels
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.4, 0.75])
def test_label_noise_is_wrong_at_exactly_the_fraction_in_every_class(fraction):
    y = balanced_labels()
    noisy = noisy_labels(y, fraction, 10, seed=7)
    wrong = noisy != y
    assert wrong.sum().item() == round(fraction * len(y))
    for c in range(10):  # the draw is class-balanced
        assert wrong[y == c].sum().item() == round(fraction * 600)
    assert ((noisy >= 0) & (noisy < 10)).all()


def test_label_noise_draws_every_wrong_class_about_uniformly_and_is_fixed_by_its_seed():
    y = balanced_labels(per_class=3000)
    noisy = noisy_labels(y, 0.5, 10, seed=1)
    offsets = (noisy - y)[noisy != y] % 10  # 1..9: which of the nine wrong classes
    counts = torch.bincount(offsets, minlength=10)[1:].double()
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()  # 1,667 each expected
    assert torch.equal(noisy, noisy_labels(y, 0.5, 10, seed=1))
    assert not torch.equal(noisy, noisy_labels(y, 0.5, 10, seed=2))
    # per teacher: the same teacher_seed gives two teachers different draws
    assert teacher_label_seed("teacher_resnet", 0) != teacher_label_seed("teacher_cnn1", 0)
    assert teacher_label_seed("teacher_resnet", 0) != teacher_label_seed("teacher_resnet", 1)


def test_class_swap_exchanges_exactly_those_classes():
    y = balanced_labels()
    swapped = swap_classes(y, [[0, 6], [2, 4]])
    expected = y.clone()
    for a, b in ((0, 6), (6, 0), (2, 4), (4, 2)):
        expected[y == a] = b
    assert torch.equal(swapped, expected)
    untouched = ~torch.isin(y, torch.tensor([0, 6, 2, 4]))
    assert torch.equal(swapped[untouched], y[untouched]) and (swapped[~untouched] != y[~untouched]).all()
    assert torch.equal(swap_classes(swapped, [[0, 6], [2, 4]]), y)


def test_teacher_labels_swap_then_noise_and_nothing_without_either():
    y = balanced_labels()
    assert teacher_labels(y, 10) is y
    both = teacher_labels(y, 10, noise=0.2, swap=[[1, 3]], seed=5)
    assert torch.equal(both, noisy_labels(swap_classes(y, [[1, 3]]), 0.2, 10, seed=5))


# ---------------------------------------------------------------- identities
def shipped_identities(name: str) -> dict[Path, dict]:
    """Every shipped checkpoint of teacher ``name``: the clean one and any degraded ones."""
    return {path: torch.load(path, weights_only=True, map_location="cpu")["identity"]
            for path in sorted(REFERENCE.glob(f"{name}-*.pt"))}


def shipped_identity(name: str) -> tuple[Path, dict]:
    """The shipped clean teacher ``name`` (no label noise, no class swap)."""
    [(path, ident)] = [(p, i) for p, i in shipped_identities(name).items()
                       if "label_noise" not in i and "class_swap" not in i]
    return path, ident


@pytest.mark.parametrize("degrade", [{"teacher_label_noise": {"teacher_resnet": 0.4}},
                                     {"teacher_class_swap": {"teacher_resnet": [[0, 6], [2, 4]]}},
                                     {"student_width": 0.25}])
def test_clean_teachers_keep_the_shipped_identities_and_files(degrade):
    P = validate(dict(load_params(ROOT / "params/fashionmnist.yaml"), **degrade))
    for name in P["teachers"]:
        path, shipped = shipped_identity(name)
        degraded = name in degrade.get("teacher_label_noise", {}) or name in degrade.get("teacher_class_swap", {})
        assert (teacher_identity(P, name) == shipped) is not degraded, name
        assert (book.teacher_checkpoint(P, name) == path) is not degraded, name
        if degraded:  # the teacher-quality sweep's degraded teachers ship too, found by their identity
            found = book.teacher_checkpoint(P, name)
            assert found.parent == path.parent and shipped_identities(name)[found] == teacher_identity(P, name)


def test_a_degraded_teachers_identity_names_its_degradation():
    P = validate({"teacher_label_noise": {"teacher_resnet": 0.4}, "teacher_class_swap": {"teacher_cnn1": [[6, 0]]}})
    clean = validate({})
    assert teacher_identity(P, "teacher_resnet") == dict(teacher_identity(clean, "teacher_resnet"), label_noise=0.4)
    assert teacher_identity(P, "teacher_cnn1") == dict(teacher_identity(clean, "teacher_cnn1"), class_swap=[[0, 6]])
    assert teacher_identity(P, "teacher_cnn2") == teacher_identity(clean, "teacher_cnn2")
    # no change is no degradation: the clean teacher's identity (and checkpoint)
    none = validate({"teacher_label_noise": {"teacher_resnet": 0}, "teacher_class_swap": {"teacher_resnet": []}})
    assert teacher_identity(none, "teacher_resnet") == teacher_identity(clean, "teacher_resnet")
    # students learn from checkpoints' hashes, not from these keys
    sha = {n: "x" for n in clean["teachers"]}
    assert student_identity(P, "camkd", 0, sha) == student_identity(clean, "camkd", 0, sha)


def test_student_width_is_in_the_students_identity_only_when_it_is_not_one():
    sha = {n: "x" for n in validate({})["teachers"]}
    default = student_identity(validate({}), "camkd", 0, sha)
    assert "student_width" not in default
    assert student_identity(validate({"student_width": 1}), "camkd", 0, sha) == default
    narrow = student_identity(validate({"student_width": 0.25}), "camkd", 0, sha)
    assert narrow == dict(default, student_width=0.25)
    assert teacher_identity(validate({"student_width": 0.25}), "teacher_cnn1") == \
        teacher_identity(validate({}), "teacher_cnn1")


# ---------------------------------------------------------------- the student's width
def student_count(width: float, channels: int = 1, classes: int = 10, side: int = 7) -> int:
    """Parameters of the student at ``width``, counted by hand from its layer sizes."""
    c1, c2, hidden = (int(n * width + 0.5) for n in (32, 64, 60))
    return (channels * c1 * 9 + c1) + (c1 * c2 * 9 + c2) + (c2 * side * side * hidden + hidden) \
        + (hidden * classes + classes)


@pytest.mark.parametrize("width,params", [(1.0, 207_646), (0.5, 52_180), (0.25, 13_183), (0.125, 3_570)])
def test_parameter_count_per_width(width, params):
    assert count_parameters(build_model("student", width=width)) == params == student_count(width)
    assert count_parameters(build_model("student", 3, 10, 32, width=width)) == student_count(width, 3, side=8)


def test_width_one_is_the_seed_student_layer_for_layer():
    torch.manual_seed(0)
    default = StudentNet()
    torch.manual_seed(0)
    one = build_model("student", width=1.0)
    shapes = {k: tuple(v.shape) for k, v in one.state_dict().items()}
    assert shapes == {"stages.0.0.weight": (32, 1, 3, 3), "stages.0.0.bias": (32,),
                      "stages.1.0.weight": (64, 32, 3, 3), "stages.1.0.bias": (64,),
                      "neck.2.weight": (60, 3136), "neck.2.bias": (60,),
                      "classifier.weight": (10, 60), "classifier.bias": (10,)}
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), one.state_dict().values()))


def test_a_width_that_leaves_a_layer_empty_is_refused():
    assert student_sizes(1 / 64) == (1, 1, 1)
    with pytest.raises(ValueError, match="every layer needs one"):
        student_sizes(0.01)
    with pytest.raises(ValueError, match="only the student"):
        build_model("teacher_cnn1", width=0.5)


@pytest.mark.parametrize("form", ["kdbook", "official"])
def test_camkd_regressors_size_themselves_from_the_narrow_students_map(form):
    torch.manual_seed(0)
    teachers = LiveTeachers([build_model(n) for n in ("teacher_cnn1", "teacher_resnet")],
                            ["teacher_cnn1", "teacher_resnet"])
    student = build_model("student", width=0.25)
    camkd = CAMKD.for_shapes(student, teachers, torch.randn(1, 1, 28, 28), form=form)
    narrow = student_sizes(0.25)[1]  # 16 channels in the last conv map
    if form == "official":
        assert isinstance(camkd.regressors, CalWeight)
        assert [getattr(camkd.regressors, f"embed{i}").transfer[0].in_channels for i in range(2)] == [narrow] * 2
    else:
        assert [g.conv.in_channels for g in camkd.regressors.groups] == [narrow]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    logits, losses = camkd.train().forward_train(x, y, None, epoch=1)
    sum(losses.values()).backward()
    assert logits.shape == (8, 10) and losses["feat"] > 0
    assert all(p.grad is not None for p in camkd.regressors.parameters())


# ---------------------------------------------------------------- per-image teacher weights
def test_confidently_wrong_by_hand():
    probs = torch.tensor([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.91, 0.09]])
    labels = torch.tensor([0, 0, 1, 1])
    # sample 1: wrong at 0.95; sample 2: wrong at 0.6 (not confident); sample 3: wrong at 0.91
    assert confidently_wrong(probs, labels) == 50.0
    assert confidently_wrong(probs, labels, threshold=0.92) == 25.0
    assert confidently_wrong(probs, torch.tensor([0, 1, 0, 0])) == 0.0


def test_weights_by_correctness_by_hand():
    weights = torch.tensor([[0.5, 0.4, 0.3, 0.2], [0.5, 0.6, 0.7, 0.8]])
    logits = torch.zeros(2, 4, 3)
    logits[0, :, 0] = 5  # teacher 0 always says class 0
    logits[1, torch.arange(4), torch.tensor([0, 1, 2, 0])] = 5  # teacher 1 is right on every image
    labels = torch.tensor([0, 1, 2, 0])  # teacher 0 wrong on images 1 and 2
    out = weights_by_correctness(weights, logits, labels)
    assert out["mean"] == pytest.approx([0.35, 0.65])
    assert out["wrong"][0] == pytest.approx(0.35) and out["right"][0] == pytest.approx(0.35)
    assert out["wrong"][1] is None and out["right"][1] == pytest.approx(0.65)
    assert out["wrong_share"] == pytest.approx([50.0, 0.0])
    with pytest.raises(ValueError, match="expected weights"):
        weights_by_correctness(weights[:, :3], logits, labels)


class FixedLogits(nn.Module):
    """A 'teacher' whose logits for image k are row k of ``table`` (the images carry k)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x, return_features=False):
        logits = self.table[x[:, 0, 0, 0].long()]
        return (logits, [x, x, logits]) if return_features else logits

    has_hint = True

    def hint_forward(self, x, hint_layer=-2):
        return self(x), x

    def check_hint_layer(self, hint_layer):
        return 1


def test_camkd_weighs_the_teacher_that_is_wrong_less_where_it_is_wrong():
    """Three teachers on four images; teacher 2 is confidently wrong on images 0 and 1.
    CAMKD's weights (by hand: w = (1 - softmax_i CE_i) / (M - 1)) put less on it there."""
    labels = torch.tensor([0, 1, 2, 3])
    right = F.one_hot(labels, 4).float() * 4
    wrong = right.clone()
    wrong[[0, 1]] = F.one_hot(torch.tensor([3, 0]), 4).float() * 4
    tables = [right, right * 0.5, wrong]
    teachers = LiveTeachers([FixedLogits(t) for t in tables], ["a", "b", "c"])
    camkd = CAMKD(build_model("student"), teachers, feature_shapes=[(1, 28, 28)] * 3, student_shape=(1, 28, 28))
    x = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 1, 28, 28)
    w = camkd.teacher_weights(x, labels, None)
    ce = torch.stack([F.cross_entropy(t, labels, reduction="none") for t in tables])
    by_hand = (1 - ce.softmax(0)) / 2
    torch.testing.assert_close(w, by_hand)
    torch.testing.assert_close(w.sum(0), torch.ones(4))
    out = weights_by_correctness(w, torch.stack(tables), labels)
    assert out["wrong"][:2] == [None, None] and out["wrong_share"] == [0.0, 0.0, 50.0]
    assert out["wrong"][2] < 0.1 < 1 / 3 < out["right"][2]
    assert out["wrong"][2] == pytest.approx(by_hand[2, :2].mean().item())
    assert Scratch(build_model("student")).teacher_weights(x, labels, None) is None
    assert Vanilla(build_model("student"), teachers).teacher_weights(x, labels, None) is None


def test_camkd_teacher_weights_use_the_consensus_where_there_is_no_label():
    from kdlib.train.losses import UNLABELLED
    torch.manual_seed(0)
    teachers = LiveTeachers([build_model(n) for n in ("teacher_cnn1", "teacher_resnet")], ["a", "b"])
    camkd = CAMKD.for_shapes(build_model("student"), teachers, torch.randn(1, 1, 28, 28))
    x = torch.randn(5, 1, 28, 28)
    t = teachers.logits(x)
    consensus = t.softmax(-1).mean(0).argmax(-1)
    y = torch.tensor([1, UNLABELLED, 3, UNLABELLED, 0])
    expected = camkd_weights(t, torch.where(y >= 0, y, consensus))
    torch.testing.assert_close(camkd.teacher_weights(x, y, None), expected)


# ---------------------------------------------------------------- plots
def weighted_metrics(method="camkd", seeds=(0, 1), teachers=("t_a", "t_b", "t_c")):
    runs = []
    for seed in seeds:
        history = [{"epoch": e, "test_acc": 80.0, "train_acc": 80.0, "train_loss": 1.0, "test_loss": 1.0,
                    "lr": 1e-3, "loss_ce": 1.0, "loss_kd": 0.1, "weight": [0.4, 0.35 + 0.01 * e, 0.25 - 0.01 * e]}
                   for e in (1, 2, 3)]
        tw = {"mean": [0.4, 0.35, 0.25], "wrong": [None, 0.3, 0.1 + 0.02 * seed], "right": [0.4, 0.36, 0.3],
              "wrong_share": [0.0, 2.0, 40.0]}
        runs.append({"seed": seed, "test_acc": 80.0, "history": history, "teacher_weights": tw})
    return {"method": method, "teachers": list(teachers), "runs": runs,
            "hparams": {"teacher_label_noise": {"t_c": 0.4}, "teacher_class_swap": {}}}


def unweighted_metrics(method="vanilla"):
    m = weighted_metrics(method)
    for run in m["runs"]:
        run.pop("teacher_weights")
        for rec in run["history"]:
            rec.pop("weight")
    return m


def test_teacher_weights_frame_holds_the_runs_numbers_and_only_weighting_methods():
    metrics = {"camkd": weighted_metrics(), "vanilla": unweighted_metrics()}
    assert plots.weighting_methods(metrics) == ["camkd"]
    frame = plots.teacher_weights_frame(metrics)
    assert list(frame.columns) == plots.WEIGHT_COLUMNS and len(frame) == 6
    assert list(frame["teacher"].unique()) == ["t_a", "t_b", "t_c (40% noise)"]
    row = frame[(frame["seed"] == 1) & (frame["teacher"] == "t_c (40% noise)")].iloc[0]
    assert (row["wrong"], row["right"], row["wrong_share"]) == pytest.approx((0.12, 0.3, 40.0))
    assert frame.loc[frame["teacher"] == "t_a", "wrong"].isna().all()
    assert plots.teacher_label("t", {"teacher_class_swap": {"t": [[0, 6], [2, 4]]}}) == "t (swap 0-6, 2-4)"


def test_plot_teacher_weights_bars_are_the_means_over_seeds():
    metrics = {"camkd": weighted_metrics(), "vanilla": unweighted_metrics(),
               "ebkd": weighted_metrics("ebkd", seeds=(0,))}
    fig = plots.plot_teacher_weights(metrics)
    ax_epoch, ax_bar = fig.axes
    labels = [t.get_text() for t in ax_epoch.get_legend().get_texts()]
    assert "camkd: t_c (40% noise)" in labels and "ebkd: t_a" in labels and not any("vanilla" in t for t in labels)
    heights = {c.get_label(): [round(b.get_height(), 6) for b in c] for c in ax_bar.containers}
    assert heights["camkd: teacher wrong"] == [0.0, 0.3, 0.11]  # t_a is never wrong: no bar (n/a)
    assert heights["camkd: teacher right"] == [0.4, 0.36, 0.3]
    assert heights["ebkd: teacher wrong"] == [0.0, 0.3, 0.1]
    assert any("n/a" in t.get_text() for t in ax_bar.texts)
    levels = {ln.get_label(): ln.get_ydata()[0] for ln in ax_bar.get_lines()}
    assert levels == pytest.approx({"camkd: equal weights (0.333)": 1 / 3, "ebkd: equal weights (0.333)": 1 / 3})
    empty = plots.plot_teacher_weights({"vanilla": unweighted_metrics()})
    assert "no method with per-image teacher weights" in empty.axes[0].texts[0].get_text()


def test_teacher_weights_table_is_the_mean_over_seeds():
    table = plots.teacher_weights_table({"camkd": weighted_metrics(), "vanilla": unweighted_metrics()})
    assert list(table.columns) == ["method", "teacher", "mean", "wrong", "right", "wrong_share"] and len(table) == 3
    row = table[table["teacher"] == "t_c (40% noise)"].iloc[0]
    assert (row["wrong"], row["right"]) == pytest.approx((0.11, 0.3))


def test_teachers_table_names_label_changes_and_reads_older_records():
    teachers = {"teachers": [
        {"name": "a", "params": 10, "test_acc": 90.0, "train_wrong": 4.0, "confidently_wrong": 1.0,
         "train_seconds": 3.0},
        {"name": "b", "params": 10, "test_acc": 80.0, "train_wrong": 30.0, "confidently_wrong": 0.5,
         "train_seconds": 3.0, "label_noise": 0.4, "class_swap": [[0, 6]]},
        {"name": "old", "params": 10, "test_acc": 92.0, "train_seconds": 3.0}]}  # made before these were kept
    table = plots.teachers_table(teachers)
    assert list(table.columns) == plots.TEACHER_TABLE
    assert list(table["labels"]) == ["true", "40% noise; swap 0-6", "true"]
    assert table["confidently_wrong"].tolist()[:2] == [1.0, 0.5] and table["train_wrong"].isna().tolist()[2]


# ---------------------------------------------------------------- bad input
BAD = [  # (yaml text, words the one-line error must contain)
    ("teacher_label_noise: {teacher_vgg: 0.4}", ["teacher_label_noise", "teacher_vgg", "name a teacher of this run"]),
    ("teacher_label_noise: {teacher_resnet: 1.0}", ["teacher_label_noise", "1.0", "[0, 1)"]),
    ("teacher_label_noise: {teacher_resnet: -0.1}", ["teacher_label_noise", "-0.1", "[0, 1)"]),
    ("teacher_label_noise: 0.4", ["teacher_label_noise", "0.4", "expected dict"]),
    ("teacher_class_swap: {teacher_cnn9: [[0, 6]]}", ["teacher_class_swap", "teacher_cnn9", "teacher of this run"]),
    ("teacher_class_swap: {teacher_resnet: [[0, 10]]}", ["teacher_class_swap", "10", "classes are 0 to 9"]),
    ("teacher_class_swap: {teacher_resnet: [[-1, 2]]}", ["teacher_class_swap", "-1", "classes are 0 to 9"]),
    ("teacher_class_swap: {teacher_resnet: [[0, 6], [6, 2]]}", ["teacher_class_swap", "[6, 2]", "one pair at most"]),
    ("teacher_class_swap: {teacher_resnet: [[3, 3]]}", ["teacher_class_swap", "[3, 3]", "two different"]),
    ("teacher_class_swap: {teacher_resnet: [0, 6]}", ["teacher_class_swap", "[0, 6]", "list of pairs"]),
    ("student_width: 0", ["student_width", "0", "> 0"]),
    ("student_width: -0.5", ["student_width", "-0.5", "> 0"]),
    ("student_width: 0.01", ["student_width", "0.01", "(0, 1, 1)", "width >= 0.015625"]),
]


@pytest.mark.parametrize("text,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_refused_in_one_line_before_anything_runs(tmp_path, capsys, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    outputs = tmp_path / "outputs"
    assert main(["run", str(path), "--outputs", str(outputs)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    for word in words:
        assert word in err, (word, err)
    assert not outputs.exists()


def test_settings_are_normalised():
    P = validate({"teacher_label_noise": {"teacher_resnet": 0}, "student_width": 1})
    assert P["teacher_label_noise"] == {"teacher_resnet": 0.0} and isinstance(P["student_width"], float)
    with pytest.raises(ParamsError, match="teacher_label_noise"):
        validate({"teachers": ["teacher_cnn1", "teacher_cnn2"], "teacher_label_noise": {"teacher_resnet": 0.2}})


# ---------------------------------------------------------------- wiring: the weights pass, the book's steps
def synthetic_data(n=70, seed=0):
    from kdlib.train.data import Dataset, Split
    gen = torch.Generator().manual_seed(seed)
    split = lambda k: Split(torch.randint(0, 256, (k, 1, 28, 28), dtype=torch.uint8, generator=gen),  # noqa: E731
                            torch.randint(0, 10, (k,), generator=gen))
    return Dataset("Synthetic", split(n), split(20), torch.tensor([0.3]), torch.tensor([0.35]),
                   [str(c) for c in range(10)])


@pytest.mark.parametrize("bank_kind", ["live", "cached", "view_cached"])
def test_predict_teacher_weights_is_camkds_weights_on_every_training_image_in_order(bank_kind):
    from kdlib.train.assemble import teacher_bank
    from kdlib.train.data import normalize
    from kdlib.train.loop import TrainConfig, predict_teacher_weights
    torch.manual_seed(0)
    data = synthetic_data()
    names = ["teacher_cnn1", "teacher_resnet"]
    models = [build_model(n) for n in names]
    for m in models:
        m.eval()
    cfg = TrainConfig(augment="crop" if bank_kind == "view_cached" else "none", eval_batch_size=32)
    bank = teacher_bank(models, names, data, cfg, cache=bank_kind != "live", log=lambda *a: None)
    camkd = CAMKD.for_shapes(build_model("student"), bank, normalize(data.train.images[:1], data.mean, data.std))
    camkd.train()
    weights, logits = predict_teacher_weights(camkd, data, cfg)
    with torch.no_grad():
        x = normalize(data.train.images, data.mean, data.std)
        expected_logits = torch.stack([m(x) for m in models])
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)  # the unshifted images
    torch.testing.assert_close(weights, camkd_weights(expected_logits, data.train.labels), rtol=1e-4, atol=1e-5)
    assert camkd.training and camkd.student.training  # left as found
    assert predict_teacher_weights(Vanilla(build_model("student"), bank), data, cfg) is None


TINY = {"train_subset": 300, "test_subset": 100, "teacher_epochs": 1, "student_epochs": 1, "threads": 1,
        "teachers": ["teacher_cnn1", "teacher_resnet"], "methods": ["camkd", "vanilla"]}


@pytest.mark.slow
def test_book_trains_a_degraded_teacher_and_a_narrow_student_and_records_the_weights(tmp_path):
    import json
    from kdlib.train.checkpoint import load_checkpoint
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "run"), student_width=0.25,
                      teacher_label_noise={"teacher_resnet": 0.4}, teacher_class_swap={"teacher_cnn1": [[0, 6]]}))
    quiet = lambda *a: None  # noqa: E731
    results = book.distill_students(P, log=quiet)
    teachers = {t["name"]: t for t in json.loads((tmp_path / "run" / "teachers.json").read_text())["teachers"]}
    assert teachers["teacher_resnet"]["label_noise"] == 0.4 and "class_swap" not in teachers["teacher_resnet"]
    assert teachers["teacher_cnn1"]["class_swap"] == [[0, 6]]
    for t in teachers.values():
        assert 0 <= t["confidently_wrong"] <= t["train_wrong"] <= 100
    state = load_checkpoint(book.teacher_checkpoint(P, "teacher_resnet"))
    assert state["identity"]["label_noise"] == 0.4
    # the teacher learned from its own labels; the students' labels are the true ones
    data = book.load_data(P)
    assert (book.teacher_data(P, data, "teacher_resnet").train.labels != data.train.labels).float().mean() == 0.4
    assert torch.equal(book.student_data(P, data).train.labels, data.train.labels)
    camkd, vanilla = results["camkd"], results["vanilla"]
    assert camkd["student_params"] == vanilla["student_params"] == 13_183
    assert camkd["hparams"]["student_width"] == 0.25
    assert camkd["hparams"]["teacher_label_noise"] == {"teacher_resnet": 0.4}
    tw = camkd["runs"][0]["teacher_weights"]
    assert set(tw) == {"mean", "wrong", "right", "wrong_share"} and len(tw["mean"]) == 2
    assert sum(tw["mean"]) == pytest.approx(1.0)
    assert "teacher_weights" not in vanilla["runs"][0]
    saved = json.loads((tmp_path / "run" / "metrics_camkd.json").read_text())["runs"][0]["teacher_weights"]
    assert saved == json.loads(json.dumps(tw))


# ---------------------------------------------------------------- the sweep: its file, and method variants
def test_teacher_quality_sweep_expands_to_valid_runs():
    from kdlib.fanout.sweep import expand
    base, runs = expand(ROOT / "params/sweeps/teacher-quality.yaml")
    assert base.endswith("params/fashionmnist.yaml") and len({r.name for r in runs}) == len(runs)
    for run in runs:
        P = run.P
        assert (P["train_subset"], P["test_subset"], P["student_epochs"]) == (0, 0, 15)
        assert P["teachers"] == ["teacher_cnn1", "teacher_cnn2", "teacher_resnet"] and P["teacher_epochs"] == 20
    settings = {(json.dumps(r.P["teacher_label_noise"]), json.dumps(r.P["teacher_class_swap"]), r.P["student_width"])
                for r in runs}
    assert len(settings) == 5
    every = {"scratch", "label_smoothing", "vanilla", "camkd", "camkd[beta=0]"}
    by_setting = {}
    for r in runs:
        key = (json.dumps(r.P["teacher_label_noise"]), json.dumps(r.P["teacher_class_swap"]), r.P["student_width"])
        for m in r.P["methods"]:
            variant = ("[beta=0]" if r.P["beta"] == 0 else "") + \
                ("[official]" if r.P["camkd_form"] == "official" else "")
            assert not variant or r.P["methods"] == ["camkd"]  # a variant run trains the variant alone
            by_setting.setdefault(key, {}).setdefault(m + variant, set()).update(r.P["seeds"])
    for key, methods in by_setting.items():
        assert every <= set(methods), key
        assert all(seeds == {0, 1, 2} for seeds in methods.values()), key
    swapped = (json.dumps({}), json.dumps({"teacher_resnet": [[0, 6], [2, 4]]}), 1.0)
    for key in ((json.dumps({}), json.dumps({}), 1.0), swapped):
        assert {"aver", "ebkd", "aekd", "camkd[official]"} <= set(by_setting[key])
    official = next(r.P for r in runs if r.P["camkd_form"] == "official")
    assert (official["alpha"], official["beta"]) == (1.0, 50.0)
    assert runs[0].overrides["teacher_class_swap"] == {"teacher_resnet": [[0, 6], [2, 4]]}  # the cheapest first


def fake_run(folder: Path, name: str, overrides: dict, acc: dict, runs: list, weights: dict | None = None,
             status: str = "finished") -> None:
    """A run record: acc = {method: {seed: accuracy}}; predictions right on the first
    round(accuracy) of 100 labels; weights = {method: {seed: teacher_weights}}."""
    import json
    import numpy as np
    import yaml
    labels = np.arange(100) % 10
    run = folder / name
    run.mkdir(parents=True)
    P = validate(dict(overrides))
    (run / "params.yaml").write_text(yaml.safe_dump(P))
    (run / "manifest.json").write_text(json.dumps({"status": status}))
    (run / "teachers.json").write_text(json.dumps({"teachers": [
        {"name": t, "test_acc": 90.0 + i - 30.0 * (t in P["teacher_class_swap"])} for i, t in enumerate(P["teachers"])]}))
    preds = {"labels": labels}
    for method, by_seed in acc.items():
        (run / f"metrics_{method}.json").write_text(json.dumps({
            "method": method, "eval_split": "test", "student_params": 1234, "runs": [
                {"seed": s, "test_acc": a, "fidelity": {"centroid_fidelity": 0.1},
                 **({"teacher_weights": weights[method][s]} if weights and method in weights else {})}
                for s, a in by_seed.items()]}))
        for s, a in by_seed.items():
            preds[f"{method}/seed{s}"] = np.where(np.arange(100) < round(a), labels, (labels + 1) % 10)
    np.savez(run / "predictions.npz", **preds)
    runs.append({"name": name, "overrides": overrides})


def test_a_run_changing_only_its_methods_key_is_a_variant_of_that_method_in_the_setting(tmp_path):
    import yaml
    from kdlib.analysis import sweep_results as sweep_analysis
    from kdlib.records.names import run_name
    seeds = {0: 0.0, 1: 2.0, 2: 1.0}
    runs = []
    for swap in ({}, {"teacher_resnet": [[0, 6]]}):
        shift = 5.0 * bool(swap)
        main_run = {"teacher_class_swap": swap, "methods": ["camkd", "vanilla", "scratch"], "seeds": [0, 1, 2]}
        fake_run(tmp_path, run_name(main_run), main_run,
                 {"camkd": {s: 80 + d - shift for s, d in seeds.items()},
                  "vanilla": {s: 79 + d - shift for s, d in seeds.items()},
                  "scratch": {s: 75 + d for s, d in seeds.items()}}, runs)
        for s in seeds:  # CAMKD's weighting alone: one run per seed
            variant = {"teacher_class_swap": swap, "methods": ["camkd"], "beta": 0.0, "seeds": [s]}
            fake_run(tmp_path, run_name(variant), variant, {"camkd": {s: 83 + seeds[s] - shift}}, runs)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))
    res = sweep_analysis.load(tmp_path)
    assert res.keys == ["teacher_class_swap"] and res.variant_keys == {"beta": 100.0}
    assert set(res.frame["method"]) == {"camkd", "camkd[beta=0]", "vanilla", "scratch"}
    assert set(res.frame["teacher_class_swap"]) == {"", "teacher_resnet-0-6"}
    diffs = sweep_analysis.differences(res).set_index(["teacher_class_swap", "pair"])
    d = diffs.loc[("teacher_resnet-0-6", "camkd - camkd[beta=0]")]  # listed right after camkd
    assert d["seeds"] == 3 and d["mean_diff"] == pytest.approx(-3.0) and d["only_b_correct"] == 9
    assert diffs.loc[("", "camkd[beta=0] - scratch"), "mean_diff"] == pytest.approx(8.0)
    table = sweep_analysis.run_table(res)
    assert list(table["setting"]) == ["teacher_class_swap=", "teacher_class_swap=teacher_resnet-0-6"]
    assert "CAMKD (beta 0) accuracy %" in table.columns and list(table["seeds"]) == [3, 3]
    assert sweep_analysis.setting_label("teacher_class_swap=x,methods=camkd,beta=0,seeds=1", {"beta": 100.0}) == \
        "teacher_class_swap=x"
    # a key that runs of other methods also change is a setting, as before
    assert sweep_analysis.variant_keys({"a": validate({"beta": 0.0}), "b": validate({})}) == {}


@pytest.mark.slow
def test_teachers_training_errors_are_computed_once_per_checkpoint(tmp_path, monkeypatch):
    import json
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "run")))
    book.train_teachers(P, log=lambda *a: None)
    first = json.loads((tmp_path / "run" / "teachers.json").read_text())["teachers"]
    kept = sorted((tmp_path / "t" / "FashionMNIST" / "train_errors").glob("*.json"))
    assert [p.name.split("-")[0] for p in kept] == ["teacher_cnn1", "teacher_resnet"]

    def no_pass(*a, **k):
        raise AssertionError("a second pass over the training images")

    monkeypatch.setattr(book, "predict_logits", no_pass)
    book.train_teachers(dict(P, run_dir=str(tmp_path / "run2")), log=lambda *a: None)
    again = json.loads((tmp_path / "run2" / "teachers.json").read_text())["teachers"]
    assert [(t["train_wrong"], t["confidently_wrong"]) for t in again] == \
        [(t["train_wrong"], t["confidently_wrong"]) for t in first]


def test_quality_block_reads_accuracy_differences_and_weights_from_the_records(tmp_path):
    """The teacher-quality block (kdlib.publish.pages --quality): each number against one
    computed here from the fake records; an unfinished run is left out and counted."""
    import yaml
    from scipy import stats as st
    from kdlib.analysis import teacher_quality as quality, cells as reading
    from kdlib.publish import pages as report
    from kdlib.records.names import run_name
    runs = []
    d = {0: 0.0, 1: 1.5, 2: 0.5}
    swap = {"teacher_resnet": [[0, 6], [2, 4]]}
    tw = {s: {"mean": [0.4, 0.4, 0.2], "wrong": [0.5, None, 0.01 * (s + 1)], "right": [0.3, 0.4, 0.3],
              "wrong_share": [4.0, 0.0, 40.0]} for s in d}
    for setting, shift in (({}, 0.5), ({"teacher_class_swap": swap}, 1.0)):
        main_run = dict(setting, methods=["camkd", "vanilla", "label_smoothing", "scratch"], seeds=[0, 1, 2])
        fake_run(tmp_path, run_name(main_run), main_run,
                 {"camkd": {s: 80 + shift + x * (1 + shift) for s, x in d.items()},
                  "vanilla": {s: 80 + x for s, x in d.items()},
                  "label_smoothing": {s: 81 + x / 2 for s, x in d.items()},
                  "scratch": {s: 79 + x for s, x in d.items()}}, runs, weights={"camkd": tw})
    for s in d:  # the weighting alone, one run per seed; seed 2's has not finished
        variant = {"teacher_class_swap": swap, "methods": ["camkd"], "beta": 0.0, "seeds": [s]}
        fake_run(tmp_path, run_name(variant), variant, {"camkd": {s: 82.0 + s}}, runs, weights={"camkd": tw},
                 status="finished" if s < 2 else "running")
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))
    (tmp_path / "sweep.json").write_text("{}")

    s = quality.Settings(tmp_path)
    assert (s.finished_runs, s.total_runs, s.full) == (4, 5, 3)
    assert [quality.short_name(s.params[c]) for c in s.columns] == ["shipped", "swapped resnet"]
    shipped, swapped = s.columns
    cam = [81 + x * 2 for x in d.values()]
    van = [80 + x for x in d.values()]
    t = st.ttest_rel(cam, van)
    p = s.pair(swapped, "camkd", "vanilla")
    half = st.t.ppf(0.975, 2) * st.sem([a - b for a, b in zip(cam, van)])
    assert p["mean_diff"] == pytest.approx(1 + 2 / 3) and p["p_value"] == pytest.approx(t.pvalue)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((1 + 2 / 3 - half, 1 + 2 / 3 + half))
    back = s.pair(swapped, "vanilla", "camkd")  # the other way round: negated, interval flipped
    assert (back["mean_diff"], back["ci_low"]) == pytest.approx((-p["mean_diff"], -p["ci_high"]))
    assert s.best_kd(shipped) == "camkd" and s.best_kd(swapped) == "camkd[beta=0]"  # 82.5 over two seeds
    w = s.weights(swapped, "camkd")["teacher_resnet"]
    assert (w["wrong"], w["right"], w["seeds"]) == pytest.approx((0.02, 0.3, 3))
    assert s.weights(swapped, "camkd")["teacher_cnn2"]["wrong"] != s.weights(swapped, "camkd")["teacher_cnn2"]["wrong"]

    text = quality.markdown(tmp_path)
    assert "**4 of 5 runs finished**" in text
    assert "teacher_resnet with classes 0↔6, 2↔4 swapped" in text and "resnet 62.0" in text
    blocks, rows = [], None
    for line in text.splitlines():
        if line.startswith("| ") and rows is None:
            rows = {}
            blocks.append(rows)
        if line.startswith("| "):
            rows[line.split(" | ")[0].strip("| ")] = line.strip("| ").split(" | ")[1:]
        elif not line.startswith("|"):
            rows = None
    accuracy, diffs, weights = blocks
    assert accuracy["CAMKD (beta 0)"][0] == "—"  # not run in the shipped setting
    assert accuracy["CAMKD (beta 0)"][1] == "82.50<br>(76.15\xa0to\xa088.85)<br>[2\xa0seeds]"
    assert accuracy["vanilla"][1].startswith(f"{sum(van) / 3:.2f}<br>(") and "seeds" not in accuracy["vanilla"][1]
    # Holm over the block's family: shipped 2 methods with teachers x (scratch, label smoothing) + CAMKD − vanilla
    # + label smoothing − scratch = 6; swapped 3 x 2 + 2 CAMKD forms − vanilla + 1 = 9
    family = s.family()
    assert len(family) == 15
    raw = sorted(f["p_value"] for f in family.values())
    k = min(range(len(raw)), key=lambda j: abs(raw[j] - t.pvalue))
    holm = max(min(1, (15 - j) * raw[j]) for j in range(k + 1))
    assert s.read_pair(swapped, "camkd", "vanilla")["p_holm"] == pytest.approx(holm)
    word = reading.word(p["ci_low"], p["ci_high"], 3)
    cell = f"{p['mean_diff']:+.2f}<br>({p['ci_low']:+.2f}\xa0to\xa0{p['ci_high']:+.2f})"
    assert diffs["CAMKD − vanilla"][1] == cell + ("\xa0\\*" if holm < 0.05 else "") + f"<br>*{word}*"
    assert diffs["best with teachers − label smoothing"][1].startswith("CAMKD (beta 0):<br>")
    assert weights["CAMKD"] == ["0.40 / 0.40 / 0.20", "0.020 wrong<br>0.300 right"]
    assert weights["CAMKD (beta 0)"] == ["—", "0.015 wrong<br>0.300 right"]
    assert "- **swapped resnet**: CAMKD's weight on teacher_resnet is 0.020 on the 40.0 % of training images it " \
        "gets wrong and 0.300 on those it gets right (the other teachers: 0.40, 0.40 on average; 3 seeds)" in text
    # every method with teachers against scratch: CAMKD's shipped gains 1.5, 2.25, 1.75 by seed
    assert st.ttest_rel([80.5 + x * 1.5 for x in d.values()], [79 + x for x in d.values()]).pvalue < 0.05
    words = [reading.word(q["ci_low"], q["ci_high"], q["seeds"]) for c in s.columns
             for m in ("camkd", "camkd[beta=0]", "vanilla") if (q := s.pair(c, m, "scratch"))]
    assert len(words) == 5
    assert (f"- **A method with teachers against the student alone**: of 5 method-and-setting pairs, "
            f"{reading.count_words(words)}.") in text
    # the fake scratch and label-smoothing students score alike in both settings, seed by seed
    assert "they score the same to the last digit in every setting (6 pairs of runs)" in text
    moved = next(tmp_path.glob("teacher_class_swap=*,methods=camkd+vanilla+label_smoothing+scratch*")) / "metrics_scratch.json"
    m = json.loads(moved.read_text())
    m["runs"][1]["test_acc"] += 0.25
    moved.write_text(json.dumps(m))
    assert "they differ by up to 0.25 points between settings (6 pairs of runs)" in quality.markdown(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- teachers:start -->\nold\n<!-- teachers:end -->\n")
    report.main([str(tmp_path), "--quality", "--readme", str(readme), "--block", "teachers"])
    assert "**4 of 5 runs finished**" in readme.read_text() and "old" not in readme.read_text()


def test_quality_reading_says_where_each_other_weighting_puts_the_degraded_teacher(tmp_path):
    """EBKD (entropy) can trust a confidently wrong teacher more where it is wrong; the
    reading says so from the records, and says 'the same' for a weight that never moves."""
    import yaml
    from kdlib.analysis import teacher_quality as quality
    from kdlib.records.names import run_name
    runs = []
    swap = {"teacher_resnet": [[0, 6]]}
    ebkd = {s: {"mean": [0.8, 0.8, 0.4], "wrong": [None, None, 0.9 + 0.01 * s], "right": [0.8, 0.8, 0.35],
                "wrong_share": [0.0, 0.0, 20.0]} for s in (0, 1)}
    aekd = {s: {"mean": [0.6, 0.4, 0.0], "wrong": [None, None, 0.0], "right": [0.6, 0.4, 0.0],
                "wrong_share": [0.0, 0.0, 20.0]} for s in (0, 1)}
    run = {"teacher_class_swap": swap, "methods": ["ebkd", "aekd", "vanilla"], "seeds": [0, 1]}
    fake_run(tmp_path, run_name(run), run, {m: {0: 80.0, 1: 81.0} for m in ("ebkd", "aekd", "vanilla")}, runs,
             weights={"ebkd": ebkd, "aekd": aekd})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"runs": runs}))
    (tmp_path / "sweep.json").write_text("{}")
    text = quality.markdown(tmp_path)
    assert "- **swapped resnet**: EBKD's weight on teacher_resnet is higher where it is wrong (0.905) than where " \
        "it is right (0.350)." in text
    assert "- **swapped resnet**: AEKD's weight on teacher_resnet is the same where it is wrong and where it is " \
        "right (0.000)." in text
    assert "CAMKD's weight" not in text and "EBKD's to M − 1" in text
    assert "EBKD's weights come from the teachers' entropies alone" in text and "every CAMKD variant" not in text
