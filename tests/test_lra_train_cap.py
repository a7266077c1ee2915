"""``max_train_samples`` caps the training samples a generated LRA task makes (issue 16: the GPU
script cannot generate Pathfinder's 160k images inside its time limit)."""

from __future__ import annotations

import pytest

from primal_dual_attention.training.config import TrainConfig, bundled_config
from primal_dual_attention.training.engine import StepSplit
from primal_dual_attention.training.tasks import build_task


def test_max_train_samples_caps_the_generated_training_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PDA_CACHE_DIR", str(tmp_path))
    base = bundled_config("lra", "listops", TrainConfig(task="lra", dataset="listops"))
    cfg = TrainConfig(**{**base.to_dict(), "budget": 0.01, "max_eval_samples": 4,
                         "max_train_samples": 40, "dim": 16, "mlp_dim": 16}).validate()
    assert cfg.total_steps() * cfg.batch_size == 1600  # the budget alone would make 1,600
    task = build_task(cfg)
    assert len(task.train) == 40 and len(task.val) == 4 and len(task.test) == 4
    # the step stream repeats the 40 samples in laps
    stream = StepSplit(task.train, start=0, samples=100, seed=0)
    assert sum(len(y) for *_, y in stream.batches(32)) == 100


def test_max_train_samples_must_be_positive():
    with pytest.raises(ValueError, match="max_train_samples must be >= 1"):
        TrainConfig(max_train_samples=0).validate()
