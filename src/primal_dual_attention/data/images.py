"""CIFAR-10 from the JPEG zip in ``../shared/data/cifar10`` (or a torchvision folder), in memory.

The zip holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``; it is read straight from the
archive (no extraction), decoded once into a uint8 tensor, and served in batches with the usual
augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal flip) done on whole
batches in torch, so no data-loader workers are needed. Class indices follow the sorted class
folder names, which for CIFAR-10 is the canonical order (airplane = 0, ..., truck = 9).
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from primal_dual_attention.data.common import shared_data, zip_file

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def default_cifar_zip() -> Path | None:
    """``$PDA_CIFAR_ZIP``, else the shared copy beside the working directory or the repository."""
    return shared_data("cifar10/CIFAR-10-images/CIFAR-10-images.zip", "PDA_CIFAR_ZIP")


def read_image_zip(path: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All ``<split>/<class>/<file>`` images of a zip as ``(N, 3, H, W)`` uint8, labels, classes.

    Decoded once per process and file version (benchmarks build several models on the same data);
    callers must not modify the returned tensors in place.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stat = Path(path).stat()
    return _decode_zip(str(Path(path).resolve()), split, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _decode_zip(path: str, split: str, size: int, mtime_ns: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from PIL import Image

    with zipfile.ZipFile(path) as archive:
        members = []
        for name in archive.namelist():
            parts = name.split("/")
            # tolerate one wrapping folder: [root/]split/class/file
            if len(parts) >= 3 and parts[-3] == split and parts[-1] and not parts[-1].startswith("."):
                members.append((parts[-2], name))
        if not members:
            raise ValueError(f"{path} holds no '{split}/<class>/<image>' files")
        classes = sorted({c for c, _ in members})
        index = {c: i for i, c in enumerate(classes)}
        members.sort()
        images = np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB"))
                           for _, n in members])
    labels = torch.tensor([index[c] for c, _ in members], dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, classes


@dataclass
class ImageSplit:
    """Uint8 images in memory; ``batches`` normalises and (when ``augment``) crops and flips."""

    images: torch.Tensor
    labels: torch.Tensor
    augment: bool = False
    padding: int = 4
    per_rank: ClassVar[bool] = False  # every rank slices the same global batches

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> ImageSplit:
        index = torch.as_tensor(index, dtype=torch.long)
        return ImageSplit(self.images[index], self.labels[index], self.augment, self.padding)

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        order = (torch.randperm(len(self), generator=generator) if generator is not None
                 else torch.arange(len(self)))
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            x = self.images[index].float().div_(255)
            if self.augment and generator is not None:
                x = self._augment(x, generator)
            yield (x - mean) / std, None, self.labels[index]

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = F.pad(x, (self.padding,) * 4)
        dy = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        cropped = _crop(padded, dy, dx, h, w)
        flip = torch.rand(n, generator=generator) < 0.5
        return torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample crops ``padded[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` with two gathers."""
    n, c, _, width = padded.shape
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, width)
    taken = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return taken.gather(3, cols)


def load_cifar10(data_dir: str | Path | None = None) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """CIFAR-10 train (augmented) and test splits from the zip, or a torchvision folder."""
    if data_dir is not None and Path(data_dir).is_dir():
        from torchvision.datasets import CIFAR10

        splits = []
        for train in (True, False):
            data = CIFAR10(str(data_dir), train=train, download=False)
            images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
            splits.append(ImageSplit(images, torch.tensor(data.targets), augment=train))
        return splits[0], splits[1], list(data.classes)
    path = zip_file(data_dir, default_cifar_zip(), "CIFAR-10 JPEG zip or a torchvision CIFAR-10 folder",
                    "PDA_CIFAR_ZIP")
    train_images, train_labels, classes = read_image_zip(path, "train")
    test_images, test_labels, test_classes = read_image_zip(path, "test")
    if test_classes != classes:
        raise ValueError(f"{path}: test classes {test_classes} differ from train classes {classes}")
    return (ImageSplit(train_images, train_labels, augment=True), ImageSplit(test_images, test_labels),
            classes)
