"""The transfer-set regime (``labelled_subset``): the cross-entropy sees only the
labelled images, distillation sees every image, scratch trains on the labelled ones
only (as many steps per epoch); and CAMKD's weights measure a teacher against the
teachers' consensus where no label exists."""
import pytest
import torch
import torch.nn.functional as F

from kdlib.train.data import LABELLED_SEED, Dataset, Split, repeated_batch_order, with_labelled_subset
from kdlib.train.distillers import Distiller
from kdlib.train.losses import UNLABELLED, camkd_weights, consensus_targets, labelled_ce
from kdlib.book.params import ParamsError, validate
from kdlib.train.loop import TrainConfig, train_epoch


def toy_data(n=200, classes=10) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    split = Split(images, labels)
    return Dataset("FashionMNIST", split, Split(images[:50], labels[:50]), torch.tensor([0.5]),
                   torch.tensor([0.25]), [str(c) for c in range(classes)])


def test_labelled_ce_averages_over_labelled_samples_only():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 10, generator=gen, requires_grad=True)
    y = torch.tensor([3, UNLABELLED, 1, UNLABELLED, UNLABELLED, 9])
    keep = y >= 0
    # independent: log-softmax by hand over the labelled rows
    log_p = logits[keep] - logits[keep].exp().sum(1, keepdim=True).log()
    expected = -log_p[torch.arange(3), y[keep]].mean()
    got = labelled_ce(logits, y)
    assert torch.allclose(got, expected, atol=1e-6)
    got.backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(1) > 0)


def test_labelled_ce_is_plain_ce_when_all_labelled_and_zero_when_none():
    logits = torch.randn(5, 10, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4])
    assert torch.equal(labelled_ce(logits, y), F.cross_entropy(logits, y))
    none = labelled_ce(logits, torch.full((5,), UNLABELLED))
    none.backward()
    assert none.item() == 0 and torch.all(logits.grad == 0) and torch.isfinite(logits.grad).all()


def test_consensus_targets_fill_only_the_unlabelled():
    t = torch.zeros(2, 3, 10)
    t[0, :, 4] = 5.0        # teacher 0 says 4 for every sample
    t[1, :, 4] = 2.0        # teacher 1 too, less surely, ...
    t[1, 2, 7] = 9.0        # ... except on sample 2, where it says 7 with more weight
    y = torch.tensor([1, UNLABELLED, UNLABELLED])
    # sample 2: mean prob of 7 = (p0(7) + p1(7))/2 ~ (0.0006 + 0.999)/2 > that of 4
    assert consensus_targets(y, t).tolist() == [1, 4, 7]
    labelled = torch.tensor([1, 2, 3])
    assert consensus_targets(labelled, t) is labelled
    w = camkd_weights(t, consensus_targets(y, t))
    assert torch.allclose(w.sum(0), torch.ones(3))


def test_labelled_subset_is_balanced_fixed_and_refuses_too_many():
    data = toy_data(200)
    a, b = with_labelled_subset(data, 50), with_labelled_subset(data, 50)
    assert a.labelled.sum() == 50 and torch.equal(a.labelled, b.labelled)
    assert torch.bincount(data.train.labels[a.labelled], minlength=10).tolist() == [5] * 10
    assert with_labelled_subset(data, 0) is data and data.labelled is None
    assert a.to("cpu").labelled is not None
    with pytest.raises(ValueError, match="labelled_subset: 200 is not allowed"):
        with_labelled_subset(data, 200)
    assert LABELLED_SEED  # a fixed seed, independent of the run's


def test_repeated_batch_order_draws_an_epoch_from_the_given_indices():
    indices = torch.tensor([3, 8, 20, 41, 77])
    batches = repeated_batch_order(indices, 23, 4, seed=0, epoch=2)
    order = torch.cat(batches)
    assert len(order) == 23 and set(order.tolist()) == set(indices.tolist())
    for k in range(4):  # every full pass is a permutation of the indices
        assert sorted(order[5 * k:5 * k + 5].tolist()) == indices.tolist()
    assert torch.equal(order, torch.cat(repeated_batch_order(indices, 23, 4, seed=0, epoch=2)))
    assert not torch.equal(order, torch.cat(repeated_batch_order(indices, 23, 4, seed=0, epoch=3)))


class Spy(Distiller):
    """Records what each step receives; a linear student so the step is cheap."""

    def __init__(self, learns_from_teachers):
        super().__init__(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)))
        self.learns_from_teachers = learns_from_teachers
        self.seen = []

    def forward_train(self, x, y, idx, epoch):
        self.seen.append((idx.clone(), y.clone()))
        logits = self.student(x)
        return logits, {"ce": labelled_ce(logits, y)}


@pytest.mark.parametrize("learns_from_teachers", [True, False])
def test_train_epoch_masks_labels_or_keeps_to_the_labelled_images(learns_from_teachers):
    data = with_labelled_subset(toy_data(200), 30)
    cfg = TrainConfig(epochs=1, batch_size=16, channels_last=False)
    spy = Spy(learns_from_teachers)
    train_epoch(spy, torch.optim.Adam(spy.trainable_parameters()), data, cfg, 0, steps=13)
    idx = torch.cat([i for i, _ in spy.seen])
    y = torch.cat([t for _, t in spy.seen])
    assert len(idx) == 200  # the same number of samples (and steps) either way
    labelled = data.labelled[idx]
    if learns_from_teachers:  # every image once; unlabelled ones carry no label
        assert sorted(idx.tolist()) == list(range(200))
        assert torch.equal(y[labelled], data.train.labels[idx][labelled]) and torch.all(y[~labelled] == UNLABELLED)
    else:  # scratch: only the 30 labelled images, with their labels
        assert labelled.all() and set(idx.tolist()) == set(data.labelled.nonzero().flatten().tolist())
        assert torch.equal(y, data.train.labels[idx])


def test_params_refuse_a_labelled_subset_that_cannot_run():
    with pytest.raises(ParamsError, match="labelled_subset.*smaller than the students' 1900 training images"):
        validate({"train_subset": 2000, "val_subset": 100, "labelled_subset": 1900})
    with pytest.raises(ParamsError, match="labelled_subset.*at least one labelled image per class"):
        validate({"labelled_subset": 5})
    assert validate({"labelled_subset": 1000})["labelled_subset"] == 1000


TINY = {"train_subset": 600, "test_subset": 200, "teachers": ["teacher_cnn1", "teacher_resnet"],
        "methods": ["camkd", "vanilla", "scratch"], "teacher_epochs": 1, "student_epochs": 2, "threads": 1}


@pytest.mark.slow
def test_the_regimes_run_end_to_end_on_real_images(tmp_path):
    """The regimes sweep's non-default settings together, through the book on a real
    Fashion-MNIST subset: a transfer set, crop augmentation with un-augmented teachers
    (reused, and their view cache written once and reused by the next seed), and the
    official CA-MKD form."""
    from kdlib.book import steps as book
    P = validate(dict(TINY, teacher_dir=str(tmp_path / "t"), run_dir=str(tmp_path / "run"), labelled_subset=100,
                      augment="crop", teacher_augment="none", camkd_form="official", alpha=1.0, beta=50.0))
    plain = dict(P, augment="none", teacher_augment="same")
    assert all(book.teacher_checkpoint(P, n) == book.teacher_checkpoint(plain, n) for n in P["teachers"])
    said = []
    results = book.distill_students(P, log=said.append)
    assert any("cross-entropy sees 100 labelled images; distillation uses all 600" in m for m in said)
    assert any("teacher view cache: 2 teachers x 25 views of 600 images (crop)" in m for m in said)
    views = sorted((tmp_path / "t" / "FashionMNIST" / "views").glob("*.pt"))
    assert [v.name.split("-")[0] for v in views] == ["teacher_cnn1", "teacher_resnet"]
    for method, record in results.items():
        history = record["runs"][0]["history"]
        assert len(history) == 2 and 10 < history[-1]["test_acc"] <= 100, method
        assert record["hparams"]["labelled_subset"] == 100 and record["hparams"]["camkd_form"] == "official"
    assert results["camkd"]["runs"][0]["history"][-1]["loss_feat"] > 0  # the official feature term is on
    # vanilla read its teachers from the view cache; camkd's hint maps came from live teachers
    assert results["vanilla"]["teacher_cache"] and not results["camkd"]["teacher_cache"]
    stamps = [v.stat().st_mtime_ns for v in views]
    book.distill_students(dict(P, seeds=[1], methods=["vanilla"]), log=lambda *a: None)
    assert [v.stat().st_mtime_ns for v in views] == stamps  # the next seed read the view cache
