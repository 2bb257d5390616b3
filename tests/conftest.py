"""Shared test helpers and the isolation every test gets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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

ROOT = Path(__file__).resolve().parent.parent
SMOKE_SIZE = ["-p", "train_subset=1000", "-p", "test_subset=500"]


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
@pytest.fixture(scope="session")
def smoke_book(tmp_path_factory):
    """The whole book through ``python -m kdlib run params/smoke.yaml`` on a small real
    Fashion-MNIST subset (SMOKE_SIZE: 1,000/500 images; the file's 2 teacher and student
    epochs, 3 teachers, 3 methods, seeds 0 and 1), in a project root of its own
    (``KDBOOK_ROOT``), run once for every test that reads a whole book's record:
    ``(run folder, project root, what the terminal showed: stdout and stderr as one stream)``."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    project = tmp_path_factory.mktemp("project")
    env = dict(os.environ, KDBOOK_ROOT=str(project),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "kdlib", "run", "params/smoke.yaml",
                           "--outputs", str(project / "outputs"), *SMOKE_SIZE], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return project / "outputs" / "smoke", project, proc.stdout
