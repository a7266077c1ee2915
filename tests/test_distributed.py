"""torchrun DDP equals one process; bf16 autocast stays close to fp32 (CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from primal_dual_attention import VARIANTS, MultiHeadAttention
from primal_dual_attention.training.engine import autocast, load_checkpoint

COMMON = ["--dataset", "JapaneseVowels", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
          "--batch-size", "32", "--threads", "1", "--no-progress", "--variant", "bn_sh", "--dropout", "0",
          "--epochs", "2", "--protocol", "clean"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two CPU ranks; a rank that crashes prints its Python stack (faulthandler)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = os.environ | {"PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def failure(result: subprocess.CompletedProcess) -> str:
    """The start and end of the ranks' stderr: the crashing rank's own words come first, the
    launcher's summary of the failure last."""
    text = result.stderr
    return text if len(text) <= 6000 else f"{text[:3000]}\n[...]\n{text[-3000:]}"


def last_state(out: Path) -> dict:
    return load_checkpoint(out / "uea" / "JapaneseVowels" / "clean" / "bn_sh" / "seed0" / "last.pt")


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """Two ranks, compiled around DDP (backend ``eager``: Dynamo's graph capture and DDP's graph
    splitting without code generation, which keeps the test fast), train as one eager process
    does with the same global batch (compile and resume: tests/test_uea.py)."""
    two = torchrun("-m", "primal_dual_attention.cli", "train", *COMMON, "--compile", "on",
                   "--compile-backend", "eager", "--out-dir", str(tmp_path / "two"))
    assert two.returncode == 0, failure(two)
    assert two.stdout.count("test accuracy") == 1  # only rank 0 reports
    one = subprocess.run([sys.executable, "-m", "primal_dual_attention.cli", "train", *COMMON,
                          "--out-dir", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = last_state(tmp_path / "one"), last_state(tmp_path / "two")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        assert row_a["val_acc"] == row_b["val_acc"]
        assert row_a["train_loss"] == pytest.approx(row_b["train_loss"], rel=1e-6)
    ranks = b["rng_ranks"]  # each rank its own random stream (dropout, augmentation), not rank 0's
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_is_close_to_fp32(variant):
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, 4, variant=variant, window=3 if variant == "sparse" else None).eval()
    x = torch.randn(2, 24, 32)
    mask = torch.arange(24)[None] >= torch.tensor([24, 15])[:, None]
    reference = layer(x, key_padding_mask=mask)
    with autocast(torch.device("cpu"), "bf16"):
        low = layer(x, key_padding_mask=mask)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    valid = ~mask
    error = (low.float() - reference)[valid].abs().max() / reference[valid].abs().max()
    assert error < 0.05, f"{variant}: relative deviation {error:.3f}"


def test_bf16_training_run_is_finite(tmp_path):
    result = subprocess.run([sys.executable, "-m", "primal_dual_attention.cli", "train", *COMMON,
                             "--precision", "bf16", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    state = last_state(tmp_path)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


DRIVER = '''
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

import primal_dual_attention.training.engine as engine
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.engine import fit, seed_everything
from primal_dual_attention.training.tasks import build_task

mode, out = sys.argv[1], sys.argv[2]
cfg = replace(TrainConfig(), dataset="JapaneseVowels", dim=16, depth=1, heads=2, mlp_dim=32, epochs=2,
              batch_size=31, dropout=0.3, out_dir=out, progress=False, threads=1, device="cpu",
              resume=mode == "resume", checkpoint_every=3).validate()
if mode == "cut":  # stop at batch 5 of the second epoch: last.pt holds its step 3
    check_finite = engine._check_finite

    def crash(tensor, what):
        if what == "the inputs of epoch 2, batch 5":
            raise SystemExit(3)
        return check_finite(tensor, what)

    engine._check_finite = crash
seed_everything(cfg.seed)
rank = os.environ["RANK"]
try:
    fit(cfg, build_task(cfg))
except SystemExit as crash:  # the cut, recorded: a failing rank would have torchrun stop the other
    Path(f"{out}.rank{rank}.cut").write_text(str(crash.code))
Path(f"{out}.rank{rank}.joined").write_text(str(torch.distributed.is_initialized()))
'''


def test_ddp_resume_continues_every_ranks_dropout(tmp_path):
    """31 samples per global batch split 16/15: the ranks draw different amounts of dropout noise,
    so a resumed run equals the uninterrupted one only if each rank gets its own random state back;
    here from a mid-round checkpoint (``checkpoint_every``), with every rank's training sums. (A
    round's end saves the same gathered states (``engine._training_state``); resuming there is
    tested in one process, tests/test_uea.py, which keeps this torchrun test to one case.)"""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    full = torchrun(str(driver), "full", str(tmp_path / "full"))
    assert full.returncode == 0, failure(full)
    cut = torchrun(str(driver), "cut", str(tmp_path / "cut"))
    assert cut.returncode == 0, failure(cut)
    assert [(tmp_path / f"cut.rank{rank}.cut").read_text() for rank in (0, 1)] == ["3"] * 2
    for out in ("full", "cut"):  # fit left the group it joined, after success and after a crash
        assert [(tmp_path / f"{out}.rank{rank}.joined").read_text() for rank in (0, 1)] == ["False"] * 2
    (path,) = [p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("last.pt")]
    assert load_checkpoint(tmp_path / "cut" / path)["round"]["step"] == 3
    resumed = torchrun(str(driver), "resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, failure(resumed)
    a, b = load_checkpoint(tmp_path / "full" / path), load_checkpoint(tmp_path / "cut" / path)
    assert a["epoch"] == b["epoch"] == 1
    # the sums of every rank carried by rank 0 add in another order: equal to float64 rounding
    assert [r["train_loss"] for r in b["history"]] == pytest.approx([r["train_loss"] for r in a["history"]],
                                                                  rel=1e-12)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
