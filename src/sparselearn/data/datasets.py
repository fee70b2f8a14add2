"""Datasets by name: where their files are looked up, how they are split and batched.

Lookup order: ``data_dir`` (``--data-dir``), then ``$SPARSELEARN_DATA``, then the standard system
location (Fashion-MNIST: the Debian package ``dataset-fashion-mnist``). Each place is searched
as is and in a sub-folder named after the dataset. Missing files are downloaded from their
canonical source (verified by MD5) where a network exists; otherwise the error names every
place searched and how to get the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .._registry import Registry
from . import text
from .base import Batch, Data, DatasetInfo, hold_out, seed_of, writable_home
from .cifar import TEST_FILES, TRAIN_FILES, read_split
from .download import DownloadError, download_file, extract_tar
from .idx import read_idx

__all__ = [
    "DATASETS",
    "ArrayData",
    "Batch",
    "Data",
    "DatasetInfo",
    "fetch",
    "find_or_fetch",
    "load_dataset",
    "locate",
    "pad_crop_flip",
    "search_roots",
    "steps_per_epoch",
]

_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

DATASETS: Registry[DatasetInfo] = Registry("dataset")
DATASETS.register(
    "mnist",
    DatasetInfo(
        "mnist",
        (1, 28, 28),
        10,
        (0.1307,),
        (0.3081,),
        folders=("mnist", "MNIST/raw"),
        files=_IDX_FILES,
        downloads=tuple(
            (_MNIST + f, md5)
            for f, md5 in zip(
                _IDX_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
                strict=True,
            )
        ),
        how_to_get="the four IDX files of MNIST (train-images-idx3-ubyte.gz, ...)",
    ),
)
DATASETS.register(
    "fashion-mnist",
    DatasetInfo(
        "fashion-mnist",
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
        folders=("fashion-mnist", "FashionMNIST/raw"),
        files=_IDX_FILES,
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        downloads=tuple(
            (_FASHION + f, md5)
            for f, md5 in zip(
                _IDX_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
                strict=True,
            )
        ),
        how_to_get="`apt-get install dataset-fashion-mnist` (Debian), or the four IDX files",
    ),
)
DATASETS.register(
    "cifar10",
    DatasetInfo(
        "cifar10",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        folders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
        files=(*TRAIN_FILES, *TEST_FILES),
        downloads=(
            (
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
            ),
        ),
        how_to_get="cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
        "unpacked (the cifar-10-batches-py folder)",
        augment=True,
    ),
)
DATASETS.register(
    "imagenet",
    DatasetInfo(
        "imagenet",
        (3, 224, 224),
        1000,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        folders=("imagenet", "ILSVRC2012"),
        files=("train", "val"),
        how_to_get="ImageNet (ILSVRC2012) from https://image-net.org after registration, as "
        "train/<class>/*.JPEG and val/<class>/*.JPEG",
        augment=True,
    ),
)


DATASETS.register(text.NAME, text.INFO)


def search_roots(data_dir: str | os.PathLike[str] | None, info: DatasetInfo) -> list[Path]:
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir))
    if os.environ.get("SPARSELEARN_DATA"):
        roots.append(Path(os.environ["SPARSELEARN_DATA"]))
    roots += [Path(d) for d in info.system_dirs]
    return roots


def _candidates(roots: list[Path], info: DatasetInfo) -> list[Path]:
    out: list[Path] = []
    for root in roots:
        out += [root / sub for sub in info.folders] + [root]
    return out


def locate(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The first folder holding all of the dataset's files, or None."""
    for folder in _candidates(search_roots(data_dir, info), info):
        if all((folder / f).exists() for f in info.files):
            return folder
    return None


def _download_target(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> Path:
    return writable_home(data_dir) / info.folders[0]


def fetch(info: DatasetInfo, data_dir: str | os.PathLike[str] | None, mirror: str | None) -> Path:
    """Download the dataset's files (from ``mirror`` instead of the canonical host if given)."""
    target = _download_target(info, data_dir)
    for url, md5 in info.downloads:
        name = url.rsplit("/", 1)[1]
        source = mirror.rstrip("/") + "/" + name if mirror else url
        path = download_file(source, target / name, md5)
        if name.endswith(".tar.gz"):
            extract_tar(path, target.parent)
            path.unlink()
    folder = locate(info, target.parent)
    if folder is None:
        raise DownloadError(f"downloaded {info.name} to {target}, but its files are not there")
    return folder


def find_or_fetch(
    info: DatasetInfo,
    data_dir: str | os.PathLike[str] | None,
    *,
    download: bool = True,
    mirror: str | None = None,
) -> Path:
    folder = locate(info, data_dir)
    if folder is not None:
        return folder
    searched = "\n  ".join(str(p) for p in _candidates(search_roots(data_dir, info), info))
    problem = ""
    if download and info.downloads:
        try:
            return fetch(info, data_dir, mirror)
        except DownloadError as err:
            problem = f"\nDownloading failed: {err}"
    elif not info.downloads:
        problem = f"\n{info.name} cannot be downloaded automatically."
    raise FileNotFoundError(
        f"{info.name} not found. Searched:\n  {searched or '(no folder given)'}{problem}\n"
        f"Get {info.how_to_get}, and pass --data-dir or set $SPARSELEARN_DATA to its folder."
    )


# ----------------------------------------------------------------------------- in-memory data


@dataclass
class ArrayData:
    """Images held in memory as uint8 (N, C, H, W), with labels; normalised per batch."""

    info: DatasetInfo
    splits: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def size(self, split: str) -> int:
        return len(self.splits[split][1])

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool, seed: int, epoch: int, augment: bool
    ) -> Iterator[Batch]:
        x, y = self.splits[split]
        n = len(y)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch)))
        else:
            order = torch.arange(n)
        gen = torch.Generator().manual_seed(seed_of(seed, epoch, 1))
        mean = torch.tensor(self.info.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.info.std).view(1, -1, 1, 1)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = x[idx].float().div_(255)
            if augment:
                xb = pad_crop_flip(xb, gen)
            yield xb.sub_(mean).div_(std), y[idx]


def pad_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crops of the zero-padded images and random horizontal flips (CIFAR augmentation)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]  # (B, 1, H, 1)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = True,
    mirror: str | None = None,
    image_size: int | None = None,
) -> Data:
    """Load ``name`` with ``val_fraction`` of the training set held out as the ``val`` split.

    The held-out split depends only on ``split_seed`` (0 by default), so every run of a study
    validates on the same images.
    """
    info = DATASETS.get(name)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if name == text.NAME:
        if image_size is not None:
            raise ValueError(f"image_size applies to imagenet only, not {name}")
        return text.load_text(data_dir, val_fraction, split_seed)
    folder = find_or_fetch(info, data_dir, download=download, mirror=mirror)
    if name == "imagenet":
        from .imagenet import FolderData

        return FolderData.open(info, folder, val_fraction, split_seed, image_size or 224)
    if image_size is not None:
        raise ValueError(f"image_size applies to imagenet only, not {name}")
    if name == "cifar10":
        train_x, train_y = read_split(folder, TRAIN_FILES)
        test_x, test_y = read_split(folder, TEST_FILES)
    else:
        train_x, train_y = (read_idx(folder / f) for f in _IDX_FILES[:2])
        test_x, test_y = (read_idx(folder / f) for f in _IDX_FILES[2:])
        train_x, test_x = train_x.unsqueeze(1), test_x.unsqueeze(1)  # (N, 1, 28, 28)
        train_y, test_y = train_y.long(), test_y.long()
    for what, x, y in (("training", train_x, train_y), ("test", test_x, test_y)):
        if len(x) != len(y):
            raise ValueError(f"{name} {what} set: {len(x)} images but {len(y)} labels")
        if tuple(x.shape[1:]) != info.input_shape:
            raise ValueError(
                f"{name} {what} images have shape {tuple(x.shape[1:])}, expected {info.input_shape}"
            )
    train, val = hold_out(train_x, train_y, val_fraction, split_seed)
    return ArrayData(info, {"train": train, "val": val, "test": (test_x, test_y)})


def steps_per_epoch(data: Data, batch_size: int) -> int:
    return math.ceil(data.size("train") / batch_size)
