"""Faults and hostile input: killed runs resume exactly, checkpoints are safe, bad data is refused."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from primal_dual_attention.training.engine import atomic_save, load_checkpoint

TINY = ["--dataset", "JapaneseVowels", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
        "--batch-size", "32", "--threads", "1", "--no-progress", "--variant", "bn_sh", "--protocol", "paper"]


def train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "primal_dual_attention.cli", "train", *TINY,
                             "--out-dir", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_dir(out: Path) -> Path:
    return out / "uea" / "JapaneseVowels" / "paper" / "bn_sh" / "seed0"


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    """Killed at a random moment, the run's last.pt may be a round's end or a mid-round one
    (``--checkpoint-every 2``), or half written: the resumed run ends as the uninterrupted one."""
    epochs = ["--epochs", "6", "--checkpoint-every", "2"]
    reference = train(tmp_path / "ref", *epochs)
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()

    victim = train(tmp_path / "cut", *epochs)
    log = run_dir(tmp_path / "cut") / "log.csv"
    deadline = time.time() + 120
    while not log.exists() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))  # somewhere in a later epoch or write
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = train(tmp_path / "cut", *epochs, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()

    a = load_checkpoint(run_dir(tmp_path / "ref") / "last.pt")
    b = load_checkpoint(run_dir(tmp_path / "cut") / "last.pt")
    assert a["epoch"] == b["epoch"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["test_acc"] for r in a["history"]] == [r["test_acc"] for r in b["history"]]


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(100)}, "config": {}, "epoch": 0}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="last.pt is not a readable"):
        load_checkpoint(path)


class Foreign:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_foreign_pickle_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Foreign(), "config": {}, "epoch": 0}, path)
    with pytest.raises(ValueError, match="evil.pt is not a readable"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="expected keys"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.zeros(3)}, "config": {}, "epoch": 1}, path)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="could not write checkpoint .*last.pt"):
        atomic_save({"model": {"w": torch.ones(3)}, "config": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the run folder should be")
    proc = train(blocker, "--epochs", "1")
    assert proc.wait(timeout=120) == 2
    message = proc.stderr.read().decode()
    assert message.startswith("pda: error:") and "not_a_folder" in message


def test_nan_in_a_batch_is_an_error_naming_the_batch(tmp_path):
    from dataclasses import replace

    from primal_dual_attention.training.config import TrainConfig
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    cfg = replace(TrainConfig(), dim=16, depth=1, heads=2, mlp_dim=16, epochs=1, out_dir=str(tmp_path),
                  progress=False)
    seed_everything(0)
    task = build_task(cfg)
    task.train.x[5, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"inputs of epoch 1, batch \d+"):
        fit(cfg, task)


def test_nan_in_a_batch_is_one_error_line_from_the_command(tmp_path, monkeypatch, capsys):
    from primal_dual_attention.cli import main
    from primal_dual_attention.training import tasks

    build_task = tasks.build_task

    def poisoned(cfg):
        task = build_task(cfg)
        task.train.x[5, 0, 0] = float("nan")
        return task

    monkeypatch.setattr(tasks, "build_task", poisoned)
    code = main(["train", *TINY, "--epochs", "1", "--out-dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("pda: error: non-finite values (NaN/inf) in the inputs of epoch 1, batch")
    assert "Traceback" not in error
