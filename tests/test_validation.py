"""The validation split for tuning (``val_subset``) and the teachers' own schedule."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdlib.book import steps as book
from kdlib.train.data import holdout_validation
from kdlib.book.params import ParamsError, validate

from conftest import fashion_mnist_subset

quiet = lambda *a: None


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return fashion_mnist_subset(tmp_path_factory, 3000, 500)


def rows(split) -> set[bytes]:
    return {img.numpy().tobytes() + bytes([int(y)]) for img, y in zip(split.images, split.labels)}


def test_holdout_is_disjoint_balanced_and_leaves_the_test_set_alone(fmnist):
    d = holdout_validation(fmnist, 1000)
    assert (len(d.train), len(d.test)) == (2000, 1000)
    assert d.eval_split == "validation" and fmnist.eval_split == "test"
    assert torch.bincount(d.test.labels, minlength=10).tolist() == [100] * 10
    assert not rows(d.train) & rows(d.test)                       # no image in both
    assert rows(d.train) | rows(d.test) == rows(fmnist.train)     # nothing lost, nothing from the test set
    assert not rows(d.test) & rows(fmnist.test)
    again = holdout_validation(fmnist, 1000)
    assert torch.equal(again.test.images, d.test.images)          # the same images in every run


def test_holdout_off_and_too_large(fmnist):
    assert holdout_validation(fmnist, 0) is fmnist
    with pytest.raises(ValueError, match="val_subset: 3000 .* only 3000"):
        holdout_validation(fmnist, 3000)


def test_val_subset_larger_than_train_subset_refused():
    with pytest.raises(ParamsError, match="val_subset: 500 .* smaller than train_subset"):
        validate({"train_subset": 500, "val_subset": 500}, "p.yaml")


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_book_scores_students_on_the_validation_split(fmnist, tmp_path, restore_threads):
    P = validate({"train_subset": 600, "test_subset": 200, "val_subset": 100, "teachers": ["teacher_cnn1"],
                  "teacher_epochs": 1, "teacher_dir": str(tmp_path / "t"), "student_epochs": 2,
                  "methods": ["vanilla"], "seeds": [0], "batch_size": 100, "lr_schedule": "cosine",
                  "teacher_lr_schedule": "constant", "threads": 1, "run_dir": str(tmp_path / "run"),
                  "data_root": str(tmp_path / "data")})
    (tmp_path / "run").mkdir()
    result = book.distill_students(P, log=quiet)["vanilla"]
    assert (result["eval_split"], result["train_size"], result["eval_size"]) == ("validation", 500, 100)
    with np.load(tmp_path / "run" / "predictions.npz") as npz:
        assert len(npz["labels"]) == len(npz["vanilla/seed0"]) == 100
    # teachers trained on all 600 training images with their own (constant) schedule ...
    teacher = json.loads((tmp_path / "run" / "teachers.json").read_text())["teachers"][0]
    assert teacher["history"][0]["lr"] == pytest.approx(1e-3)
    # ... students on the other 500 with cosine decay: the last epoch's lr is near 0
    history = result["runs"][0]["history"]
    assert history[0]["lr"] == pytest.approx(0.5e-3 * (1 + np.cos(np.pi * 4 / 10)))  # step 4 of 10
    assert history[-1]["lr"] == pytest.approx(0.5e-3 * (1 + np.cos(np.pi * 9 / 10)))  # step 9 of 10
