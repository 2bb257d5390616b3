"""Shared test helpers."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlib.data import DEBIAN_FASHION_MNIST, load_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY = ["-p", "train_subset=600", "-p", "test_subset=300", "-p", "teacher_epochs=1", "-p", "student_epochs=1",
        "-p", "seeds=[0]"]


def fashion_mnist_subset(tmp_path_factory, train_subset: int, test_subset: int):
    """A real Fashion-MNIST subset from Debian's package, or a skip naming the fix."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_dataset("FashionMNIST", tmp_path_factory.mktemp("fmnist"), train_subset=train_subset,
                        test_subset=test_subset, download=False)


@pytest.fixture(scope="session")
def tiny_book(tmp_path_factory):
    """The whole book through ``python -m kdlib run`` on a tiny real Fashion-MNIST subset
    (600/300 images, 1 epoch, seed 0), in a project root of its own (``KDBOOK_ROOT``):
    ``(run folder, project root, what the terminal showed)``."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    project = tmp_path_factory.mktemp("project")
    env = dict(os.environ, KDBOOK_ROOT=str(project),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "kdlib", "run", "params/smoke.yaml", "--name", "tiny",
                           "--outputs", str(project / "outputs"), *TINY], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return project / "outputs" / "tiny", project, proc.stdout
