"""ImageNet as a class-per-folder tree: ``train/<class>/*`` and ``val/<class>/*`` images.

Decoding needs Pillow (imported on first use). Training images get a random resized crop and a
horizontal flip; evaluation images are resized (short side 256/224 of the target) and centre
cropped. All randomness comes from (seed, epoch, image index), so batches are the same whatever
the number of loader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import Batch, DatasetInfo, hold_out, seed_of

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


def _scan(root: Path, classes: list[str] | None = None) -> tuple[list[Path], Tensor, list[str]]:
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = classes or found
    if not classes:
        raise ValueError(f"{root} holds no class folders")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders missing from train/: {unknown[:5]}")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(f)
                labels.append(label)
    return paths, torch.tensor(labels, dtype=torch.long), classes


class _Images(Dataset[tuple[Tensor, int]]):
    def __init__(
        self,
        paths: list[Path],
        labels: Tensor,
        size: int,
        train: bool,
        seed: int,
        epoch: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.paths, self.labels, self.size, self.train = paths, labels, size, train
        self.seed, self.epoch = seed, epoch
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as file:
            img: Any = file.convert("RGB")
            if self.train:
                gen = torch.Generator().manual_seed(seed_of(self.seed, self.epoch, i))
                img = _random_resized_crop(img, self.size, gen)
                if bool(torch.rand(1, generator=gen) < 0.5):
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            else:
                img = _center_crop(img, self.size)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        x = data.view(self.size, self.size, 3).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, int(self.labels[i])


def _random_resized_crop(img: Any, size: int, gen: torch.Generator) -> Any:
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.08, 1.0, generator=gen))
        ratio = math.exp(
            float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen))
        )
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            return img.resize((size, size), box=(x0, y0, x0 + cw, y0 + ch))
    return _center_crop(img, size)


def _center_crop(img: Any, size: int) -> Any:
    w, h = img.size
    short = round(size * 256 / 224)
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))))
    w, h = img.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    return img.crop((x0, y0, x0 + size, y0 + size))


@dataclass
class FolderData:
    info: DatasetInfo
    splits: dict[str, tuple[list[Path], Tensor]]
    image_size: int
    workers: int = 0

    @classmethod
    def open(
        cls, info: DatasetInfo, folder: Path, val_fraction: float, split_seed: int, size: int
    ) -> FolderData:
        try:
            import PIL  # noqa: F401
        except ImportError:  # pragma: no cover - Pillow is a dependency
            raise ImportError("imagenet needs Pillow: pip install pillow") from None
        train_paths, train_y, classes = _scan(folder / "train")
        test_paths, test_y, _ = _scan(folder / "val", classes)
        index = torch.arange(len(train_paths))
        (train_i, _), (val_i, _) = hold_out(index, train_y, val_fraction, split_seed)
        splits = {
            "train": ([train_paths[i] for i in train_i.tolist()], train_y[train_i]),
            "val": ([train_paths[i] for i in val_i.tolist()], train_y[val_i]),
            "test": (test_paths, test_y),
        }
        shape = (3, size, size)
        return cls(
            DatasetInfo(**{**info.__dict__, "input_shape": shape, "num_classes": len(classes)}),
            splits,
            size,
        )

    def size(self, split: str) -> int:
        return len(self.splits[split][0])

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool, seed: int, epoch: int, augment: bool
    ) -> Iterator[Batch]:
        paths, labels = self.splits[split]
        images = _Images(
            paths, labels, self.image_size, augment, seed, epoch, self.info.mean, self.info.std
        )
        generator = torch.Generator().manual_seed(seed_of(seed, epoch))
        loader = DataLoader(
            images,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.workers,
        )
        yield from loader
