"""Small datasets written in the real file formats (IDX, CIFAR python batches, image folders).

Images carry a class signal (a per-class template plus noise) so that training can be checked to
learn something.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from sparselearn.data import write_idx

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def signal_images(
    n: int, shape: tuple[int, ...], classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, *shape) whose class shows in a template; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    # MNIST-like statistics: about 20% bright pixels on black, the pattern set by the class,
    # a fifth of its pixels dropped at random in each image
    templates = torch.rand(classes, *shape, generator=torch.Generator().manual_seed(12345)) < 0.2
    y = torch.randint(0, classes, (n,), generator=g)
    keep = torch.rand(n, *shape, generator=g) > 0.2
    x = (templates[y] & keep).to(torch.uint8) * 230
    return x, y


def write_mnist_like(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x, y = signal_images(n_train, (28, 28), 10, seed)
    xt, yt = signal_images(n_test, (28, 28), 10, seed + 1)
    write_idx(x, folder / IDX_NAMES["train_x"], compress=True)
    write_idx(y.to(torch.uint8), folder / IDX_NAMES["train_y"], compress=True)
    write_idx(xt, folder / IDX_NAMES["test_x"], compress=True)
    write_idx(yt.to(torch.uint8), folder / IDX_NAMES["test_y"], compress=True)
    return folder


def write_cifar(folder: Path, per_batch: int = 40, seed: int = 0) -> Path:
    """``cifar-10-batches-py`` with five training batches and a test batch, as pickles."""
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, y = signal_images(per_batch, (3, 32, 32), 10, seed + i)
        batch = {
            b"batch_label": name.encode(),
            b"labels": y.tolist(),
            b"data": x.reshape(per_batch, -1).numpy().astype(np.uint8),
            b"filenames": [f"img{j}.png".encode() for j in range(per_batch)],
        }
        with (root / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c"] * 10}))
    return root


def write_image_folders(folder: Path, classes: int = 3, per_class: int = 6, size: int = 20) -> Path:
    """``train/<class>/*.png`` and ``val/<class>/*.png`` (ImageNet layout)."""
    from PIL import Image

    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = folder / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            x, _ = signal_images(n, (size, size + 4, 3), classes, seed=c * 10 + len(split))
            for i in range(n):
                Image.fromarray(x[i].numpy(), mode="RGB").save(d / f"img_{i}.png")
    return folder
