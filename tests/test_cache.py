"""The teacher-output cache: same results as live teachers, bypassed under augmentation,
and the device/bf16 path (used on GPUs) exercised on the CPU."""
import pytest
import torch

from kdlib.train import TrainConfig, teacher_bank, teacher_test_probs, train_student, train_teacher

from conftest import fashion_mnist_subset


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """params/smoke.yaml's data (2,000 / 1,000 real images) and two quickly trained teachers."""
    data = fashion_mnist_subset(tmp_path_factory, 2000, 1000)
    cfg = TrainConfig(epochs=1)
    teachers = [train_teacher(n, data, cfg, log=lambda *a: None)[0] for n in ("teacher_cnn1", "teacher_resnet")]
    return data, teachers


@pytest.mark.parametrize("method", ["vanilla", "camkd"])
def test_cached_and_live_runs_end_within_0_3_points(smoke, method):
    data, teachers = smoke
    cfg = TrainConfig(epochs=2, seed=0)
    names = ["teacher_cnn1", "teacher_resnet"]
    accs = {}
    for cache in (True, False):
        bank = teacher_bank(teachers, names, data, cfg, cache=cache, log=lambda *a: None)
        assert bank.cached is cache
        _, history = train_student(method, bank, data, cfg, log=lambda *a: None)
        accs[cache] = history[-1]["test_acc"]
    assert abs(accs[True] - accs[False]) <= 0.3, accs


def test_cache_bypassed_under_augmentation_and_said_so(smoke):
    data, teachers = smoke
    said = []
    bank = teacher_bank(teachers, ["teacher_cnn1", "teacher_resnet"], data, TrainConfig(augment="crop_flip"),
                        cache=True, log=said.append)
    assert not bank.cached and "bypassed" in said[0]


def test_cache_memory_is_reported(smoke):
    data, teachers = smoke
    bank = teacher_bank(teachers, ["teacher_cnn1", "teacher_resnet"], data, TrainConfig(), log=lambda *a: None)
    logits = 2 * (2000 + 1000) * 10 * 4
    hints = 2 * (2000 + 1000) * 64 * 7 * 7 * 2  # both teachers' hints are 64x7x7, stored in fp16
    assert bank.nbytes() == logits + hints


def test_device_and_bf16_path_runs_on_cpu(smoke):
    """The GPU path (data and cache on the device, bf16 autocast) through the same code."""
    data, teachers = smoke
    device = torch.device("cpu")
    data = data.to(device)
    cfg = TrainConfig(epochs=2, precision="bf16", device=str(device))  # epoch 2 runs the feature term
    bank = teacher_bank(teachers, ["teacher_cnn1", "teacher_resnet"], data, cfg, log=lambda *a: None)
    distiller, history = train_student("camkd", bank, data, cfg, test_probs=teacher_test_probs(bank, data, cfg),
                                       log=lambda *a: None)
    record = history[-1]  # against one-epoch teachers: far above chance (10%), not high
    assert record["test_acc"] > 30 and record["fidelity"]["centroid_agreement"] > 30, record
    assert all(torch.isfinite(torch.tensor(record[k])) for k in ("loss_ce", "loss_kd", "loss_feat"))
