"""Every split implements the engine's ``Split`` protocol, and ``steps`` / ``max_eval_samples``
(which take subsets) run on every task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_imagenet import SMOKE, fake_imagefolder
from test_images import write_zip
from test_uea import toy_dataset

from primal_dual_attention.cli import main
from primal_dual_attention.data.images import ImageSplit
from primal_dual_attention.data.lra import PairSplit, TokenSplit
from primal_dual_attention.data.text import ByteWindows
from primal_dual_attention.data.uea import SeriesSplit
from primal_dual_attention.training.engine import BucketedSplit, Split, StepSplit, load_checkpoint

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def _series() -> SeriesSplit:
    mask = torch.arange(5) >= torch.tensor([5, 4, 3, 5, 2, 5, 1, 5])[:, None]
    return SeriesSplit(torch.randn(8, 5, 2), mask, LABELS.clone())


def _imagefolder(tmp_path: Path):
    pytest.importorskip("timm")
    from timm.data import create_transform

    from primal_dual_attention.data.imagefolder import ImageFolderSplit

    root = fake_imagefolder(tmp_path / "inet")
    return ImageFolderSplit(root / "val", create_transform(32, is_training=False), train=False, num_workers=0)


SPLITS = {
    "SeriesSplit": lambda tmp_path: _series(),
    "ImageSplit": lambda tmp_path: ImageSplit(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8),
                                              LABELS.clone()),
    "TokenSplit": lambda tmp_path: TokenSplit(np.arange(48).reshape(8, 6) % 9 + 1,
                                              np.array([6, 5, 4, 3, 2, 1, 6, 5]), LABELS.numpy()),
    "PairSplit": lambda tmp_path: PairSplit(np.arange(64).reshape(8, 8) % 9 + 1, np.full(8, 4),
                                            np.array([4, 3, 2, 1, 4, 3, 2, 1]), LABELS.numpy()),
    "StepSplit": lambda tmp_path: StepSplit(_series(), start=8, samples=8, seed=3),
    "BucketedSplit": lambda tmp_path: BucketedSplit(_series(), per_octave=2, cap=5),
    "ImageFolderSplit": _imagefolder,
    # one-byte windows: each sample's target is the next byte, so targets line up with samples
    "ByteWindows": lambda tmp_path: ByteWindows(torch.arange(9, dtype=torch.uint8), 1),
}


@pytest.mark.parametrize("name", SPLITS)
def test_every_split_implements_the_protocol(tmp_path, name):
    split = SPLITS[name](tmp_path)
    assert isinstance(split, Split) and isinstance(split.per_rank, bool)
    labels = torch.cat([y for _, _, y in split.batches(3)])
    assert len(labels) == len(split) == 8
    index = torch.tensor([1, 4, 6])
    part = split.subset(index)
    assert isinstance(part, Split) and len(part) == 3 and part.per_rank == split.per_rank
    assert torch.equal(torch.cat([y for _, _, y in part.batches(2)]), labels[index])
    shuffled = torch.cat([y for _, _, y in split.batches(3, torch.Generator().manual_seed(0))])
    assert sorted(shuffled.tolist()) == sorted(labels.tolist())


def _text_file(path: Path) -> Path:
    path.write_text("The film was long, and the ending was worth the wait. " * 200)
    return path


TASKS = {
    "uea": lambda tmp: ["--task", "uea", "--dataset", "Toy", "--data-dir",
                        str(toy_dataset(tmp / "uea", equal=False)), "--batch-size", "2",
                        "--max-eval-samples", "1", "--length-buckets", "2"],
    "image": lambda tmp: ["--task", "image", "--dataset", "CIFAR10", "--data-dir",
                          str(write_zip(tmp / "c.zip")), "--batch-size", "4", "--max-eval-samples", "2"],
    "lra": lambda tmp: ["--task", "lra-pathfinder", "--batch-size", "4", "--max-eval-samples", "3"],
    "lm": lambda tmp: ["--task", "lm", "--data-file", str(_text_file(tmp / "t.txt")), "--dim", "16",
                       "--depth", "1", "--heads", "2", "--mlp-dim", "16", "--batch-size", "2",
                       "--max-eval-samples", "2"],
    "imagenet": lambda tmp: ["--config", "configs/imagenet/deit_tiny_softmax.yaml", "--data-dir",
                             str(fake_imagefolder(tmp / "inet")), *SMOKE, "--max-eval-samples", "3"],
}


@pytest.mark.parametrize("task", TASKS)
def test_steps_and_max_eval_samples_run_on_every_task(tmp_path, monkeypatch, task):
    if task in ("image", "imagenet"):
        pytest.importorskip("timm")
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    args = ["train", *TASKS[task](tmp_path), "--steps", "3", "--epochs", "1", "--warmup-steps", "1",
            "--threads", "1", "--no-progress", "--out-dir", str(out)]
    assert main(args) == 0
    (last,) = out.rglob("last.pt")
    assert load_checkpoint(last)["scheduler"]["last_epoch"] == 3  # three optimizer steps
