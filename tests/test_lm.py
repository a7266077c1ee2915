"""The byte-level LM task: data splits, a short run chosen by validation loss, its evaluation."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
import torch

from primal_dual_attention.analysis.lm_report import evaluate_run, write_report
from primal_dual_attention.data.text import ByteWindows, load_imdb_text, load_text_file
from primal_dual_attention.training.config import TrainConfig
from primal_dual_attention.training.engine import fit
from primal_dual_attention.training.tasks import build_task


def test_byte_windows_batches_predict_the_next_byte():
    stream = torch.arange(50, dtype=torch.uint8)
    windows = ByteWindows(stream, 8)
    assert len(windows) == 6  # starts 0, 8, ..., 40: every window has its 9th byte
    x, mask, y = next(windows.subset(torch.tensor([1, 3])).batches(2))
    assert mask is None and x.shape == (2, 8) and y.shape == (16,)
    assert torch.equal(y.view(2, 8), x + 1) and int(x[1, 0]) == 24
    with pytest.raises(ValueError, match="no window"):
        ByteWindows(stream[:5], 8)


def test_imdb_text_from_the_zip(tmp_path):
    path = tmp_path / "aclImdb.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "test"):
            for label in ("pos", "neg", "unsup"):
                for i in range(60):
                    review = f"{split} {label} review {i}. " * 3
                    archive.writestr(f"aclImdb/{split}/{label}/{i}_1.txt", review)
    data = load_imdb_text(path, 16)
    assert b"unsup" not in bytes(data.train.stream.tolist()) + bytes(data.test.stream.tolist())
    assert b"test pos review" in bytes(data.test.stream.tolist())
    assert len(data.val.stream) < len(data.train.stream) / 20  # 2 % of the train reviews
    assert "train/val/test" in data.description


def tiny_lm_run(tmp_path: Path, variant: str, protocol: str) -> TrainConfig:
    """A 12-step run of a tiny decoder on a small text file written here."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200 + "é ü ß " * 50)
    return TrainConfig(task="lm", dataset="tiny", data_file=str(text), variant=variant, protocol=protocol,
                       max_len=32, dim=16, depth=1, heads=4, mlp_dim=32, dropout=0.0, optimizer="adamw",
                       lr=3e-3, batch_size=8, eval_batch_size=16, steps=12, epochs=3,
                       out_dir=str(tmp_path / "runs"), progress=False, threads=1).validate()


def test_paper_protocol_by_loss_reports_the_selected_epochs_accuracy(tmp_path):
    """Under ``paper`` an LM run picks its epoch by test loss; the accuracy it reports is that
    epoch's, not the best accuracy of another epoch."""
    cfg = tiny_lm_run(tmp_path, "softmax", "paper")
    result = fit(cfg, build_task(cfg))
    losses = [row["test_loss"] for row in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    assert result.test_accuracy == result.history[result.best_epoch - 1]["test_acc"]


def test_lm_run_selects_by_validation_loss_and_evaluates(tmp_path):
    cfg = tiny_lm_run(tmp_path, "bn_sh", "clean")
    assert len(load_text_file(cfg.data_file, 32).test) > 0
    result = fit(cfg, build_task(cfg))
    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == 1 + losses.index(min(losses))
    evaluation = evaluate_run(cfg.run_dir(), test_windows=8)
    assert evaluation["val_bpb"] == pytest.approx(min(losses) / math.log(2))
    assert 0 < evaluation["test_bpb"] < 8.5 and evaluation["cache_bytes_per_token"] > 0
    assert json.loads((cfg.run_dir() / "lm_eval.json").read_text())["variant"] == "bn_sh"
    with pytest.raises(ValueError, match="'imdb' or a --data-file"):
        build_task(TrainConfig(task="lm", dataset="other"))


def test_report_from_copied_runs(tmp_path):
    out = tmp_path / "results"
    for variant, bpb in (("softmax", (2.0, 2.1)), ("bn", (1.5, 1.52))):
        folder = out / "runs" / variant
        folder.mkdir(parents=True)
        for seed, value in enumerate(bpb):
            (folder / f"seed{seed}.json").write_text(json.dumps({
                "variant": variant, "seed": seed, "steps": 10, "context": 8, "params": 100, "test_bpb": value,
                "val_bpb": value, "test_bytes": 64, "train_tokens_per_s": 1.0, "generate_tokens_per_s": 2.0,
                "cache_bytes_per_token": 3.0, "samples": [{"prompt": "a", "continuation": "b"}]}))
            (folder / f"seed{seed}.csv").write_text("epoch,val_loss\n1,2.0\n2,1.5\n")
    text = write_report(out).read_text()
    assert "| bn | 2 | 1.5100 ± 0.0141 |" in text and "better than softmax" in text
    assert (out / "val_bpb.png").is_file()
    assert "recorded with the runs: not recorded." in text  # never the machine writing the report
    assert write_report(out).read_text() == text  # the report is a function of its files


def test_a_text_file_run_is_named_after_the_file(tmp_path):
    """``pda train --task lm --data-file story.txt`` runs in ``lm/story/...``, not under the
    default dataset's name."""
    from primal_dual_attention.cli import build_parser, resolve_config

    args = build_parser().parse_args(["train", "--task", "lm", "--data-file", str(tmp_path / "story.txt")])
    assert resolve_config(args).dataset == "story"
    own = tmp_path / "mine.yaml"  # a dataset the user named is kept
    own.write_text("task: lm\ndataset: mytext\n")
    args = build_parser().parse_args(["train", "--config", str(own), "--data-file",
                                      str(tmp_path / "story.txt")])
    assert resolve_config(args).dataset == "mytext"
    recipe = Path(__file__).parents[1] / "configs" / "lm" / "imdb.yaml"  # its dataset is imdb
    args = build_parser().parse_args(["train", "--config", str(recipe),
                                      "--data-file", str(tmp_path / "story.txt")])
    assert resolve_config(args).dataset == "story"


def test_a_bad_data_file_is_named_with_what_is_wrong(tmp_path):
    missing, binary, short = tmp_path / "none.txt", tmp_path / "bytes.bin", tmp_path / "short.txt"
    binary.write_bytes(b"\xff\xfe" * 100)
    short.write_text("eleven byte")
    with pytest.raises(FileNotFoundError, match=r"data_file '.*none.txt' is not a file"):
        load_text_file(missing, 32)
    with pytest.raises(ValueError, match=r"data_file '.*bytes.bin' is not UTF-8 text \(byte 0: invalid"):
        load_text_file(binary, 32)
    too_short = (r"data_file '.*short.txt' \(11 bytes, split 90/5/5 %\) is too short for windows of "
                 r"max_len=32 \+ 1 bytes: bytes per split train 9, validation 0, test 2")
    with pytest.raises(ValueError, match=too_short):
        load_text_file(short, 32)
