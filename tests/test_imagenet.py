"""The ImageNet DeiT recipe: configs load, and 2 steps run on a fake ImageFolder (1 and 2 ranks)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from primal_dual_attention.training.config import TrainConfig, load_yaml_config

pytest.importorskip("timm")
CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/imagenet/deit_tiny_*.yaml"))


def fake_imagefolder(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("n01440764", "n01443537"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_configs_hold_the_deit_recipe(path):
    cfg = load_yaml_config(path, TrainConfig()).validate()
    assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay, cfg.label_smoothing) == (300, 5, 0.05, 0.1)
    assert (cfg.mixup, cfg.cutmix, cfg.repeated_aug, cfg.drop_path) == (0.8, 1.0, 3, 0.1)
    assert cfg.auto_augment.startswith("rand-m9") and cfg.optimizer == "adamw"
    assert cfg.effective_lr() == pytest.approx(5e-4 * cfg.batch_size / 512)


def test_one_recipe_per_main_variant():
    assert [p.stem for p in CONFIGS] == [f"deit_tiny_{v}" for v in ("bn", "bn_sh", "sh", "softmax")]


SMOKE = ["--epochs", "1", "--batch-size", "4", "--eval-batch-size", "4", "--img-size", "32",
         "--num-workers", "0", "--precision", "fp32", "--no-progress", "--threads", "1"]


def test_two_steps_on_a_fake_imagefolder(tmp_path):
    from primal_dual_attention.cli import main

    root = fake_imagefolder(tmp_path / "inet")
    out = tmp_path / "runs"
    code = main(["train", "--config", "configs/imagenet/deit_tiny_bn_sh.yaml", "--data-dir", str(root),
                 "--out-dir", str(out), *SMOKE])
    assert code == 0
    log = (out / "imagenet" / "imagenet" / "paper" / "bn_sh" / "seed0" / "log.csv").read_text().splitlines()
    assert len(log) == 2 and "test_acc" in log[0]


@pytest.mark.parametrize("repeated_aug", [0, 3])
def test_the_schedule_counts_the_batches_an_epoch_yields(tmp_path, repeated_aug):
    """The training loader drops a last partial batch: 8 images in batches of 3 are 2 steps, not
    the 3 the schedule counted (its cosine then stopped at 2/3)."""
    from primal_dual_attention.data.imagefolder import imagefolder_splits

    train, _ = imagefolder_splits(fake_imagefolder(tmp_path / "inet"), img_size=32, auto_augment=None,
                                  random_erase=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                                  repeated_aug=repeated_aug, num_workers=0, seed=0)
    yielded = sum(1 for _ in train.batches(3, torch.Generator().manual_seed(0)))
    assert train.batches_per_epoch(3) == yielded
    assert yielded == 2 or repeated_aug  # timm's repeated augmentation selects its own count


def test_two_steps_with_torchrun_on_two_ranks(tmp_path):
    root = fake_imagefolder(tmp_path / "inet")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*torchrun, "-m", "primal_dual_attention.cli", "train", "--config",
         "configs/imagenet/deit_tiny_softmax.yaml", "--data-dir", str(root),
         "--out-dir", str(tmp_path / "runs"), *SMOKE],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "imagenet" / "imagenet" / "paper" / "softmax" / "seed0" / "last.pt").is_file()


def test_missing_imagefolder_is_a_clear_error(tmp_path, capsys):
    from primal_dual_attention.cli import main

    code = main(["train", "--config", "configs/imagenet/deit_tiny_sh.yaml", "--data-dir",
                 str(tmp_path / "nowhere"), *SMOKE])
    assert code == 2 and "ImageFolder split" in capsys.readouterr().err


@pytest.mark.parametrize("model, variant, error", [
    ("vit_tiny_patch16_224", "softmax", None),  # timm's own model: built without our attention
    ("vit_tiny_patch16_224", "bn", "is built with variant 'softmax', got variant='bn'"),
    ("deit_tiny_patch16_224_bn_sh", "sh", "is built with variant 'bn_sh', got variant='sh'"),
    ("no_such_model", "softmax", "is not a timm model"),
    (None, "softmax", "checkpoint_every=5: task 'imagenet' resumes at round boundaries only"),
])
def test_a_timm_model_of_another_variant_is_refused_before_data(tmp_path, model, variant, error):
    cfg = TrainConfig(task="imagenet", model=model, variant=variant, img_size=32,
                      data_dir=str(tmp_path / "nothing"), checkpoint_every=None if model else 5)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            cfg.validate()
        return
    from primal_dual_attention.training.tasks import build_task

    cfg = replace(cfg.validate(), data_dir=str(fake_imagefolder(tmp_path / "inet")), num_workers=0)
    assert type(build_task(cfg).model.blocks[0].attn).__name__ == "Attention"  # timm's own
