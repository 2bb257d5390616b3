"""Datasets held in memory as uint8 tensors and served in batches by index.

The MNIST family's IDX files are read directly from torchvision's layout
(``data_root/<Name>/raw``); torchvision's dataset classes do the rest (CIFAR-10, and for a
user with internet the standard download into ``data_root``), imported only then, since
importing torchvision costs every kernel and worker up to seconds. After that nothing runs per sample: a split
is one ``[N, C, H, W]`` uint8 tensor, a batch is an index slice, and normalisation
(and optional augmentation) is done on the whole batch, as in airbench. A user's own
images (``IMAGE_FOLDER``, torchvision's ImageFolder layout) are decoded once with PIL
into the same form.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

DATASETS = {
    # name: (torchvision class name, channels, image size, per-channel mean, std)
    "FashionMNIST": ("FashionMNIST", 1, 28, (0.2860,), (0.3530,)),
    "MNIST": ("MNIST", 1, 28, (0.1307,), (0.3081,)),
    "CIFAR10": ("CIFAR10", 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
SPLIT_SIZES = {"FashionMNIST": (60000, 10000), "MNIST": (60000, 10000), "CIFAR10": (50000, 10000)}  # (train, test)
CLASS_NAMES = {
    "FashionMNIST": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
    "MNIST": [str(d) for d in range(10)],
    "CIFAR10": ["airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"],
}


class DataNotFoundError(RuntimeError):
    """Raised when a dataset is neither on disk nor downloadable."""


@dataclass
class Split:
    """One split in memory: ``images`` uint8 [N,C,H,W], ``labels`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    mean: torch.Tensor  # [C]
    std: torch.Tensor   # [C]
    classes: list[str]
    eval_split: str = "test"  # what ``test`` holds: the test set, or a validation split held out of train
    labelled: torch.Tensor | None = None  # bool [N_train]: the images whose labels students may use (None: all)

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.train.to(device), self.test.to(device),
                       self.mean.to(device), self.std.to(device), self.classes, self.eval_split,
                       None if self.labelled is None else self.labelled.to(device))


IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _stage_debian_fashion_mnist(root: Path) -> bool:
    """Unpack the Debian package's IDX .gz files where torchvision looks for them."""
    raw = root / "FashionMNIST" / "raw"
    names = [name for pair in IDX_FILES.values() for name in pair]
    if all((raw / n).is_file() for n in names):
        return True
    if not all((DEBIAN_FASHION_MNIST / f"{n}.gz").is_file() for n in names):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        tmp = raw / f"{n}.{os.getpid()}.tmp"  # processes staging at once (sweep workers) each write their own
        with gzip.open(DEBIAN_FASHION_MNIST / f"{n}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.replace(raw / n)
    return True


def _as_split(ds) -> Split:
    images = torch.as_tensor(ds.data)
    if images.ndim == 3:            # MNIST family: [N,H,W]
        images = images.unsqueeze(1)
    else:                           # CIFAR: [N,H,W,C] numpy
        images = images.permute(0, 3, 1, 2)
    return Split(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))


def _read_idx(path: Path) -> torch.Tensor:
    """An uncompressed IDX file of unsigned bytes (the MNIST family's format): a big-endian
    magic number 0x0000_08_NDIM, NDIM big-endian uint32 sizes, then the bytes."""
    raw = path.read_bytes()
    if len(raw) < 4 or raw[0:3] != b"\x00\x00\x08":
        raise DataNotFoundError(f"{path}: not an IDX file of unsigned bytes; fix: delete it, and it is "
                                "staged or downloaded again")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path}: {payload.size} bytes of data for shape {dims}, the file is cut short; "
                                "fix: delete it, and it is staged or downloaded again")
    return torch.from_numpy(payload.reshape(dims).copy())


def _read_idx_layout(name: str, root: Path) -> tuple[Split, Split] | None:
    """The MNIST family's splits from ``root/<Name>/raw``, as torchvision lays them out, or
    None when a file is missing (torchvision then downloads or names what is missing)."""
    raw = root / DATASETS[name][0] / "raw"
    files = [raw / f for pair in IDX_FILES.values() for f in pair]
    if name not in ("MNIST", "FashionMNIST") or not all(f.is_file() for f in files):
        return None
    splits = []
    for images_file, labels_file in IDX_FILES.values():
        images, labels = _read_idx(raw / images_file), _read_idx(raw / labels_file)
        splits.append(Split(images.unsqueeze(1).contiguous(), labels.long()))
    return splits[0], splits[1]


def _read_torchvision(name: str, root: Path, download: bool) -> tuple[Split, Split]:
    import torchvision  # here, not at the top: only CIFAR-10 and a download need it

    cls = getattr(torchvision.datasets, DATASETS[name][0])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as err:  # offline download (URLError, OSError) or missing/corrupt files
        searched = [str(root)] + ([str(DEBIAN_FASHION_MNIST)] if name == "FashionMNIST" else [])
        fix = ("install the Debian package: apt-get install -y dataset-fashion-mnist, "
               "or allow network access for torchvision's download" if name == "FashionMNIST"
               else "allow network access for torchvision's download, or put torchvision's files there")
        raise DataNotFoundError(
            f"{name} not found (searched {', '.join(searched)}; download "
            f"{'failed' if download else 'disabled'}: {type(err).__name__}: {err}); fix: {fix}") from None
    return _as_split(train), _as_split(test)


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a deterministic, class-balanced subset of ``n`` samples.

    Classes get ``n // C`` each (the remainder goes to the first classes); the choice
    within a class is a permutation seeded by ``seed``, independent of the run's seed,
    so every run and every method sees the same subset.
    """
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    classes = torch.unique(labels)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    picked = []
    for k, c in enumerate(classes):
        quota = n // len(classes) + (1 if k < n % len(classes) else 0)
        members = order[labels[order] == c]
        picked.append(members[:quota])
    return torch.cat(picked).sort().values


# --------------------------------------------------------------------------- a user's own images
IMAGE_FOLDER = "ImageFolder"
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "F")  # and the 16-bit "I;16*": one channel; every other mode RGB


class ImageFolderError(ValueError):
    """A bad ImageFolder input, in one line that names the path and the fix."""


def _layout(root) -> str:
    return (f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>, "
            "torchvision's ImageFolder layout")


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


@dataclass(frozen=True)
class ImageListing:
    """The images of an ImageFolder tree: paths relative to ``root`` ('/' separators) with
    labels indexing ``classes`` (the train/ class folders, sorted)."""

    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def fingerprint(self) -> str:
        """16 hex digits of a sha256 over the classes and every image's path and size."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:  # once per listing: every identity of a run asks for it
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for rel, label in self.train + self.test:
            h.update(f"\n{rel}\t{label}\t{(self.root / rel).stat().st_size}".encode())
        return h.hexdigest()[:16]


def _class_folders(split: Path) -> list[str]:
    """The class folder names of ``split``, sorted as torchvision sorts them (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(split) if e.is_dir() and not e.name.startswith("."))


def _class_images(root: Path, split: str, name: str) -> list[str]:
    """The images under ``root/split/name`` (recursively, as torchvision), relative to ``root``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    found = []
    for folder, _, files in sorted(os.walk(root / split / name, followlinks=True)):
        for f in sorted(files):
            if has_file_allowed_extension(f, IMG_EXTENSIONS):
                found.append(Path(folder, f).relative_to(root).as_posix())
    return found


def _folder_stamp(root: Path) -> tuple:
    """The mtimes of train/, test/ and their class folders: a change there lists again."""
    stamp = []
    for split in ("train", "test"):
        try:
            stamp.append((split, (root / split).stat().st_mtime_ns))
            stamp += [(e.name, e.stat().st_mtime_ns) for e in os.scandir(root / split) if e.is_dir()]
        except OSError:
            stamp.append((split, None))
    return tuple(stamp)


@functools.lru_cache(maxsize=8)
def _list_image_folder(path: str, stamp: tuple) -> ImageListing:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(path)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ImageFolderError(f"data_root {path!r}: no {split}/ folder ({_layout(path)})")
    exts = " ".join(IMG_EXTENSIONS)
    classes = _class_folders(root / "train")
    if not classes:
        raise ImageFolderError(f"data_root {path!r}: train/ has no class folders holding images "
                               f"({_layout(path)}; image files end in {exts})")
    train = []
    for label, name in enumerate(classes):
        images = _class_images(root, "train", name)
        if not images:
            raise ImageFolderError(f"data_root {path!r}: training class folder train/{name}/ holds no images "
                                   f"(files ending in {exts}); fix: add its images or remove the folder")
        train += [(rel, label) for rel in images]
    index = {name: k for k, name in enumerate(classes)}
    test = []
    for name in _class_folders(root / "test"):
        if name not in index:
            raise ImageFolderError(f"data_root {path!r}: test/{name}/ is not a training class (the training "
                                   f"classes are {', '.join(classes)}); fix: rename it to one of them, or add "
                                   f"train/{name}/ with its training images")
        test += [(rel, index[name]) for rel in _class_images(root, "test", name)]
    if not test:
        raise ImageFolderError(f"data_root {path!r}: test/ has no class folders holding images "
                               f"({_layout(path)}; image files end in {exts})")
    return ImageListing(root, classes, train, test)


def list_image_folder(root: str | Path) -> ImageListing:
    """The classes and images of ``root/train`` and ``root/test`` (torchvision's ImageFolder
    layout), listed once per state of their folders."""
    path = Path(root).expanduser().resolve()
    return _list_image_folder(str(path), _folder_stamp(path))


def _open_image(listing: ImageListing, rel: str):
    from PIL import Image

    try:
        return Image.open(listing.root / rel)
    except Exception as err:  # UnidentifiedImageError, OSError, DecompressionBombError, ...
        raise ImageFolderError(f"data_root '{listing.root}': cannot read image {rel} ({_one_line(err)}); "
                               "fix: remove or replace it") from None


def _is_grayscale(mode: str) -> bool:
    return mode in GRAYSCALE_MODES or mode.startswith("I;16")


def image_geometry(listing: ImageListing, image_size: int = 0) -> tuple[int, int]:
    """(channels, side) of the images as loaded: 1 channel if the first training image is
    grayscale, else 3 (RGB); side ``image_size``, or the first training image's (square) size."""
    rel = listing.train[0][0]
    with _open_image(listing, rel) as im:  # reads the header only
        mode, (w, h) = im.mode, im.size
    if not image_size and w != h:
        raise ImageFolderError(f"data_root '{listing.root}': image {rel} is {w}x{h}, not square; fix: give "
                               "image_size, and every image is resized to image_size x image_size")
    return (1 if _is_grayscale(mode) else 3), (image_size or w)


def _decode(listing: ImageListing, rel: str, channels: int, side: int, image_size: int) -> np.ndarray:
    """One image as uint8 [C, side, side]: converted to L or RGB, resized (bilinear) if needed."""
    from PIL import Image

    try:
        with _open_image(listing, rel) as im:
            w, h = im.size
            if not image_size and w != h:
                raise ImageFolderError(f"data_root '{listing.root}': image {rel} is {w}x{h}, not square; fix: "
                                       "give image_size, and every image is resized to image_size x image_size")
            if im.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits (convert would clip at 255)
                im = Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (side, side):
                im = im.resize((side, side), Image.Resampling.BILINEAR)
            pixels = np.asarray(im)
    except ImageFolderError:
        raise
    except Exception as err:  # truncated or corrupt data found while decoding
        raise ImageFolderError(f"data_root '{listing.root}': cannot read image {rel} ({_one_line(err)}); "
                               "fix: remove or replace it") from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population) of uint8 [N,C,H,W] on the [0,1] scale, from exact
    integer sums; a constant channel gets std 1."""
    c = images.shape[1]
    s, ss = torch.zeros(c, dtype=torch.int64), torch.zeros(c, dtype=torch.int64)
    for chunk in images.split(max(1, 2**22 // images[0].numel())):  # int64 chunks of at most 32 MiB
        x = chunk.to(torch.int64)
        s += x.sum(dim=(0, 2, 3))
        ss += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() // c
    mean = [int(a) / (n * 255) for a in s]
    std = [math.sqrt(int(b) * n - int(a) ** 2) / (n * 255) for a, b in zip(s, ss)]
    return (torch.tensor(mean, dtype=torch.float64).float(),
            torch.tensor([v if v > 0 else 1.0 for v in std], dtype=torch.float64).float())


def _given_stats(values, key: str, channels: int) -> torch.Tensor | None:
    """``values`` (per channel, [0,1] scale) as a float tensor, checked; None stays None."""
    if values is None:
        return None
    values = [float(v) for v in values] if isinstance(values, (list, tuple)) else [float(values)]
    out = torch.tensor(values, dtype=torch.float32)
    if len(out) != channels:
        entries = f"{len(out)} entr{'y' if len(out) == 1 else 'ies'}"
        raise ImageFolderError(f"{key}: {values} has {entries}; the images have {channels} "
                               f"channel{'s' if channels > 1 else ''}, so give {channels} (one per channel, on the "
                               "[0,1] scale), or leave it out and it is computed from the training images")
    if key == "data_std" and not bool((out > 0).all()):
        raise ImageFolderError(f"data_std: {values} has an entry <= 0; fix: give positive values, or "
                               "leave it out and it is computed from the training images")
    return out


def check_image_folder(listing: ImageListing, *, image_size: int = 0, train_subset: int = 0, test_subset: int = 0,
                       mean=None, std=None, memory_mb: int = 4096):
    """``(channels, side, mean, std)`` of the images ``load_image_folder`` would load (``mean``
    and ``std`` as tensors, None where not given), after checking, with no image decoded, that
    a given mean and std have one value per channel and that the kept images fit ``memory_mb``
    MiB as uint8 (the params' checks call it before anything runs)."""
    channels, side = image_geometry(listing, image_size)
    mean, std = _given_stats(mean, "data_mean", channels), _given_stats(std, "data_std", channels)
    kept = [n if 0 < n < len(files) else len(files) for files, n in ((listing.train, train_subset),
                                                                     (listing.test, test_subset))]
    need = sum(kept) * channels * side * side
    if need > memory_mb * 2**20:
        raise ImageFolderError(
            f"data_root '{listing.root}': {sum(kept)} images ({kept[0]} train, {kept[1]} test) at "
            f"{side}x{side} with {channels} channel{'s' if channels > 1 else ''} need {math.ceil(need / 2**20)} MiB "
            f"in memory, over the budget of {memory_mb} MiB (data_memory_mb); fix: a smaller image_size, or fewer "
            "images with train_subset/test_subset, or a larger data_memory_mb")
    return channels, side, mean, std


def load_image_folder(root: str | Path, *, image_size: int = 0, train_subset: int = 0, test_subset: int = 0,
                      mean=None, std=None, memory_mb: int = 4096) -> Dataset:
    """A user's images in torchvision's ImageFolder layout, in memory as a ``Dataset``.

    The class-balanced subsets are chosen on the file list, and the memory they need
    checked against ``memory_mb``, before any image is decoded. Images are converted to
    L or RGB (``image_geometry``) and resized to ``image_size`` (bilinear) where it
    differs. ``mean``/``std`` default to the training split's per-channel statistics.
    """
    listing = list_image_folder(root)
    channels, side, mean, std = check_image_folder(listing, image_size=image_size, train_subset=train_subset,
                                                   test_subset=test_subset, mean=mean, std=std, memory_mb=memory_mb)
    splits = []
    for files, n in ((listing.train, train_subset), (listing.test, test_subset)):
        labels = torch.tensor([label for _, label in files], dtype=torch.long)
        keep = balanced_subset(labels, n)
        splits.append(([files[i][0] for i in keep.tolist()], labels[keep]))
    out = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for files, labels in splits:
            images = np.empty((len(files), channels, side, side), dtype=np.uint8)
            arrays = pool.map(lambda rel: _decode(listing, rel, channels, side, image_size), files)
            for i, pixels in enumerate(arrays):  # in order: the first bad file is the one named
                images[i] = pixels
            out.append(Split(torch.from_numpy(images), labels))
    train, test = out
    if mean is None or std is None:
        data_mean, data_std = channel_stats(train.images)
        mean, std = (data_mean if mean is None else mean), (data_std if std is None else std)
    return Dataset(IMAGE_FOLDER, train, test, mean, std, list(listing.classes))


def load_dataset(name: str = "FashionMNIST", data_root: str | Path = "data", *,
                 train_subset: int = 0, test_subset: int = 0, download: bool = True,
                 **image_folder_options) -> Dataset:
    """Load a dataset into memory: the MNIST family read from torchvision's layout, the
    rest (and any download) through torchvision, ``IMAGE_FOLDER`` by ``load_image_folder``.

    Fashion-MNIST is first taken from ``/usr/share/datasets/fashion-mnist`` (Debian
    package ``dataset-fashion-mnist``) or ``data_root``; only then downloaded.
    ``train_subset``/``test_subset`` > 0 keep a deterministic class-balanced subset.
    ``image_folder_options`` (image_size, mean, std, memory_mb) go to ``load_image_folder``;
    the built-in datasets ignore them.
    """
    unknown = set(image_folder_options) - {"image_size", "mean", "std", "memory_mb"}
    if unknown:
        raise TypeError(f"load_dataset: unknown options {', '.join(sorted(unknown))}; "
                        "valid ones are image_size, mean, std, memory_mb")
    if name == IMAGE_FOLDER:
        return load_image_folder(data_root, train_subset=train_subset, test_subset=test_subset,
                                 **image_folder_options)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: valid names are {', '.join([*DATASETS, IMAGE_FOLDER])}")
    root = Path(data_root).expanduser()
    if name == "FashionMNIST":
        _stage_debian_fashion_mnist(root)
    train, test = _read_idx_layout(name, root) or _read_torchvision(name, root, download)
    train_idx = balanced_subset(train.labels, train_subset)
    test_idx = balanced_subset(test.labels, test_subset)
    _, _, _, mean, std = DATASETS[name]
    return Dataset(name, Split(train.images[train_idx], train.labels[train_idx]),
                   Split(test.images[test_idx], test.labels[test_idx]),
                   torch.tensor(mean), torch.tensor(std), CLASS_NAMES[name])


VALIDATION_SEED = 20240601  # fixed: every run holds out the same images
LABELLED_SEED = 20261129  # fixed: every run with labelled_subset labels the same images


def holdout_validation(data: Dataset, n: int) -> Dataset:
    """``data`` with a class-balanced validation split of ``n`` images held out of the
    training set, standing in for the test set (``eval_split == "validation"``).

    For tuning: the student trains on the rest and is scored on images it never saw,
    and the test set is not touched. The split does not depend on the run's seed.
    """
    if n <= 0:
        return data
    if n >= len(data.train):
        raise ValueError(f"val_subset: {n} is not allowed; the training set has only {len(data.train)} images")
    val_idx = balanced_subset(data.train.labels.cpu(), n, seed=VALIDATION_SEED).to(data.train.labels.device)
    keep = torch.ones(len(data.train), dtype=torch.bool, device=val_idx.device)
    keep[val_idx] = False
    train = Split(data.train.images[keep], data.train.labels[keep])
    val = Split(data.train.images[val_idx], data.train.labels[val_idx])
    return Dataset(data.name, train, val, data.mean, data.std, data.classes, "validation")


def teacher_label_seed(name: str, teacher_seed: int) -> int:
    """The seed of teacher ``name``'s label noise: fixed per teacher and ``teacher_seed``,
    so two teachers with the same noise fraction get different wrong labels."""
    return teacher_seed * 1_000_003 + zlib.crc32(name.encode())


def swap_classes(labels: torch.Tensor, pairs) -> torch.Tensor:
    """``labels`` with each class pair ``[a, b]`` of ``pairs`` exchanged (a becomes b, b
    becomes a); every other label unchanged."""
    out = labels.clone()
    for a, b in pairs:
        out[labels == a] = b
        out[labels == b] = a
    return out


def noisy_labels(labels: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """``labels`` with ``round(fraction * n_c)`` images of each class ``c`` (``n_c`` of
    them; a class-balanced draw) given a wrong label, drawn uniformly from the other
    ``num_classes - 1`` classes. Which images and which labels depend only on ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    cpu = labels.cpu()
    order = torch.randperm(len(cpu), generator=gen)
    picked = []
    for c in range(num_classes):
        members = order[cpu[order] == c]
        picked.append(members[:int(fraction * len(members) + 0.5)])
    picked = torch.cat(picked)
    out = cpu.clone()
    out[picked] = (cpu[picked] + torch.randint(1, num_classes, (len(picked),), generator=gen)) % num_classes
    return out.to(labels.device)


def teacher_labels(labels: torch.Tensor, num_classes: int, *, noise: float = 0.0, swap=(), seed: int = 0):
    """The training labels one teacher learns from: its class pairs ``swap`` exchanged,
    then a fraction ``noise`` of each class replaced by wrong labels (``noisy_labels``,
    wrong with respect to the swapped label). With neither, ``labels`` itself."""
    if swap:
        labels = swap_classes(labels, swap)
    if noise:
        labels = noisy_labels(labels, noise, num_classes, seed)
    return labels


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 [B,C,H,W] -> float32, scaled to [0,1] and standardised per channel; floating-point
    images (``kdlib.distill`` on tensors already normalised) are only standardised."""
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def view_count(pad: int = 2, flip: bool = True) -> int:
    """How many distinct augmented views an image has: (2 pad + 1)^2 shifts, twice with flips."""
    return (2 * pad + 1) ** 2 * (2 if flip else 1)


def unshifted_view(pad: int = 2) -> int:
    """The view (``apply_views``) that is the image itself: shifted by ``pad`` both ways
    in the padded frame, not flipped."""
    return pad + (2 * pad + 1) * pad


def apply_views(images: torch.Tensor, views: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """The augmented views ``views`` [B] of a uint8 batch [B,C,H,W]: view
    ``v = dx + s*dy + s*s*flipped`` (``s = 2 pad + 1``) is the image shifted so that its
    top-left corner comes from ``(dy, dx)`` of the zero-padded image, then mirrored if
    ``flipped``. Deterministic: every view of every image can be enumerated (the
    per-view teacher cache does)."""
    b, _, h, w = images.shape
    side = 2 * pad + 1
    views = views.to(images.device)
    dx, dy, flipped = views % side, (views // side) % side, views >= side * side
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (dy.view(b, 1) + torch.arange(h, device=images.device)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=images.device)).view(b, 1, 1, w)
    out = padded.gather(2, rows.expand(b, padded.shape[1], h, padded.shape[3]))
    out = out.gather(3, cols.expand(b, padded.shape[1], h, w))
    return torch.where(flipped.view(b, 1, 1, 1), out.flip(3), out)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 2,
                  flip: bool = True, return_views: bool = False):
    """Random translation by up to ``pad`` pixels (zero fill) and, if ``flip``, random
    horizontal flips, for a whole uint8 batch at once. With ``return_views`` also the
    view index of each image (see ``apply_views``)."""
    b = images.shape[0]
    side = 2 * pad + 1
    dx = torch.randint(0, side, (b,), generator=generator)
    dy = torch.randint(0, side, (b,), generator=generator)
    flipped = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    views = dx + side * dy + side * side * flipped.long()
    out = apply_views(images, views, pad)
    return (out, views.to(images.device)) if return_views else out


def with_labelled_subset(data: "Dataset", n: int) -> "Dataset":
    """``data`` with only ``n`` class-balanced training images marked labelled
    (``Dataset.labelled``, a bool mask over ``data.train``); the rest stay as a transfer
    set for distillation. The choice is fixed (``LABELLED_SEED``), the same for every
    run, method and seed, and disjoint from nothing: it is drawn from the training
    split as the students see it (after any validation hold-out)."""
    if n <= 0:
        return data
    if n >= len(data.train):
        raise ValueError(f"labelled_subset: {n} is not allowed; the students' training set has only "
                         f"{len(data.train)} images")
    idx = balanced_subset(data.train.labels.cpu(), n, seed=LABELLED_SEED).to(data.train.labels.device)
    mask = torch.zeros(len(data.train), dtype=torch.bool, device=idx.device)
    mask[idx] = True
    return replace(data, labelled=mask)


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Index tensors of one epoch's batches; the order is a function of (seed, epoch)."""
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
    else:
        order = torch.arange(n)
    return list(order.split(batch_size))


def repeated_batch_order(indices: torch.Tensor, n: int, batch_size: int, seed: int, epoch: int):
    """Index tensors of an epoch of ``n`` samples drawn from ``indices`` only: shuffled
    passes over them, one after another, cut at ``n``. A student trained on a few
    labelled images takes as many steps per epoch as one trained on the whole set."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    passes = -(-n // len(indices))
    order = torch.cat([indices.cpu()[torch.randperm(len(indices), generator=gen)] for _ in range(passes)])[:n]
    return list(order.split(batch_size))
