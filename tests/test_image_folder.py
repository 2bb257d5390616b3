"""A user's own images in torchvision's ImageFolder layout (kdlib.train.data.load_image_folder)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import kdlib.train.data as data_mod
from kdlib.train.data import (IMAGE_FOLDER, ImageFolderError, balanced_subset, image_geometry, list_image_folder,
                              load_dataset, load_image_folder)

COLOURS = {"dog": (200, 40, 40), "ant": (40, 200, 40), "cat": (40, 40, 200)}  # made in this (unsorted) order


def write_image(path, colour, size=16, mode="RGB", seed=0, fmt=None):
    """A ``size`` image (int, or (w, h)) of ``colour`` plus noise, saved to ``path``."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, dtype=np.int64)[None, None, :] + rng.integers(-30, 31, (h, w, 3)), 0, 255)
    im = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def make_folder(root, n_train=4, n_test=2, size=16, mode="RGB", classes=COLOURS):
    for split, n in (("train", n_train), ("test", n_test)):
        for k, (name, colour) in enumerate(classes.items()):
            for i in range(n):
                seed = 1000 * k + i + (500 if split == "test" else 0)
                write_image(root / split / name / f"{i:03d}.png", colour, size, mode, seed=seed)
    return root


def pixels_of(path, mode):
    """An image file's pixels as uint8 [C,H,W], decoded here with PIL and numpy."""
    a = np.asarray(Image.open(path).convert(mode))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def test_loads_images_labels_and_sorted_classes(tmp_path):
    root = make_folder(tmp_path / "imgs")
    d = load_image_folder(root)
    assert d.name == IMAGE_FOLDER and d.classes == ["ant", "cat", "dog"]
    assert d.train.images.shape == (12, 3, 16, 16) and d.test.images.shape == (6, 3, 16, 16)
    assert d.train.images.dtype == torch.uint8 and d.train.labels.dtype == torch.int64
    listing = list_image_folder(root)
    assert listing.train[0] == ("train/ant/000.png", 0) and listing.test[-1] == ("test/dog/001.png", 2)
    for split, files in ((d.train, listing.train), (d.test, listing.test)):
        assert split.labels.tolist() == [label for _, label in files]
        for i, (rel, label) in enumerate(files):
            assert rel.split("/")[1] == d.classes[label]
            assert np.array_equal(split.images[i].numpy(), pixels_of(root / rel, "RGB"))
    # each class's colour is where its label says
    means = d.train.images.float().mean(dim=(2, 3))
    for label, name in enumerate(d.classes):
        assert means[d.train.labels == label].mean(0).argmax() == int(np.argmax(COLOURS[name]))


def test_grayscale_and_resizing(tmp_path):
    root = make_folder(tmp_path / "gray", n_train=2, n_test=1, mode="L")
    assert image_geometry(list_image_folder(root)) == (1, 16)
    d = load_image_folder(root, image_size=8)
    assert d.train.images.shape == (6, 1, 8, 8) and d.mean.shape == (1,)
    rel = list_image_folder(root).train[0][0]
    expected = np.asarray(Image.open(root / rel).convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(d.train.images[0, 0].numpy(), expected)


def test_first_image_size_is_the_default_and_others_are_resized(tmp_path):
    root = make_folder(tmp_path / "mixed", n_train=2, n_test=1)
    jpeg = write_image(root / "train" / "dog" / "zzz.jpg", COLOURS["dog"], size=20, mode="L", fmt="JPEG")
    palette = write_image(root / "test" / "cat" / "zzz.png", COLOURS["cat"], mode="P")
    listing = list_image_folder(root)
    assert image_geometry(listing) == (3, 16) and image_geometry(listing, 24) == (3, 24)
    d = load_image_folder(root)
    assert d.train.images.shape == (7, 3, 16, 16)
    i = [rel for rel, _ in listing.train].index("train/dog/zzz.jpg")
    expected = np.asarray(Image.open(jpeg).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(d.train.images[i].numpy(), expected.transpose(2, 0, 1))
    j = [rel for rel, _ in listing.test].index("test/cat/zzz.png")
    assert np.array_equal(d.test.images[j].numpy(), pixels_of(palette, "RGB"))


def test_sixteen_bit_grayscale_keeps_its_top_bits(tmp_path):
    root = make_folder(tmp_path / "deep", n_train=1, n_test=1, mode="L")
    values = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(values).save(root / "train" / "ant" / "000.png")
    assert Image.open(root / "train" / "ant" / "000.png").mode.startswith("I;16")
    d = load_image_folder(root)
    assert d.in_channels == 1
    assert np.array_equal(d.train.images[0, 0].numpy(), (values >> 8).astype(np.uint8))


def test_mean_and_std_are_the_training_pixels(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_train=3, n_test=1)
    d = load_image_folder(root)
    pixels = np.stack([pixels_of(root / rel, "RGB") for rel, _ in list_image_folder(root).train]) / 255.0
    assert d.mean.dtype == torch.float32 and d.std.dtype == torch.float32
    np.testing.assert_allclose(d.mean.numpy(), pixels.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(d.std.numpy(), pixels.std(axis=(0, 2, 3)), rtol=1e-6)
    sub = load_image_folder(root, train_subset=3)  # over the kept images only
    kept = np.stack([pixels_of(root / rel, "RGB") for rel, _ in (list_image_folder(root).train[i] for i in
                     balanced_subset(torch.tensor([0] * 3 + [1] * 3 + [2] * 3), 3).tolist())]) / 255.0
    np.testing.assert_allclose(sub.mean.numpy(), kept.mean(axis=(0, 2, 3)), rtol=1e-6)
    given = load_image_folder(root, mean=[0.5, 0.25, 0.125], std=(0.2, 0.3, 0.4))
    assert given.mean.tolist() == [0.5, 0.25, 0.125]
    np.testing.assert_allclose(given.std.numpy(), [0.2, 0.3, 0.4])
    half = load_image_folder(root, std=[0.2, 0.3, 0.4])  # the mean still from the images
    assert torch.equal(half.mean, d.mean)
    monkeypatch.setattr(data_mod, "_decode", lambda *a, **k: pytest.fail("decoded before checking data_mean/std"))
    for key, kwargs in (("data_mean", {"mean": [0.5]}), ("data_std", {"std": [0.2, 0.3]}), ("data_std", {"std": 0.2})):
        with pytest.raises(ImageFolderError) as err:
            load_image_folder(root, **kwargs)
        assert key in str(err.value) and "3 channels" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ImageFolderError, match="data_std.*<= 0"):
        load_image_folder(root, std=[0.2, 0.0, 0.4])


def test_subsets_are_balanced_and_chosen_before_decoding(tmp_path):
    root = make_folder(tmp_path / "imgs", n_train=5, n_test=3)
    listing = list_image_folder(root)
    labels = torch.tensor([label for _, label in listing.train])
    kept = set(balanced_subset(labels, 6).tolist())
    skipped = next(i for i in range(1, len(labels)) if i not in kept)  # not the first: it sets the geometry
    (root / listing.train[skipped][0]).write_bytes(b"not an image")
    d = load_image_folder(root, train_subset=6, test_subset=3)
    assert torch.bincount(d.train.labels).tolist() == [2, 2, 2]
    assert torch.bincount(d.test.labels).tolist() == [1, 1, 1]
    with pytest.raises(ImageFolderError) as err:  # kept in full, the broken file is read
        load_image_folder(root)
    assert listing.train[skipped][0] in str(err.value) and "remove or replace" in str(err.value)


def test_memory_budget_is_checked_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_train=2, n_test=1)
    monkeypatch.setattr(data_mod, "_decode", lambda *a, **k: pytest.fail("decoded before the budget check"))
    with pytest.raises(ImageFolderError) as err:
        load_image_folder(root, image_size=1024, memory_mb=8)
    msg = str(err.value)
    assert "\n" not in msg and "9 images" in msg and "1024x1024" in msg and "3 channels" in msg
    assert "27 MiB" in msg and "8 MiB" in msg  # 9 images * 3 channels * 1024 * 1024 bytes
    for word in ("image_size", "train_subset", "test_subset", "data_memory_mb"):
        assert word in msg


def one_line_error(root, **kwargs) -> str:
    with pytest.raises(ImageFolderError) as err:
        load_image_folder(root, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs_are_one_line_naming_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    msg = one_line_error(tmp_path / "empty")
    assert "no train/ folder" in msg and str(tmp_path / "empty") in msg and "ImageFolder layout" in msg

    root = make_folder(tmp_path / "notest", n_train=1, n_test=1)
    shutil.rmtree(root / "test")
    assert "no test/ folder" in one_line_error(root)

    (tmp_path / "flat" / "test").mkdir(parents=True)
    write_image(tmp_path / "flat" / "train" / "loose.png", (0, 0, 0))
    assert "train/ has no class folders holding images" in one_line_error(tmp_path / "flat")

    root = make_folder(tmp_path / "emptyclass", n_train=1, n_test=1)
    (root / "train" / "eel").mkdir()
    assert "train/eel/" in one_line_error(root)

    root = make_folder(tmp_path / "extra", n_train=1, n_test=1)
    write_image(root / "test" / "bee" / "0.png", (0, 0, 0))
    msg = one_line_error(root)
    assert "test/bee/" in msg and "ant, cat, dog" in msg

    root = make_folder(tmp_path / "broken", n_train=1, n_test=1)
    (root / "test" / "cat" / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage\n\n")
    msg = one_line_error(root)
    assert "test/cat/000.png" in msg and "remove or replace" in msg

    root = make_folder(tmp_path / "wide", n_train=1, n_test=1, size=(20, 12))
    msg = one_line_error(root)
    assert "20x12" in msg and "image_size" in msg
    assert load_image_folder(root, image_size=10).train.images.shape == (3, 3, 10, 10)


def test_fingerprint_tells_folders_apart(tmp_path):
    a = make_folder(tmp_path / "a", n_train=2, n_test=1)
    b = make_folder(tmp_path / "elsewhere" / "b", n_train=2, n_test=1)
    fa = list_image_folder(a).fingerprint()
    assert len(fa) == 16 and fa == list_image_folder(b).fingerprint()
    write_image(a / "train" / "cat" / "new.png", COLOURS["cat"])
    listing = list_image_folder(a)  # the cached listing sees the new file
    assert len(listing.train) == 7 and listing.fingerprint() != fa


def test_load_dataset_dispatches(tmp_path):
    root = make_folder(tmp_path / "imgs", n_train=2, n_test=1)
    d = load_dataset("ImageFolder", root, image_size=8)
    assert d.name == "ImageFolder" and d.train.images.shape == (6, 3, 8, 8) and d.num_classes == 3
    assert len(load_dataset(IMAGE_FOLDER, root, train_subset=3, memory_mb=1).train) == 3
    with pytest.raises(ValueError, match="ImageFolder"):
        load_dataset("SVHN", root)
