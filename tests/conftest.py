"""Shared test helpers."""
from __future__ import annotations

import pytest

from kdlib.data import DEBIAN_FASHION_MNIST, load_dataset


def fashion_mnist_subset(tmp_path_factory, train_subset: int, test_subset: int):
    """A real Fashion-MNIST subset from Debian's package, or a skip naming the fix."""
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return load_dataset("FashionMNIST", tmp_path_factory.mktemp("fmnist"), train_subset=train_subset,
                        test_subset=test_subset, download=False)
