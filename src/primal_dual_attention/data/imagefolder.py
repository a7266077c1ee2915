"""ImageNet-style ``ImageFolder`` data for the DeiT recipe, loaded by each rank for itself.

``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*`` through
:class:`torchvision.datasets.ImageFolder`, decoded by ``DataLoader`` workers with timm's
transforms (RandAugment, random erasing), timm's ``Mixup`` (mixup + cutmix, label smoothing
folded into the soft targets) and timm's ``RepeatAugSampler`` (repeated augmentation). Unlike
the in-memory splits, whose global batches every rank slices, these splits are ``per_rank``:
each rank decodes only its share of a global batch (``batch_size / world_size`` images).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset


class ImageFolderSplit:
    """One split of an ImageFolder tree; ``batches`` yields this rank's part of each batch."""

    per_rank = True

    def __init__(self, root: str | Path, transform, *, train: bool, rank: int = 0, world_size: int = 1,
                 num_workers: int = 4, repeated_aug: int = 0, mixup=None, seed: int = 0) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder split {str(root)!r} does not exist "
                                    "(expected <data_dir>/train/<class>/... and <data_dir>/val/<class>/...)")
        self.dataset = ImageFolder(str(root), transform)
        self.classes = self.dataset.classes
        self.train, self.rank, self.world_size = train, rank, world_size
        self.num_workers, self.repeated_aug, self.mixup, self.seed = num_workers, repeated_aug, mixup, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Training batches an epoch yields: this rank's sampler's share in whole per-rank batches
        (the loader drops a last partial one), what the schedule counts."""
        return len(self._sampler(torch.Generator())) // (batch_size // self.world_size)

    def subset(self, index: torch.Tensor) -> ImageFolderSplit:
        """The samples ``index`` of this split, with its transforms, sampler and mixing."""
        part = copy.copy(self)
        part.dataset = Subset(self.dataset, torch.as_tensor(index, dtype=torch.long).tolist())
        return part

    def _sampler(self, generator: torch.Generator | None):
        from timm.data.distributed_sampler import RepeatAugSampler
        from torch.utils.data import DistributedSampler

        if not self.train or generator is None:  # evaluation: every rank a disjoint stride
            return list(range(self.rank, len(self.dataset), self.world_size))
        epoch_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        if self.repeated_aug > 1:
            sampler = RepeatAugSampler(self.dataset, self.world_size, self.rank, shuffle=True,
                                       num_repeats=self.repeated_aug)
        else:
            sampler = DistributedSampler(self.dataset, self.world_size, self.rank, shuffle=True,
                                         seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch_seed)
        return sampler

    def batches(self, batch_size: int, generator: torch.Generator | None = None
                ) -> Iterator[tuple[torch.Tensor, None, torch.Tensor]]:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size={batch_size} must be divisible by the world size "
                             f"{self.world_size}")
        local = batch_size // self.world_size
        training = self.train and generator is not None
        if training and self.mixup is not None and local % 2:
            raise ValueError(f"mixup needs an even per-rank batch, got {local} (batch_size={batch_size})")
        loader = DataLoader(self.dataset, batch_size=local, sampler=self._sampler(generator),
                            num_workers=self.num_workers, drop_last=training,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False)
        for images, labels in loader:
            if training and self.mixup is not None:
                images, labels = self.mixup(images, labels)
            yield images, None, labels


def imagefolder_splits(data_dir: str | Path, *, img_size: int, auto_augment: str | None,
                       random_erase: float, mixup: float, cutmix: float, label_smoothing: float,
                       repeated_aug: int, num_workers: int, seed: int, rank: int = 0,
                       world_size: int = 1) -> tuple[ImageFolderSplit, ImageFolderSplit]:
    """Train (augmented, mixed) and validation splits of ``data_dir`` with timm's transforms."""
    from timm.data import Mixup, create_transform

    if data_dir is None:
        raise FileNotFoundError("task 'imagenet' needs --data-dir: a folder with train/ and val/ "
                                "ImageFolder trees")
    root = Path(data_dir)
    train_tf = create_transform(img_size, is_training=True, auto_augment=auto_augment,
                                re_prob=random_erase, interpolation="bicubic")
    eval_tf = create_transform(img_size, is_training=False, interpolation="bicubic")
    common = dict(rank=rank, world_size=world_size, num_workers=num_workers, seed=seed)
    val = ImageFolderSplit(root / "val", eval_tf, train=False, **common)
    mixer = None
    if mixup > 0 or cutmix > 0:
        mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                      num_classes=len(val.classes))
    train = ImageFolderSplit(root / "train", train_tf, train=True, repeated_aug=repeated_aug,
                             mixup=mixer, **common)
    if train.classes != val.classes:
        raise ValueError(f"{root}: train classes {train.classes[:5]}... differ from val classes "
                         f"{val.classes[:5]}...")
    return train, val
