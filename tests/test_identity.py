"""Checkpoint identity: the settings that make a trained model, from one place.

Every schema key is classified (teacher, student, both, or neither); changing a key
changes exactly the identities it should, and a stale checkpoint in a run folder is
refused with the differing key named (or replaced, and said so, in outputs/interactive).
"""
import pytest

from kdlib.book import steps as book
from kdlib.train.checkpoint import CheckpointMismatch
from kdlib.book.params import SCHEMA, student_identity, teacher_identity, validate

ALT = {  # a valid value other than the default, for every key
    "dataset": "MNIST", "data_root": "elsewhere", "train_subset": 1000, "test_subset": 500, "val_subset": 100,
    "teachers": ["teacher_cnn1", "teacher_vgg"], "teacher_epochs": 3, "teacher_seed": 1, "teacher_dir": "t",
    "student_epochs": 3, "methods": ["vanilla"], "seeds": [5], "batch_size": 64, "lr": 0.01,
    "lr_schedule": "constant", "teacher_lr_schedule": "constant", "weight_decay": 0.1, "temperature": 2.0,
    "alpha": 0.5, "beta": 10.0, "hint_layer": -3, "fidelity_freq": 2, "precision": "bf16", "augment": "crop",
    "cache_teachers": False, "compile": True, "device": "cpu", "threads": 1, "run_dir": "outputs/x",
    "teacher_augment": "crop_flip", "labelled_subset": 500, "camkd_form": "official", "label_smoothing": 0.2,
    "teacher_label_noise": {"teacher_cnn1": 0.4}, "teacher_class_swap": {"teacher_cnn1": [[0, 6]]},
    "student_width": 0.5, "image_size": 12, "data_mean": [0.5, 0.5, 0.5], "data_std": [0.25, 0.25, 0.25],
    "data_memory_mb": 100, "code_dir": "elsewhere", "student": {"model": "mynets:Small", "hint": "features"},
}
IMAGE_KEYS = ("image_size", "data_mean", "data_std")  # keys of an ImageFolder: changed beside one
TEACHER_KEYS = {"dataset", "train_subset", "test_subset", "teacher_epochs", "teacher_seed", "batch_size", "lr",
                "lr_schedule", "teacher_lr_schedule", "weight_decay", "precision", "augment", "teacher_augment",
                "teacher_label_noise", "teacher_class_swap", *IMAGE_KEYS}
STUDENT_KEYS = {"dataset", "train_subset", "test_subset", "val_subset", "teachers", "student_epochs", "batch_size",
                "lr", "lr_schedule", "weight_decay", "temperature", "alpha", "beta", "hint_layer", "precision",
                "augment", "cache_teachers", "labelled_subset", "camkd_form", "student_width",
                "label_smoothing", "student", *IMAGE_KEYS}


def identities(params: dict):
    P = validate(dict(params))
    sha = {n: f"sha-{n}" for n in P["teachers"]}
    return teacher_identity(P, "teacher_cnn1"), student_identity(P, "camkd", 0, sha)


def test_every_key_is_covered_by_the_table():
    assert set(ALT) == set(SCHEMA), "classify the new key: add it to ALT (and TEACHER_KEYS/STUDENT_KEYS)"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of 16x16 RGB images, for the keys of an ImageFolder."""
    from test_image_folder import make_folder
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_changing_a_key_changes_exactly_the_identities_it_determines(key, image_folder):
    assert ALT[key] != SCHEMA[key].default
    base = {"dataset": "ImageFolder", "data_root": str(image_folder)} if key in IMAGE_KEYS else {}
    base_teacher, base_student = identities(base)
    teacher, student = identities({**base, key: ALT[key]})
    assert (teacher != base_teacher) == (key in TEACHER_KEYS), key
    assert (student != base_student) == (key in STUDENT_KEYS), key


def test_keys_that_do_not_affect_training_are_outside_every_identity():
    for key in ("fidelity_freq", "threads", "run_dir", "teacher_dir", "data_root", "device", "compile",
                "data_memory_mb", "code_dir"):
        assert key not in TEACHER_KEYS | STUDENT_KEYS


def test_teachers_follow_their_own_schedule_when_it_is_set():
    fixed = {"teacher_lr_schedule": "cosine"}
    assert identities(fixed)[0] == identities(dict(fixed, lr_schedule="constant"))[0]
    assert identities({})[0] == identities(fixed)[0]          # 'same' as cosine is cosine
    assert identities({})[0]["lr_schedule"] == "cosine" and "teacher_lr_schedule" not in identities({})[0]


def test_teachers_follow_their_own_augmentation_when_it_is_set():
    """Students may train on shifted views while reusing teachers trained without them:
    the teachers' identity holds the augmentation they actually saw, under ``augment``."""
    own = {"teacher_augment": "none"}
    assert identities(dict(own, augment="crop"))[0] == identities({})[0]   # same teachers as the default's
    assert identities(dict(own, augment="crop"))[1] != identities(own)[1]  # other students
    assert identities({"teacher_augment": "crop"})[0] == identities({"augment": "crop"})[0]
    assert identities({"augment": "crop"})[0]["augment"] == "crop" and "teacher_augment" not in identities({})[0]


def test_a_retrained_teacher_changes_the_students_identity():
    P = validate({})
    sha = {n: f"sha-{n}" for n in P["teachers"]}
    before = student_identity(P, "vanilla", 0, sha)
    after = student_identity(P, "vanilla", 0, dict(sha, teacher_resnet="other"))
    assert before != after and before["teacher_sha256"][:2] == after["teacher_sha256"][:2]
    assert student_identity(P, "vanilla", 1, sha) != before != student_identity(P, "scratch", 0, sha)


def test_teacher_checkpoint_name_follows_the_identity():
    P, Q = validate({}), validate({"teacher_epochs": 3, "threads": 1})
    assert book.teacher_checkpoint(P, "teacher_cnn1") != book.teacher_checkpoint(Q, "teacher_cnn1")
    assert book.teacher_checkpoint(Q, "teacher_cnn1") == book.teacher_checkpoint(dict(Q, threads=2), "teacher_cnn1")
    assert book.teacher_checkpoint(P, "teacher_cnn1").parent.name == "FashionMNIST"


TINY = {"train_subset": 300, "test_subset": 100, "teachers": ["teacher_resnet"], "methods": ["vanilla"],
        "teacher_epochs": 1, "student_epochs": 1, "threads": 1}


@pytest.mark.slow
def test_stale_student_in_a_run_folder_is_refused_naming_the_key(tmp_path):
    """The bug this replaces: notebook 02 run twice into one folder, the second time with
    another weight_decay, reused the first run's student and reported it as the new one."""
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "run")))
    quiet = lambda *a: None
    first = book.distill_students(P, log=quiet)["vanilla"]["runs"][0]["history"]
    with pytest.raises(CheckpointMismatch) as err:
        book.distill_students(dict(P, weight_decay=0.05), log=quiet)
    msg = str(err.value)
    assert "weight_decay: file has 0.0, expected 0.05" in msg and "student_vanilla_seed0.pt" in msg
    # the same settings reuse the finished student
    said = []
    again = book.distill_students(P, log=said.append)["vanilla"]["runs"][0]["history"]
    assert again == first and any("reusing finished checkpoint" in m for m in said)


@pytest.mark.slow
def test_interactive_folder_replaces_a_stale_student_and_says_so(tmp_path):
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "interactive")))
    book.distill_students(P, log=lambda *a: None)
    said = []
    book.distill_students(dict(P, alpha=0.3), log=said.append)
    line = next(m for m in said if "training afresh" in m)
    assert "alpha: file has 0.7, expected 0.3" in line


@pytest.mark.slow
def test_shipped_teachers_are_found_reused_and_hold_no_optimizer(tmp_path, monkeypatch):
    """A teacher trained once and shipped (weights, identity, history) is what any run with
    the same settings uses, from any teacher_dir, without training again."""
    import torch
    monkeypatch.setattr(book, "REFERENCE_TEACHERS", tmp_path / "reference_teachers")
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "run")))
    book.train_teachers(P, log=lambda *a: None)
    [shipped] = book.ship_teachers(P, log=lambda *a: None)
    state = torch.load(shipped, weights_only=True)
    assert set(state) == {"identity", "model", "extra", "history", "epoch", "finished"}
    Q = dict(P, teacher_dir=str(tmp_path / "empty"), run_dir=str(tmp_path / "run2"))
    assert book.teacher_checkpoint(Q, "teacher_resnet") == shipped
    said = []
    book.train_teachers(Q, log=said.append)
    assert any("reusing finished checkpoint" in m for m in said)
    assert not list((tmp_path / "empty").rglob("*.pt"))  # nothing trained (only the teacher's training errors kept)
    # used read-only: no lock file left in the shipped folder (which may not be writable)
    assert sorted(p.name for p in shipped.parent.iterdir()) == [shipped.name]
