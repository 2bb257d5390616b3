"""Shared test helpers and the isolation every test gets."""
from __future__ import annotations

import os

import pytest
import torch

from kdlib.data import DEBIAN_FASHION_MNIST, load_dataset
from kdlib.params import student_identity, teacher_identity, validate


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
