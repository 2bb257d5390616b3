"""Datasets in memory: real Fashion-MNIST, tiny generated MNIST/CIFAR-10 files in
torchvision's on-disk layout, subsets, normalisation, batch order, augmentation."""
from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import kdlib.train.data as data_mod
from kdlib.train.data import (DATASETS, DEBIAN_FASHION_MNIST, DataNotFoundError, augment_batch, balanced_subset,
                        batch_order, load_dataset, normalize)


def read_idx_gz(path):
    """Independent IDX reader: big-endian header, then uint8 payload."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = struct.unpack(">I", raw[:4])[0]
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory):
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def fmnist(fmnist_root):
    d = load_dataset("FashionMNIST", fmnist_root, download=False)
    # staged where torchvision looks for it
    assert (fmnist_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    return d


# --------------------------------------------------------------------------- Fashion-MNIST
def test_real_fashion_mnist_loads(fmnist):
    d = fmnist
    assert (len(d.train), len(d.test)) == (60000, 10000)
    assert d.train.images.shape == (60000, 1, 28, 28) and d.test.images.shape == (10000, 1, 28, 28)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    assert (d.in_channels, d.image_size, d.num_classes) == (1, 28, 10)
    assert d.classes[9] == "Ankle boot"
    assert torch.bincount(d.train.labels).tolist() == [6000] * 10
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10
    # the same bytes as an independent read of the Debian package's IDX files
    np.testing.assert_array_equal(d.train.images[:, 0].numpy(),
                                  read_idx_gz(DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(d.test.labels.numpy(),
                                  read_idx_gz(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"))
    assert d.train.labels[0].item() == 9            # the well-known first sample: an ankle boot


def test_load_subset_is_balanced(fmnist, fmnist_root):
    sub = load_dataset("FashionMNIST", fmnist_root, train_subset=1000, test_subset=200, download=False)
    assert (len(sub.train), len(sub.test)) == (1000, 200)
    assert torch.bincount(sub.train.labels).tolist() == [100] * 10
    idx = balanced_subset(fmnist.train.labels, 1000)
    assert torch.equal(sub.train.images, fmnist.train.images[idx])


# --------------------------------------------------------------------------- subsets
def test_balanced_subset_balanced_and_deterministic():
    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([50, 80, 120, 40, 300])])
    labels = labels[torch.randperm(len(labels), generator=gen)]
    idx = balanced_subset(labels, 103, seed=7)
    assert len(idx) == 103 and len(set(idx.tolist())) == 103
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx]).tolist() == [21, 21, 21, 20, 20]   # remainder to first classes
    assert torch.equal(idx, balanced_subset(labels, 103, seed=7))
    other = balanced_subset(labels, 103, seed=8)
    assert not torch.equal(idx, other)
    assert torch.bincount(labels[other]).tolist() == [21, 21, 21, 20, 20]
    # 0 or >= N: everything
    assert torch.equal(balanced_subset(labels, 0), torch.arange(len(labels)))
    assert torch.equal(balanced_subset(labels, len(labels)), torch.arange(len(labels)))


# --------------------------------------------------------------------------- normalize
def test_normalize_real_data_standardised(fmnist):
    x = normalize(fmnist.train.images[:20000], fmnist.mean, fmnist.std)
    assert x.dtype == torch.float32 and x.shape == (20000, 1, 28, 28)
    assert abs(x.mean().item()) < 0.01
    assert abs(x.std().item() - 1) < 0.01
    # images were not modified in place
    assert fmnist.train.images.dtype == torch.uint8 and fmnist.train.images.max() == 255


def test_normalize_per_channel_exact():
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([torch.randint(0, 100, (64, 8, 8), generator=gen),
                          torch.randint(100, 256, (64, 8, 8), generator=gen),
                          torch.randint(0, 256, (64, 8, 8), generator=gen)], 1).to(torch.uint8)
    f = images.double() / 255
    mean, std = f.mean((0, 2, 3)).float(), f.std((0, 2, 3)).float()
    x = normalize(images, mean, std)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), rtol=0, atol=1e-5)
    cl = normalize(images, mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, x)


# --------------------------------------------------------------------------- batch order
def test_batch_order():
    a = batch_order(103, 10, seed=0, epoch=0)
    assert [len(b) for b in a] == [10] * 10 + [3]
    assert torch.equal(torch.cat(a).sort().values, torch.arange(103))      # every index once
    assert all(torch.equal(x, y) for x, y in zip(a, batch_order(103, 10, seed=0, epoch=0)))
    assert not torch.equal(torch.cat(a), torch.cat(batch_order(103, 10, seed=0, epoch=1)))
    assert not torch.equal(torch.cat(a), torch.cat(batch_order(103, 10, seed=1, epoch=0)))
    assert torch.equal(torch.cat(batch_order(103, 10, 5, 3, shuffle=False)), torch.arange(103))


# --------------------------------------------------------------------------- MNIST (generated)
def write_idx(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def test_mnist_loader_on_generated_idx(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", images)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels)
        arrays[split] = images, labels
    d = load_dataset("MNIST", tmp_path, download=False)
    assert d.name == "MNIST" and d.classes == [str(i) for i in range(10)]
    assert d.train.images.shape == (30, 1, 28, 28) and d.train.images.dtype == torch.uint8
    np.testing.assert_array_equal(d.train.images[:, 0].numpy(), arrays["train"][0])
    np.testing.assert_array_equal(d.test.images[:, 0].numpy(), arrays["t10k"][0])
    np.testing.assert_array_equal(d.test.labels.numpy(), arrays["t10k"][1])
    assert d.test.labels.dtype == torch.int64
    torch.testing.assert_close(d.mean, torch.tensor(DATASETS["MNIST"][3]))
    sub = load_dataset("MNIST", tmp_path, train_subset=10, download=False)
    assert torch.bincount(sub.train.labels).tolist() == [1] * 10
    # the direct IDX read gives what torchvision's own MNIST class reads from the same files
    for train in (True, False):
        theirs = torchvision.datasets.MNIST(str(tmp_path), train=train, download=False)
        ours = d.train if train else d.test
        torch.testing.assert_close(ours.images[:, 0], theirs.data, rtol=0, atol=0)
        torch.testing.assert_close(ours.labels, theirs.targets, rtol=0, atol=0)


def test_cut_short_idx_file_refused_naming_it_and_the_fix(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 30), ("t10k", 20)):
        write_idx(raw / f"{split}-images-idx3-ubyte", np.zeros((n, 28, 28)))
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.zeros(n))
    cut = raw / "t10k-images-idx3-ubyte"
    cut.write_bytes(cut.read_bytes()[:-100])
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("MNIST", tmp_path, download=False)
    assert str(cut) in str(err.value) and "cut short" in str(err.value) and "fix: delete it" in str(err.value)
    assert "\n" not in str(err.value)


def test_fashion_mnist_loads_without_importing_torchvision(fmnist_root):
    """Importing torchvision costs seconds in every kernel and worker; the MNIST family is read
    without it (CIFAR-10 and downloads still go through torchvision)."""
    code = ("import sys, kdlib.train.data as d; x = d.load_dataset('FashionMNIST', sys.argv[1], train_subset=100, "
            "download=False); assert len(x.train) == 100; print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(fmnist_root)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- CIFAR-10 (generated)
def test_cifar10_loader_on_generated_batches(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = {}
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
        batches[name] = entry
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}))
    # torchvision verifies the md5 of the real CIFAR-10 files, which generated files cannot
    # match: skip that check (CIFAR10._check_integrity, and the module-level check_integrity
    # that CIFAR10._load_meta calls with batches.meta's md5), keeping only "file exists".
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: __import__("os").path.isfile(path))
    d = load_dataset("CIFAR10", tmp_path, download=False)
    assert (len(d.train), len(d.test)) == (20, 6)
    assert d.train.images.shape == (20, 3, 32, 32) and d.train.images.dtype == torch.uint8
    assert d.train.images.is_contiguous()
    train_data = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    np.testing.assert_array_equal(d.train.images.numpy(), train_data.reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(d.test.images.numpy(), batches["test_batch"]["data"].reshape(-1, 3, 32, 32))
    assert d.test.labels.tolist() == batches["test_batch"]["labels"]
    assert (d.in_channels, d.image_size, d.classes) == (3, 32, names)
    x = normalize(d.train.images, d.mean, d.std)
    assert x.shape == (20, 3, 32, 32)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_missing_data_raises_with_folder_and_fix(tmp_path, name):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(name, tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path) in msg and "fix:" in msg and "download disabled" in msg


def test_missing_fashion_mnist_names_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-dir")
    with pytest.raises(DataNotFoundError) as err:
        load_dataset("FashionMNIST", tmp_path / "root", download=False)
    msg = str(err.value)
    assert str(tmp_path / "root") in msg and str(tmp_path / "no-such-dir") in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        load_dataset("SVHN", tmp_path)
    for name in DATASETS:
        assert name in str(err.value)


# --------------------------------------------------------------------------- augmentation
def all_shifts(img, pad):
    """Every zero-filled translation of img [C,H,W] by (dy, dx) in [-pad, pad]^2."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    return [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]


def test_augment_batch_is_a_translation():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (32, 3, 10, 10), generator=gen, dtype=torch.uint8)  # no zeros
    out = augment_batch(images, torch.Generator().manual_seed(1), pad=2, flip=False)
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = set()
    for img, o in zip(images, out):
        matches = [k for k, s in enumerate(all_shifts(img, 2)) if torch.equal(o, s)]
        assert len(matches) == 1
        seen.add(divmod(matches[0], 5))         # (dy, dx) + 2
    # it does translate, with independent vertical and horizontal offsets
    assert len(seen) >= 10 and any(dy != dx for dy, dx in seen)
    again = augment_batch(images, torch.Generator().manual_seed(1), pad=2, flip=False)
    assert torch.equal(out, again)              # a function of the generator's seed


def test_augment_batch_pad0_preserves_content():
    images = torch.randint(1, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(0), pad=0, flip=False), images)
    out = augment_batch(images, torch.Generator().manual_seed(0), pad=0, flip=True)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    same = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 0 < sum(flipped) < 40
    # flips + shifts together: each output is a translation of the image or of its mirror
    out = augment_batch(images, torch.Generator().manual_seed(3), pad=1, flip=True)
    for img, o in zip(images, out):
        assert any(torch.equal(o, s) for s in all_shifts(img, 1) + all_shifts(img.flip(-1), 1))
